"""Attacks and the adversary simulation, single-process."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lightning_draco import Adversary, DracoStrategy
from lightning_draco.attacks import ATTACKS, get_attack

BUILT_IN = ["reverse", "constant", "gaussian", "sign_flip", "bit_flip", "nan", "inf", "collude"]


def test_every_built_in_attack_is_registered():
    assert set(BUILT_IN) <= set(ATTACKS)


@pytest.mark.parametrize("name", BUILT_IN)
def test_attack_changes_the_vector_and_leaves_the_honest_one_alone(name):
    honest = torch.randn(257)
    before = honest.clone()
    adversary = Adversary(ranks=[1], attack=name, seed=5)
    sent = adversary.corrupt(honest, rank=1, step=3, bucket=0)
    assert torch.equal(honest, before)
    assert sent.shape == honest.shape and sent.dtype == honest.dtype
    assert not torch.equal(sent.view(torch.int32), honest.view(torch.int32))
    again = adversary.corrupt(honest, rank=1, step=3, bucket=0)
    assert torch.equal(sent.view(torch.int32), again.view(torch.int32)), "attacks are reproducible from the seed"


def test_attack_values():
    g = torch.tensor([1.0, -2.0])
    assert torch.equal(get_attack("reverse")(g), torch.tensor([-100.0, 200.0]))
    assert torch.equal(get_attack("constant")(g), torch.tensor([-100.0, -100.0]))
    assert torch.equal(get_attack("sign_flip")(g), -g)
    assert math.isnan(float(get_attack("nan")(g)[0])) and math.isinf(float(get_attack("inf")(g)[1]))


def test_bit_flip_changes_exactly_the_flipped_bits():
    honest = torch.randn(1000)
    sent = Adversary(ranks=[1], attack="bit_flip", num_flips=3).corrupt(honest, rank=1, step=0, bucket=0)
    xor = honest.view(torch.int32) ^ sent.view(torch.int32)
    flipped = sum(bin(int(v) & 0xFFFFFFFF).count("1") for v in xor[xor != 0])
    assert 1 <= flipped <= 3


def test_colluders_send_the_same_vector():
    honest = torch.randn(64)
    adversary = Adversary(ranks=[1, 2], attack="collude")
    a = adversary.corrupt(honest, rank=1, step=7, bucket=2)
    b = adversary.corrupt(honest, rank=2, step=7, bucket=2)
    assert torch.equal(a, b) and not torch.equal(a, honest)


def test_user_attack_gets_the_context_it_asks_for():
    seen = {}

    def my_attack(honest, *, step, rank):
        seen.update(step=step, rank=rank)
        return honest + 1

    sent = Adversary(ranks=[2], attack=my_attack).corrupt(torch.zeros(3), rank=2, step=9, bucket=1)
    assert torch.equal(sent, torch.ones(3)) and seen == {"step": 9, "rank": 2}


def test_random_ranks_are_fresh_reproducible_and_never_the_ps():
    adversary = Adversary(ranks="random", seed=11)
    picks = [adversary.lying_ranks(step, 7, ps_rank=0, num_adversaries=2) for step in range(50)]
    assert all(len(p) == 2 and 0 not in p for p in picks)
    assert len(set(picks)) > 5
    assert picks == [adversary.lying_ranks(step, 7, 0, 2) for step in range(50)]
    # Pinned: a run with a random liar draws the same ranks as in earlier versions, whichever rank is the PS.
    assert [sorted(p) for p in picks[:6]] == [[3, 4], [2, 5], [4, 5], [2, 5], [2, 4], [4, 5]]
    assert [sorted(adversary.lying_ranks(step, 7, 3, 2)) for step in range(6)] == [
        [2, 4], [1, 5], [4, 5], [1, 5], [1, 4], [4, 5]]


def test_without_a_trusted_rank_every_rank_is_named_or_drawn():
    """Sharded decoding has no parameter server: ps_rank=None, and rank 0 lies like any other rank."""
    assert Adversary(ranks=[0]).check(6, None, 1) == []
    assert Adversary(ranks="random", count=6).check(6, None, 6) == []
    adversary = Adversary(ranks="random", seed=11)
    picks = [adversary.lying_ranks(step, 7, None, 2) for step in range(50)]
    assert all(len(p) == 2 for p in picks) and set().union(*picks) == set(range(7))
    assert Adversary(ranks="random", count=7).lying_ranks(0, 7, None, 1) == frozenset(range(7))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ranks="some"), 'adversary ranks must be a list of ranks or "random"'),
        (dict(ranks=[-1]), "adversary ranks must be non-negative integers"),
        (dict(ranks=[1, 1]), "adversary ranks must be distinct"),
        (dict(attack="melt"), "attack must be one of"),
    ],
)
def test_bad_adversaries_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Adversary(**kwargs)


def test_attack_returning_wrong_shape_is_an_error():
    adversary = Adversary(ranks=[1], attack=lambda honest: honest[:1])
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        adversary.corrupt(torch.zeros(4), rank=1, step=0, bucket=0)


# -- adaptive attacks (issue 13): optimal ALIE and IPM, mimic, label flipping --------------------------

from lightning_draco.aggregators import make_aggregator  # noqa: E402
from lightning_draco.attacks.adaptive import search_factor  # noqa: E402
from lightning_draco.codes import FractionalRepetitionCode  # noqa: E402
from lightning_draco.aggregators.coded import AggregatedCode  # noqa: E402
from lightning_draco.codes.uncoded import Uncoded  # noqa: E402
from lightning_draco.exchange import ExchangeSetup, ExchangeState  # noqa: E402
from lightning_draco.exchange.adversarial import simulated_defence  # noqa: E402
from lightning_draco.strategy.coded_step import CodedStep  # noqa: E402


def honest_workers(n=9, d=400, seed=0, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=gen) + spread * torch.randn(n, d, generator=gen)


def sent_by(name, vectors, liars, defence, **options):
    adversary = Adversary(ranks=list(liars), attack=name, **options)
    return adversary.corrupt(vectors[liars[0]], rank=liars[0], step=0, bucket=0, honest_vectors=vectors,
                             liars=tuple(liars), defence=defence, honest_mean=vectors.mean(0),
                             honest_std=vectors.std(0, unbiased=False))


def moved(rule, vectors, liars, lie):
    received = vectors.clone()
    received[list(liars)] = lie
    return float((rule(received) - rule(vectors)).norm())


def test_search_factor_finds_the_maximum_of_a_peaked_objective():
    for peak in (0.003, 0.7, 4.2, 19.0):
        found = search_factor(lambda x: -abs(x - peak), 20.0, grid=16, refine=12)
        assert abs(found - peak) <= 0.05 * peak + 1e-3, (peak, found)
    assert search_factor(lambda x: 0.0, 20.0, 16, 10) == 0.0  # nothing to gain: no lie
    with pytest.raises(ValueError, match="grid >= 2"):
        search_factor(lambda x: x, 1.0, 1, 0)


@pytest.mark.parametrize("rule_name", ["median", "trimmed_mean", "krum", "geometric_median", "meamed", "centered_clipping"])
def test_optimal_alie_moves_each_rule_at_least_as_far_as_alie(rule_name):
    vectors, liars = honest_workers(), [7, 8]
    rule = make_aggregator(rule_name, 2, **({"tau": 10.0} if rule_name == "centered_clipping" else {}))
    defence = lambda received: make_aggregator(rule_name, 2, **({"tau": 10.0} if rule_name == "centered_clipping" else {}))(received)  # noqa: E731
    fixed = sent_by("alie", vectors, liars, defence)
    optimal = sent_by("optimal_alie", vectors, liars, defence)
    assert moved(rule, vectors, liars, optimal) >= moved(rule, vectors, liars, fixed) - 1e-6
    assert moved(rule, vectors, liars, optimal) > 0.2 * float(vectors.std(0).norm()) / 3, "a visible bias"


@pytest.mark.parametrize("rule_name", ["median", "trimmed_mean", "mean"])
def test_optimal_ipm_moves_each_rule_at_least_as_far_as_ipm(rule_name):
    vectors, liars = honest_workers(spread=0.3), [7, 8]
    rule = make_aggregator(rule_name, 2)
    fixed = sent_by("ipm", vectors, liars, rule)
    optimal = sent_by("optimal_ipm", vectors, liars, rule)
    assert moved(rule, vectors, liars, optimal) > moved(rule, vectors, liars, fixed)


def test_optimal_attacks_gain_nothing_against_draco():
    """Against FRC's vote every candidate is caught: the decode is exactly the honest one."""
    code = FractionalRepetitionCode(9, 1)
    gen = torch.Generator().manual_seed(3)
    partitions = torch.randn(9, 300, generator=gen)
    coded = torch.stack([partitions[code.partitions(w)].sum(0) for w in range(9)])
    defence = lambda received: code.decode(received).total / 9  # noqa: E731
    for name in ("optimal_alie", "optimal_ipm", "mimic"):
        received = coded.clone()
        received[4] = sent_by(name, coded, [4], defence)
        result = code.decode(received)
        assert result.faulty == [4] and torch.equal(result.total, code.decode(coded).total), name


def test_mimic_copies_one_honest_worker_and_krum_then_returns_it():
    vectors, liars = honest_workers(spread=2.0), [7, 8]
    assert torch.equal(sent_by("mimic", vectors, liars, None), vectors[0])
    assert torch.equal(sent_by("mimic", vectors, liars, None, target=3), vectors[3])
    received = vectors.clone()
    received[liars] = vectors[3]
    # f + 1 identical vectors: Krum's smallest score is the mimicked worker's, whatever the others say.
    assert torch.equal(make_aggregator("krum", 2)(received), vectors[3])
    with pytest.raises(ValueError, match=r"attack 'mimic': target must be a rank in \[0, 9\)"):
        sent_by("mimic", vectors, liars, None, target=9)


def test_the_liars_defence_is_the_ps_decode_without_side_effects():
    clipping = make_aggregator("centered_clipping", 1, tau=1.0)
    code = AggregatedCode(Uncoded(5, 0), clipping)
    state = ExchangeState(ExchangeSetup(code, rank=2, ps_rank=0))
    adversary = Adversary(ranks=[2], attack="optimal_alie")
    received = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    clipping.anchor = torch.ones(7)
    first = simulated_defence(state, adversary, received, 0)
    assert torch.equal(clipping.anchor, torch.ones(7)), "the anchor is restored"
    assert torch.equal(simulated_defence(state, adversary, received, 0), first)
    fresh = make_aggregator("centered_clipping", 1, tau=1.0)
    fresh.anchor = torch.ones(7)
    torch.testing.assert_close(first, fresh(received))  # what the PS would return, from the same anchor
    frc = ExchangeState(ExchangeSetup(FractionalRepetitionCode(3, 1), rank=1, ps_rank=0))
    two_liars = Adversary(ranks=[1, 2], attack="optimal_alie")
    assert simulated_defence(frc, two_liars, torch.randn(3, 4), 0) is None, "two of three replicas disagreeing: decode fails"


def test_label_flip_flips_labels_and_checks_them():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 9])
    adversary = Adversary(ranks=[1], attack="label_flip", num_classes=10)
    assert adversary.acts_on_batch and not adversary.omniscient
    px, py = adversary.poison((x, y), rank=1, step=0)
    assert px is x and torch.equal(py, torch.tensor([9, 8, 7, 0])) and torch.equal(y, torch.tensor([0, 1, 2, 9]))
    assert torch.equal(adversary.poison({"x": x, "label": y}, rank=1, step=0)["label"], 9 - y)
    honest = torch.randn(5)
    assert adversary.corrupt(honest, rank=1, step=0, bucket=0) is honest, "the gradient is sent as computed"
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\)"):
        Adversary(ranks=[1], attack="label_flip", num_classes=3).poison((x, y), rank=1, step=0)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        adversary.poison((x, y.float()), rank=1, step=0)


def _partition_gradients(flip_worker_partitions=()):
    """Per-partition gradients of a linear classifier on fixed data; the given partitions on flipped labels."""
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(3, 5, generator=gen)
    data = torch.randn(9, 16, 5, generator=gen)
    labels = (data @ weight.T).argmax(-1)
    grads = []
    for p in range(9):
        w = torch.zeros(3, 5, requires_grad=True)
        y = labels[p]
        if p in flip_worker_partitions:
            _, y = get_attack("label_flip")((data[p], y), num_classes=3)
        torch.nn.functional.cross_entropy(data[p] @ w.T, y).backward()
        grads.append(w.grad.flatten())
    return torch.stack(grads)


def test_label_flipping_is_caught_by_draco_and_moves_a_robust_rule():
    code = FractionalRepetitionCode(9, 1)
    honest = _partition_gradients()
    liar = 4
    flipped = _partition_gradients(flip_worker_partitions=set(code.partitions(liar)))
    coded = torch.stack([honest[code.partitions(w)].sum(0) for w in range(9)])
    received = coded.clone()
    received[liar] = flipped[code.partitions(liar)].sum(0)
    result = code.decode(received)
    assert result.faulty == [liar] and torch.equal(result.total, code.decode(coded).total)

    # Without redundancy the liar is one of nine plausible gradients: its norm is not an outlier,
    # and the median moves towards it.
    received = honest.clone()
    received[liar] = flipped[liar]
    norms = honest.norm(dim=1)
    assert norms.min() <= flipped[liar].norm() <= norms.max() * 2
    median = make_aggregator("median", 1)
    assert not torch.equal(median(received), median(honest))
    toward = flipped[liar] - honest[liar]
    assert float((median(received) - median(honest)) @ toward) > 0


def test_strategy_poisons_the_liars_batches_only(monkeypatch):
    from lightning.pytorch.strategies import DDPStrategy

    from lightning_draco import DracoStrategy
    from lightning_draco.data import PartitionBatch

    seen = []

    def record(self, batch, *args, **kwargs):
        seen.append(batch[1].clone())
        return (batch[0].sum() * 0 + 1).requires_grad_()

    monkeypatch.setattr(DDPStrategy, "training_step", record)
    monkeypatch.setattr(DracoStrategy, "root_device", property(lambda self: torch.device("cpu")))
    module = SimpleNamespace(trainer=SimpleNamespace(global_step=0), log=lambda *args, **kwargs: None)
    monkeypatch.setattr(DracoStrategy, "lightning_module", property(lambda self: module))
    strategy = DracoStrategy(code="frc", num_adversaries=1, adversary=dict(ranks=[1], attack="label_flip", num_classes=3))
    strategy.code = FractionalRepetitionCode(3, 1)
    strategy.seed = 0
    strategy._exchange = ExchangeState(ExchangeSetup(strategy.code, rank=1, ps_rank=0))
    strategy._coded_step = CodedStep(strategy.code, rank=1, seed=0, device=torch.device("cpu"))
    y = torch.tensor([0, 1, 2])
    batch = PartitionBatch(batches=[(torch.ones(3, 2), y)] * 3, partitions=[0, 1, 2], epoch=0, index=0)
    for rank, expected in ((1, 2 - y), (2, y)):
        seen.clear()
        monkeypatch.setattr(DracoStrategy, "global_rank", property(lambda self, r=rank: r))
        strategy.training_step(batch, 0)
        assert len(seen) == 3 and all(torch.equal(s, expected) for s in seen), rank


@pytest.mark.parametrize("attack, options, message", [
    ("gaussian", {"sgima": 3}, "attack 'gaussian' has no option 'sgima': its options are sigma."),
    ("reverse", {"step": 1}, "attack 'reverse' has no option 'step': its options are scale."),
    ("nan", {"scale": 2}, "attack 'nan' has no option 'scale': its options are none."),
])
def test_an_option_the_attack_does_not_take_is_refused_when_the_adversary_is_made(attack, options, message):
    # Otherwise the first step fails on the liar alone, and the other ranks see a lost connection.
    with pytest.raises(ValueError, match=re.escape(message)):
        Adversary(ranks=[1], attack=attack, **options)
    with pytest.raises(ValueError, match=re.escape(message)):
        DracoStrategy(adversary={"ranks": [1], "attack": attack, **options})


@pytest.mark.parametrize("attack, options, message", [
    ("alie", {"z": "abc"}, "attack 'alie': z must be a number (got 'abc')."),
    ("reverse", {"scale": True}, "attack 'reverse': scale must be a number (got True)."),
    ("bit_flip", {"num_flips": 0}, "attack 'bit_flip': num_flips must be an integer >= 1 (got 0)."),
    ("bit_flip", {"num_flips": 1.5}, "attack 'bit_flip': num_flips must be an integer >= 1 (got 1.5)."),
    ("sparse", {"pairs": 0}, "attack 'sparse': pairs must be an integer >= 1 (got 0)."),
    ("label_flip", {"num_classes": 1}, "attack 'label_flip': num_classes must be an integer >= 2 (got 1)."),
    ("optimal_alie", {"grid": 1}, "attack 'optimal_alie': grid must be an integer >= 2 (got 1)."),
    ("optimal_ipm", {"eps_max": 0}, "attack 'optimal_ipm': eps_max must be a number > 0 (got 0)."),
    ("mimic", {"target": -1}, "attack 'mimic': target must be a rank (an integer >= 0) or None (got -1)."),
])
def test_an_option_value_the_attack_cannot_use_is_refused_when_the_adversary_is_made(attack, options, message):
    """Some would fail the first step on the liar alone; others (no bit flipped) would silently send no lie."""
    with pytest.raises(ValueError, match=re.escape(message)):
        Adversary(ranks=[1], attack=attack, **options)


def test_the_options_an_attack_takes_are_accepted_and_a_catch_all_takes_any():
    assert Adversary(ranks=[1], attack="gaussian", sigma=2.0).options == {"sigma": 2.0}

    def shrink(honest, *, scale=1):  # an integer default still takes any number
        return honest * scale

    assert Adversary(ranks=[1], attack=shrink, scale=0.5).options == {"scale": 0.5}

    def anything(honest, **context):
        return honest

    assert Adversary(ranks=[1], attack=anything, strength=3).options == {"strength": 3}


@pytest.mark.distributed
def test_the_omniscient_liars_learn_the_honest_spread_where_it_is_small_next_to_the_mean(dtype="bfloat16"):
    """E[x^2] - mean^2 cancelled to 0 in bfloat16 wherever the mean was ~100 spreads; the squares about the mean do not."""
    script = Path(__file__).parent / "exchange" / "knowledge_world.py"
    job = subprocess.run([sys.executable, str(script), dtype], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert job.returncode == 0, job.stderr[-3000:]
    learnt = json.loads(job.stdout.strip().splitlines()[-1])
    assert learnt["spread"] > 0.5
    assert learnt["mean_error"] < 1e-3 and learnt["std_error"] < 1e-4 * learnt["spread"]
