"""Reactive redundancy without processes: the code's detection and vote, the config's refusals, the
recomputed group gradient (issue 14)."""


import pytest
import torch

from lightning_draco import DracoStrategy
from lightning_draco.attacks import get_attack
from lightning_draco.codes import DracoDecodeError
from lightning_draco.codes.reactive import EscalationNeeded, ReactiveRepetitionCode
from lightning_draco.data import PartitionBatch
from lightning_draco.strategy.coded_step import CodedStep
from lightning_draco.strategy.escalation import Escalation


def _group_sums(code, d=50, seed=0, dtype=torch.float32):
    grads = torch.randn(code.num_partitions, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return code.encode(grads)


def _clean_total(code, sums):
    return code.total([sums[g * code.redundancy] for g in range(code.num_groups)])


def _copies(code, sums, group, step, lies):
    """The 2s+1 copies of ``group``'s sum (members, then helpers), ``lies``: holder -> what it sends."""
    holders = code.holders(group, step)
    return torch.stack([lies.get(h, sums[code.members(group)[0]]) for h in holders]), holders


# -- who computes what ----------------------------------------------------------------------------
@pytest.mark.parametrize("world, s, r", [(6, 1, 2), (8, 1, 2), (6, 2, 3), (8, 2, 4), (9, 2, 3)])
def test_helpers_are_outside_the_group_distinct_and_each_rank_helps_at_most_one_group(world, s, r):
    code = ReactiveRepetitionCode(world, s, r)
    for step in range(2 * r):
        helping = {}
        for g in range(code.num_groups):
            helpers = code.helpers(g, step)
            assert len(helpers) == len(set(helpers)) == 2 * s + 1 - r
            assert not set(helpers) & set(code.members(g))
            for h in helpers:
                assert h not in helping, "a rank recomputes at most one group per step"
                helping[h] = g
                assert code.helped_by(h, step) == g
        assert all(code.helped_by(w, step) is None for w in range(world) if w not in helping)
    # The helpers rotate through the next group's members with the step.
    assert {tuple(code.helpers(0, step)) for step in range(r)} == {
        tuple(r + (step + t) % r for t in range(2 * s + 1 - r)) for step in range(r)
    }


def test_the_default_group_is_s_plus_one_and_eight_ranks_work_for_s_1():
    assert ReactiveRepetitionCode(8, 1).redundancy == 2
    assert DracoStrategy(redundancy_mode="reactive", num_adversaries=2).config.build_code(9).redundancy == 3


# -- detection ------------------------------------------------------------------------------------
def test_bitwise_equal_replicas_are_accepted_and_the_total_is_the_group_order_sum():
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    assert code.detect(sums) == [True, True, True]
    assert torch.equal(code.decode(sums).total, sums[0] + sums[2] + sums[4])


@pytest.mark.parametrize("attack", ["reverse", "constant", "sign_flip", "nan", "inf", "bit_flip"])
def test_any_difference_escalates_the_liars_group_only(attack):
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    received = sums.clone()
    options = {"generator": torch.Generator().manual_seed(1)} if attack == "bit_flip" else {}
    received[3] = get_attack(attack)(sums[3], **options)
    assert code.detect(received) == [True, False, True]
    with pytest.raises(EscalationNeeded):
        code.decode(received)


def test_a_flipped_lowest_mantissa_bit_escalates_even_with_the_default_tolerance():
    code = ReactiveRepetitionCode(6, 1)
    received = _group_sums(code)
    received.view(torch.int32)[5, 7] ^= 1
    assert code.detect(received) == [True, True, False]


def test_an_explicit_tolerance_lets_replicas_within_it_agree():
    code = ReactiveRepetitionCode(6, 1, tolerance=1e-4)
    received = _group_sums(code)
    received[1] *= 1 + 1e-6
    received[3] *= 1 + 1e-2
    assert code.detect(received) == [True, False, True]


# -- correction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["reverse", "constant", "gaussian", "sign_flip", "bit_flip", "nan", "inf"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_the_vote_of_2s_plus_1_copies_gives_bitwise_the_clean_total_whoever_lies(attack, position):
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    group, step = 1, 4
    holders = code.holders(group, step)
    liar = holders[position]  # a member or the helper
    options = {"generator": torch.Generator().manual_seed(2)} if attack in ("bit_flip", "gaussian") else {}
    lie = get_attack(attack)(sums[liar], **options)
    copies, _ = _copies(code, sums, group, step, {liar: lie})
    values = {g: sums[g * 2] for g in (0, 2)}
    result = code.settle(values, {group: copies}, step)
    assert torch.equal(result.total, _clean_total(code, sums))
    assert result.faulty == [liar]


def test_s_2_the_vote_survives_a_lying_member_and_a_lying_helper():
    code = ReactiveRepetitionCode(9, 2)  # groups of three, two helpers
    sums = _group_sums(code)
    group, step = 2, 1
    holders = code.holders(group, step)
    lies = {holders[0]: -sums[holders[0]], holders[3]: sums[holders[3]] * 3}
    copies, _ = _copies(code, sums, group, step, lies)
    result = code.settle({0: sums[0], 1: sums[3]}, {group: copies}, step)
    assert torch.equal(result.total, _clean_total(code, sums))
    assert result.faulty == sorted([holders[0], holders[3]])


def test_more_than_s_different_lies_among_the_copies_raise_naming_the_holders():
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    holders = code.holders(0, 0)
    copies, _ = _copies(code, sums, 0, 0, {1: sums[1] * 2, holders[2]: sums[1] * 3})
    with pytest.raises(DracoDecodeError, match=r"ranks \[0, 1, 2\].*more than s=1 of these ranks lied") as caught:
        code.settle({1: sums[2], 2: sums[4]}, {0: copies}, 0)
    assert caught.value.suspects == holders


def test_the_noise_floor_is_learned_from_a_vote_and_then_lets_noisy_replicas_agree():
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code, dtype=torch.float64)
    assert code.detection_radius == 0.0
    noise = lambda k: sums[0] * (1 + 1e-7 * k)  # noqa: E731  honest replicas, not bitwise equal
    copies = torch.stack([noise(0), noise(1), noise(2)])
    value, faulty = code.vote(copies, code.holders(0, 0))
    assert faulty == [] and 0 < code.noise_floor < 1e-6
    assert code.detection_radius == pytest.approx(max(1e-5, 8 * code.noise_floor))
    received = sums.clone()
    received[1] = noise(1)
    received[3] = sums[3] * 1.01
    assert code.detect(received) == [True, False, True]
    restored = ReactiveRepetitionCode(6, 1)
    restored.load_state_dict(code.state_dict())
    assert restored.noise_floor == code.noise_floor


def test_bitwise_votes_leave_the_floor_at_zero_so_detection_stays_bitwise():
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    copies, holders = _copies(code, sums, 0, 0, {1: sums[1] * 1.5})
    code.vote(copies, holders)
    assert code.noise_floor == 0.0 and code.detection_radius == 0.0


# -- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(code="crc"), "redundancy_mode='reactive' needs code='frc'"),
        (dict(code="none"), "redundancy_mode='reactive' needs code='frc'"),
        (dict(aggregator="median"), "redundancy_mode='reactive' cannot run an aggregator"),
        (dict(redundancy=3), r"redundancy between s\+1 = 2 and 2s = 2 \(got redundancy=3\)"),
        (dict(num_adversaries=2, redundancy=2), r"redundancy >= num_adversaries \+ 1 = 3"),
        (dict(quarantine_after=-1), "quarantine_after must be None or an integer >= 0"),
        (dict(redundancy_mode="lazy"), "redundancy_mode must be one of full, reactive"),
    ],
)
def test_what_reactive_mode_cannot_do_is_refused_with_the_rule(kwargs, message):
    kwargs = {"redundancy_mode": "reactive", **kwargs}
    with pytest.raises(ValueError, match=message):
        DracoStrategy(**kwargs)


def test_quarantine_needs_reactive_mode():
    with pytest.raises(ValueError, match="quarantine_after has no effect with redundancy_mode='full'"):
        DracoStrategy(quarantine_after=3)


@pytest.mark.parametrize(
    "world, s, message",
    [(5, 1, r"group size r=2 to divide the number of ranks \(5\)"), (3, 2, r"at least 2s\+1 = 5 ranks \(got 3\)")],
)
def test_world_sizes_reactive_mode_cannot_use_are_refused(world, s, message):
    strategy = DracoStrategy(redundancy_mode="reactive", num_adversaries=s)
    with pytest.raises(ValueError, match=message):
        strategy.config.build_code(world)


def test_a_reactive_checkpoint_resumes_only_in_reactive_mode():
    reactive = DracoStrategy(redundancy_mode="reactive").config.resume_conditions(6)
    full = DracoStrategy().config.resume_conditions(6)
    assert reactive["redundancy_mode"] == "reactive" and "redundancy_mode" not in full


# -- the recomputed group gradient ----------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
            torch.nn.Linear(8, 1),
        )

    def forward(self, x):
        return self.net(x)


def test_a_helper_recomputes_the_members_gradient_bit_for_bit_and_leaves_the_buffers_alone():
    code = ReactiveRepetitionCode(6, 1)
    gen = torch.Generator().manual_seed(3)
    batch = PartitionBatch([torch.randn(5, 4, generator=gen) for _ in range(2)], [2, 3], epoch=1, index=7)
    forward_of = lambda model: (lambda x: model(x).square().mean())  # noqa: E731

    # A member of group 1: the summed step and an ordinary backward (what DDP's hook then sends).
    member = _Net()
    CodedStep(code, 2, seed=5, device=torch.device("cpu")).summed_step(batch, forward_of(member)).backward()
    expected = {name: p.grad.clone() for name, p in member.named_parameters()}

    # A helper (rank 4) with its own, different, BatchNorm statistics and RNG state.
    helper = _Net()
    with torch.no_grad():
        helper.net[1].running_mean.fill_(0.5)
    before = {name: b.clone() for name, b in helper.named_buffers()}
    torch.manual_seed(1234)
    escalation = Escalation(code, CodedStep(code, 4, seed=5, device=torch.device("cpu")))
    params = list(helper.parameters())
    grads = escalation._group_gradient(batch, forward_of(helper), helper, params, lambda loss: loss)
    for (name, p) in helper.named_parameters():
        assert torch.equal(grads[id(p)], expected[name]), name
        assert p.grad is None, "the helper's own .grad is untouched"
    assert all(torch.equal(b, before[name]) for name, b in helper.named_buffers()), "buffers restored"


# -- the detection ballot of sharded decoding ------------------------------------------------------
@pytest.mark.parametrize("num_groups", [1, 3, 30, 31, 32, 62, 63, 100])
def test_a_detection_ballot_carries_its_status_and_exactly_its_pending_groups(num_groups):
    from lightning_draco.exchange.reactive import detection_ballot, pending_in

    generator = torch.Generator().manual_seed(num_groups)
    for _ in range(20):
        how_many = int(torch.randint(0, num_groups + 1, (1,), generator=generator))
        pending = sorted(torch.randperm(num_groups, generator=generator)[:how_many].tolist())
        ballot = detection_ballot(2, pending, num_groups, torch.device("cpu"))
        assert ballot.dtype == torch.int32 and ballot.numel() == 1 + -(-num_groups // 31)
        assert int(ballot[0]) == 2 and pending_in(ballot) == pending
    every = list(range(num_groups))
    assert pending_in(detection_ballot(0, every, num_groups, torch.device("cpu"))) == every


def test_noise_one_escalated_group_shows_spares_an_honest_copy_in_another():
    """Two groups escalate under non-deterministic kernels: in group 0 the copies all differ a little; in
    group 1 two copies happen to be bitwise equal and the third is off by the same noise. Voted alone,
    group 1 would name its honest odd copy; voted together, group 0's noise spares it (as the one-shot
    decode does)."""
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code, dtype=torch.float32)
    noisy = lambda g, k: sums[g] * (1 + 1e-7 * k)  # noqa: E731
    group_0 = torch.stack([noisy(0, 0), noisy(0, 1), noisy(0, 2)])
    group_1 = torch.stack([noisy(1, 0), noisy(1, 0), noisy(1, 2)])
    assert not torch.equal(group_1[2], group_1[0])
    alone = ReactiveRepetitionCode(6, 1)
    assert alone.vote(group_1, alone.holders(1, 0))[1] != [], "the case voting alone gets wrong"
    result = code.settle({2: sums[2]}, {0: group_0, 1: group_1}, 0)
    assert result.faulty == []
    # A liar beyond the noise is still named, in the group it lied in.
    group_1[1] = sums[1] * 1.01
    assert code.settle({2: sums[2]}, {0: group_0, 1: group_1}, 0).faulty == [code.holders(1, 0)[1]]


# -- an honest overflow (float16 under a GradScaler) ------------------------------------------------
def _overflowed(value, k, where=5):
    """An honest replica under non-deterministic kernels (off by ``1e-7 k``) that overflowed at ``where``."""
    replica = value * (1 + 1e-7 * k)
    replica[where] = float("inf")
    return replica


def test_noisy_replicas_that_all_overflowed_agree_without_a_vote_and_the_total_is_not_finite():
    """Before: with a learned noise floor, a group whose honest replicas all overflowed (non-finite, not bitwise
    equal) escalated, and its vote raised DracoDecodeError naming the group and its helper, honest all three,
    where a GradScaler would have skipped the step."""
    code = ReactiveRepetitionCode(6, 1)
    code.noise_floor = 1e-7
    received = _group_sums(code)
    received[0], received[1] = _overflowed(received[0], 0), _overflowed(received[1], 1)
    assert code.detect(received) == [True, True, True]
    assert not bool(torch.isfinite(code.decode(received).total).all())


@pytest.mark.parametrize("third", ["overflowed", "finite", "liar"])
def test_a_group_with_s_plus_1_noisy_overflowed_copies_is_not_finite_and_names_nobody(third):
    """Before: its vote raised DracoDecodeError naming the group's three holders (step 0 of a float16 run whose
    first scale overflows, with replicas that are not bitwise equal). An honest one of the s+1 non-finite copies
    makes the group's value non-finite: the step is not applied, whatever the third copy says."""
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    third_copy = {"overflowed": _overflowed(sums[0], 2), "finite": sums[0] * (1 + 2e-7), "liar": -100 * sums[0]}
    copies = torch.stack([_overflowed(sums[0], 0), _overflowed(sums[0], 1), third_copy[third]])
    result = code.settle({1: sums[2], 2: sums[4]}, {0: copies}, 0)
    assert result.faulty == []
    assert not bool(torch.isfinite(result.total).all())


def test_an_overflowed_group_beside_a_voted_one_leaves_that_groups_liar_named():
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    overflowed = torch.stack([_overflowed(sums[0], 0), _overflowed(sums[0], 1), _overflowed(sums[0], 2)])
    lied, _ = _copies(code, sums, 1, 0, {3: -100 * sums[2]})
    assert code.settle({2: sums[4]}, {0: overflowed, 1: lied}, 0).faulty == [3]


def test_bitwise_equal_overflowed_copies_still_win_the_vote_and_name_the_liar():
    """Replicas that overflowed alike (the CPU's, bit for bit) are a bitwise class: the vote names the liar."""
    code = ReactiveRepetitionCode(6, 1)
    sums = _group_sums(code)
    honest = _overflowed(sums[0], 0)
    copies, _ = _copies(code, sums, 0, 0, {h: honest for h in code.holders(0, 0)} | {1: -honest})
    result = code.settle({1: sums[2], 2: sums[4]}, {0: copies}, 0)
    assert result.faulty == [1]
    assert not bool(torch.isfinite(result.total).all())
