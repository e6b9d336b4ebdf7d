"""FractionalRepetitionCode on its own: assignment, encoding, and decoding under any <= s corrupted rows."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lightning_draco.codes import DracoDecodeError, FractionalRepetitionCode, accumulation_dtype, make_code
from lightning_draco.codes.frc import MAX_NOISE, NOISE_MARGIN, relative_distances

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def encode(code, partition_grads):
    """What honest workers send: each combines its partitions' gradients with the same operations."""
    rows = []
    for worker in range(code.num_workers):
        coded = torch.zeros_like(partition_grads[0])
        for weight, partition in zip(code.coefficients(worker), code.partitions(worker)):
            coded = coded + weight * partition_grads[partition]
        rows.append(coded)
    return torch.stack(rows)


def flip_low_bit(row):
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[row.element_size()]
    out = row.clone()
    out.view(bits)[0] ^= 1
    return out


def relative_distance(a, b):
    """||a - b|| / max(||a||, ||b||) in float64; infinite when either is not finite."""
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    return float((a - b).norm()) / max(float(a.norm()), float(b.norm()), 1e-300)


CORRUPTIONS = {
    "nan": lambda honest, other: torch.full_like(honest, math.nan),
    "inf": lambda honest, other: torch.full_like(honest, -math.inf),
    "huge": lambda honest, other: torch.full_like(honest, 1e30 if honest.dtype != torch.float16 else 6e4),
    "low_bit": lambda honest, other: flip_low_bit(honest),
    "reverse": lambda honest, other: -100 * honest,
    "other_group": lambda honest, other: other.clone(),
    "zero": lambda honest, other: torch.zeros_like(honest),
}


def test_assignment_and_encoding_matrix():
    code = FractionalRepetitionCode(6, 1)
    assert code.redundancy == 3
    assert [code.partitions(w) for w in range(6)] == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3
    expected = torch.zeros(6, 6, dtype=torch.float64)
    expected[:3, :3] = 1
    expected[3:, 3:] = 1
    assert torch.equal(code.encoding_matrix, expected)
    assert code.coefficients(4) == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "args, message",
    [
        ((6, -1), "num_adversaries must be an integer >= 0"),
        ((6, 1, 2), "redundancy must be at least 2 * num_adversaries + 1 = 3"),
        ((8, 1, 3), "needs the redundancy r=3 to divide the number of workers (8)"),
        ((2, 1, 3), "the number of workers (2) must be at least the redundancy r=3"),
    ],
)
def test_invalid_parameters_are_refused(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*").replace("+", r"\+")):
        FractionalRepetitionCode(*args)


def test_zero_adversaries_is_plain_sum():
    code = make_code("frc", 4, 0)
    grads = torch.randn(4, 7)
    result = code.decode(encode(code, grads))
    assert code.redundancy == 1 and result.faulty == []
    torch.testing.assert_close(result.total, grads.sum(0))


@st.composite
def scenarios(draw):
    s = draw(st.integers(0, 3))
    r = 2 * s + 1 + draw(st.sampled_from([0, 0, 0, 1]))
    groups = draw(st.integers(1, 4))
    workers = r * groups
    d = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    liars = draw(st.lists(st.integers(0, workers - 1), max_size=s, unique=True))
    kinds = [draw(st.sampled_from(sorted(CORRUPTIONS) + ["collude"])) for _ in liars]
    seed = draw(st.integers(0, 2**31))
    chunk = draw(st.sampled_from([1, 3, 16, 1 << 20]))
    batched = draw(st.booleans())
    return s, r, workers, d, dtype, liars, kinds, seed, chunk, batched


@given(scenarios())
def test_decode_recovers_total_and_names_exactly_the_liars(case):
    s, r, workers, d, dtype, liars, kinds, seed, chunk, batched = case
    code = FractionalRepetitionCode(workers, s, r, chunk_size=chunk, batched=batched)
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(workers, d, generator=gen, dtype=torch.float64).to(dtype)
    honest = encode(code, grads)
    received = honest.clone()
    wrong_for_colluders = {}
    for liar, kind in zip(liars, kinds):
        other = honest[(liar + r) % workers]
        if kind == "collude":
            group = code.group_of(liar)
            wrong = wrong_for_colluders.setdefault(group, torch.randn(d, generator=gen).to(dtype) * 7)
            received[liar] = wrong
        else:
            received[liar] = CORRUPTIONS[kind](honest[liar], other)
    result = code.decode(received)
    # Honest replicas are bitwise equal and no tolerance is declared: any difference is a lie, a single
    # flipped low bit included.
    truly_different = sorted(
        w for w in liars if not torch.equal(received[w].view(torch.uint8), honest[w].view(torch.uint8))
    )
    assert result.faulty == truly_different
    # Exactly what the honest group sums add up to, in the decoder's accumulation dtype.
    expected = honest[::r].sum(0, dtype=accumulation_dtype(dtype))
    assert torch.equal(result.total, expected)


def test_result_is_bitwise_the_clean_result_whoever_lies():
    code = FractionalRepetitionCode(9, 1)
    grads = torch.randn(9, 1000)
    honest = encode(code, grads)
    clean = code.decode(honest).total
    for liar in range(9):
        received = honest.clone()
        received[liar] = float("nan")
        result = code.decode(received)
        assert torch.equal(result.total, clean) and result.faulty == [liar]


def test_more_than_s_liars_in_a_group_raise_with_the_group_and_ranks():
    code = FractionalRepetitionCode(6, 1)
    received = encode(code, torch.randn(6, 5))
    received[4] = 1.0
    received[5] = 2.0
    with pytest.raises(DracoDecodeError, match=r"group 1 \(workers \[3, 4, 5\]\)") as info:
        code.decode(received)
    assert info.value.suspects == [3, 4, 5]


def test_two_conflicting_majorities_raise():
    code = FractionalRepetitionCode(4, 1, redundancy=4)
    received = encode(code, torch.randn(4, 3))
    received[2:] = 5.0
    with pytest.raises(DracoDecodeError, match="2 different values each sent by at least s\\+1=2 members"):
        code.decode(received)


def test_tolerance_fallback_when_replicas_are_not_bitwise_equal():
    code = FractionalRepetitionCode(3, 1, tolerance=1e-5)
    honest = torch.randn(1, 100, generator=torch.Generator().manual_seed(0)).repeat(3, 1)
    received = honest.clone()
    received[0, 0] += 1e-6 * honest[0].norm()  # non-deterministic kernel: close, not equal
    received[1, 5] += 1e-7 * honest[0].norm()
    received[2] = -100 * honest[2]
    result = code.decode(received)
    assert result.faulty == [2]
    # The winner is one of the agreeing replicas: within tolerance of the honest vector, as documented.
    assert float((result.total - honest[0]).norm()) <= 1e-5 * float(honest[0].norm())
    strict = FractionalRepetitionCode(3, 1, tolerance=0)
    with pytest.raises(DracoDecodeError, match="tolerance=0 allows no approximate agreement"):
        strict.decode(received)


def test_honest_nan_is_not_blamed_on_anyone():
    code = FractionalRepetitionCode(6, 1)
    received = encode(code, torch.randn(6, 4))
    received[:3, 1] = float("nan")  # the whole group agrees on a NaN: the model diverged
    result = code.decode(received)
    assert result.faulty == [] and torch.isnan(result.total[1])


def test_decode_does_not_modify_its_input_and_checks_shape():
    code = FractionalRepetitionCode(3, 1)
    received = torch.randn(1, 8).repeat(3, 1)
    received[2] = float("nan")
    before = received.clone()
    code.decode(received)
    assert torch.equal(received.view(torch.int32), before.view(torch.int32))
    with pytest.raises(ValueError, match=r"received must have shape \(num_workers=3, d\)"):
        code.decode(torch.randn(4, 8))


def test_located_error_keeps_its_message_and_fields_through_pickle():
    import pickle

    err = DracoDecodeError("group 1 is split", [3, 4, 5]).at(step=7, bucket=2)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "DRACO decode failed at step 7, bucket 2: group 1 is split"
    assert (again.reason, again.suspects, again.step, again.bucket) == ("group 1 is split", [3, 4, 5], 7, 2)


def test_liars_inside_some_honest_replicas_radius_neither_win_nor_make_the_decode_raise():
    """s=2: three noisy honest replicas; two liars who know them sit within the radius of two of them
    and outside the third's. The old vote treated the third as a rival majority and raised."""
    code = FractionalRepetitionCode(5, 2, tolerance=1e-5)
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2000, dtype=torch.float64, generator=gen)
    noise = [torch.randn(2000, dtype=torch.float64, generator=gen) for _ in range(3)]
    honest = [base + 4e-6 * float(base.norm()) * n / n.norm() for n in noise]
    lie = (honest[0] + honest[1]) / 2 - 0.7e-5 * float(base.norm()) * noise[2] / noise[2].norm()
    for trial in range(20):
        order = torch.randperm(5, generator=gen).tolist()
        rows = [honest[0], honest[1], honest[2], lie, lie]
        received = torch.stack([rows[i] for i in order]).float()
        liars = {order.index(3), order.index(4)}
        result = code.decode(received)
        assert not (set(result.faulty) - liars), "an honest replica was named"
        assert float((result.total.double() - base).norm()) <= 2e-5 * float(base.norm())


def test_noise_floor_is_measured_from_the_replicas_themselves():
    """Replicas 1e-4 apart (non-deterministic kernels) agree though tolerance is 1e-5; a liar 1e-1 off is named."""
    code = FractionalRepetitionCode(3, 1, tolerance=1e-5)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(500, generator=gen, dtype=torch.float64)
    received = torch.stack([base + 1e-4 * base.norm() * torch.randn(500, generator=gen, dtype=torch.float64) / 22
                            for _ in range(3)])
    result = code.decode(received.float())
    assert result.faulty == []
    received[1] = base * 1.1
    result = code.decode(received.float())
    assert result.faulty == [1]

# -- replicas that are not bitwise equal (non-deterministic kernels), against at most s liars ------------
#
# Issue 10's red-team findings on the repetition code: (a) the bitwise path named a noisy honest replica
# that differed from a bitwise class; (b) with r > 2s+1 two classes of honest replicas made the decode
# raise. The property test below searches for the same breaks: with at most s liars, no raise, no honest
# rank named, every liar farther than the radius from the honest values named, and the total exact when
# honest replicas are bitwise equal.


def noisy(base, level, gen):
    """``base`` moved by exactly ``level * ||base||`` in a random direction (float64)."""
    direction = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    return base + level * float(base.norm()) * direction / direction.norm()


def relative(a, b):
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    scale = max(float(a.norm()), float(b.norm()), 1e-300)
    return float((a - b).norm()) / scale


# -- finding (a): the bitwise class path named noisy honest replicas ------------------------------------


def test_a_replica_a_rounding_off_the_bitwise_class_is_named_only_without_a_declared_tolerance():
    """Two replicas equal bit for bit, the third one rounding step away. With one group the data cannot
    tell a non-deterministic reduction from a flipped low bit: with no tolerance given (deterministic
    kernels, the default) it is a lie and named; with a declared tolerance it is within it and spared.
    Either way the total is the bitwise class's value."""
    base = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    received = base.repeat(3, 1)
    received[2, 7] = torch.nextafter(received[2, 7], torch.tensor(math.inf))
    for tolerance, named in [(None, [2]), (1e-5, [])]:
        result = FractionalRepetitionCode(3, 1, tolerance=tolerance).decode(received)
        assert result.faulty == named
        assert torch.equal(result.total, base)


def test_noise_measured_in_other_groups_keeps_a_bitwise_class_from_naming_an_honest_replica():
    """Every group's replicas differ by about 1e-4 (TF32, atomics): ten times the tolerance. In group 0 two of
    them happen to be bitwise equal; the third must not be named for differing from them. A liar sending
    -100x in group 2 is named. No tolerance is given: the noise measured in the other groups spares it."""
    code = FractionalRepetitionCode(9, 1)
    gen = torch.Generator().manual_seed(3)
    bases = [torch.randn(4000, generator=gen, dtype=torch.float64) for _ in range(3)]
    rows = [noisy(bases[g], 1e-4, gen) for g in range(3) for _ in range(3)]
    rows[1] = rows[0].clone()
    rows[7] = -100 * rows[7]
    result = code.decode(torch.stack(rows).float())
    assert result.faulty == [7]
    assert relative(result.total, sum(bases)) < 1e-3


def test_a_liar_within_the_noise_is_not_named_and_moves_nothing_when_a_bitwise_class_wins():
    code = FractionalRepetitionCode(3, 1, tolerance=1e-5)
    base = torch.randn(500, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    received = torch.stack([base, base, noisy(base, 3e-6, torch.Generator().manual_seed(5))])
    result = code.decode(received)
    assert result.faulty == [] and torch.equal(result.total, base)
    received[2] = noisy(base, 3e-3, torch.Generator().manual_seed(5))  # beyond tolerance, and no noise anywhere
    assert code.decode(received).faulty == [2]


def test_strict_tolerance_names_every_difference():
    """tolerance=0 declares replicas bitwise equal: a member one rounding step off is named."""
    code = FractionalRepetitionCode(3, 1, tolerance=0)
    base = torch.randn(100, generator=torch.Generator().manual_seed(6))
    received = base.repeat(3, 1)
    received[1, 0] = torch.nextafter(received[1, 0], torch.tensor(math.inf))
    result = code.decode(received)
    assert result.faulty == [1] and torch.equal(result.total, base)


# -- finding (b): with r > 2s+1, two classes of honest replicas made the decode raise ----------------


def test_two_bitwise_classes_of_honest_replicas_do_not_raise():
    """r=4, s=1: replicas {A, A, B, B} with A, B 1e-4 apart (no liar) were taken for two majorities."""
    code = FractionalRepetitionCode(4, 1, redundancy=4, tolerance=1e-5)
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(3000, generator=gen, dtype=torch.float64)
    a, b = noisy(base, 5e-5, gen), noisy(base, 5e-5, gen)
    result = code.decode(torch.stack([a, a, b, b]).float())
    assert result.faulty == []
    assert torch.equal(result.total, a.float()) or torch.equal(result.total, b.float())


def test_two_honest_classes_and_a_liar_do_not_raise_and_only_the_liar_is_named():
    code = FractionalRepetitionCode(5, 1, redundancy=5, tolerance=1e-5)
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(3000, generator=gen, dtype=torch.float64)
    a, b = noisy(base, 5e-5, gen), noisy(base, 5e-5, gen)
    for liar in range(5):
        rows = [a, a, b, b]
        rows.insert(liar, -100 * base)
        result = code.decode(torch.stack(rows).float())
        assert result.faulty == [liar]
        assert relative(result.total, base) < 1e-3


def test_two_classes_far_apart_still_mean_more_than_s_liars():
    code = FractionalRepetitionCode(4, 1, redundancy=4)
    base = torch.randn(50, generator=torch.Generator().manual_seed(9))
    with pytest.raises(DracoDecodeError, match=r"2 different values each sent by at least s\+1=2 members"):
        code.decode(torch.stack([base, base, -base, -base]))


# -- the property: at most s liars, honest replicas with or without noise ------------------------------

LIES = ["negate", "nan", "inf", "copy_honest", "copy_other_group", "between_honest", "small", "medium", "large",
        "signed_zero"]


@st.composite
def noisy_scenarios(draw):
    s = draw(st.integers(1, 2))
    r = 2 * s + 1 + draw(st.sampled_from([0, 0, 1, 2]))
    groups = draw(st.integers(1, 3))
    workers = r * groups
    noise = draw(st.sampled_from([0.0, 0.0, 2e-6, 1e-4, 1e-3]))
    liars = draw(st.lists(st.integers(0, workers - 1), max_size=s, unique=True))
    lies = [draw(st.sampled_from(LIES)) for _ in liars]
    copies = draw(st.lists(st.tuples(st.integers(0, workers - 1), st.integers(0, r - 1)), max_size=3))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]))
    seed = draw(st.integers(0, 2**31))
    chunk = draw(st.sampled_from([7, 1 << 20]))
    declared = draw(st.booleans())
    return s, r, groups, noise, liars, lies, copies, dtype, seed, chunk, declared


@given(noisy_scenarios())
def test_decode_with_at_most_s_liars_among_noisy_replicas(case):
    s, r, groups, noise, liars, lies, copies, dtype, seed, chunk, declared = case
    d = 48
    workers = r * groups
    code = FractionalRepetitionCode(workers, s, r, tolerance=1e-5 if declared else None, chunk_size=chunk)
    gen = torch.Generator().manual_seed(seed)
    bases = [torch.randn(d, generator=gen, dtype=torch.float64) for _ in range(groups)]
    honest = [noisy(bases[w // r], noise, gen) if noise else bases[w // r].clone() for w in range(workers)]
    # Coincidences: two honest replicas of a group computed bit for bit alike.
    for w, m in copies:
        honest[w] = honest[(w // r) * r + m].clone()
    honest = [h.to(dtype) for h in honest]
    received = [h.clone() for h in honest]
    for liar, lie in zip(liars, lies):
        g = liar // r
        mates = [honest[g * r + m] for m in range(r) if g * r + m not in liars]
        h = honest[liar].double()
        lie_value = {
            "negate": lambda: -100 * h,
            "nan": lambda: torch.full_like(h, math.nan),
            "inf": lambda: torch.full_like(h, -math.inf),
            "copy_honest": lambda: mates[seed % len(mates)].double(),
            "copy_other_group": lambda: honest[(liar + r) % workers].double(),
            "between_honest": lambda: (mates[0].double() + mates[-1].double()) / 2,
            "small": lambda: noisy(h, 3e-6, gen),
            "medium": lambda: noisy(h, 3e-4, gen),
            "large": lambda: noisy(h, 0.05, gen),
            "signed_zero": lambda: torch.where(h == 0, -h, h),
        }[lie]()
        received[liar] = lie_value.to(dtype)
    honest_workers = [w for w in range(workers) if w not in liars]
    spread = max(
        (relative(honest[a], honest[b]) for a in honest_workers for b in honest_workers if a // r == b // r),
        default=0.0,
    )
    # The radii the decoder may use: at most the tolerance (or half precision's rounding unit) or
    # NOISE_MARGIN honest spreads.
    least = code.least_radius(dtype)
    radius_bound = max(least, min(NOISE_MARGIN * spread, MAX_NOISE))
    # Where the noise is measurable, so that no honest rank may be named: no noise; a declared tolerance
    # that covers it; or a group without liars whose replicas all differ by at least 1/NOISE_MARGIN of the
    # spread (its estimate, a k-th nearest distance, is at least their smallest distance).
    clean = [[w for w in honest_workers if w // r == g] for g in range(groups) if not any(w // r == g for w in liars)]
    shown = any(
        min(relative(honest[a], honest[b]) for a in group for b in group if a < b) * NOISE_MARGIN >= spread
        for group in clean
    )
    assume(spread == 0 or (declared and spread <= least) or shown)

    result = code.decode(torch.stack(received))  # never raises with at most s liars

    named = set(result.faulty)
    assert not named - set(liars), f"honest ranks named: {sorted(named - set(liars))}"
    for liar in liars:
        g = liar // r
        nearest = min(relative(received[liar], honest[g * r + m]) for m in range(r) if g * r + m not in liars)
        if nearest > radius_bound * 1.01:
            assert liar in named, f"liar {liar} ({lies[liars.index(liar)]}, {nearest:.2g} off) not named"
    acc = accumulation_dtype(dtype)
    if noise == 0 and not copies:
        expected = torch.zeros(d, dtype=acc)
        for g in range(groups):
            expected = expected + honest[g * r + [m for m in range(r) if g * r + m not in liars][0]].to(acc)
        assert torch.equal(result.total.view(torch.uint8), expected.view(torch.uint8))
    else:
        # Each group's term is within the radius of an honest replica, itself within the spread of the others.
        first_honest = [honest[min(w for w in honest_workers if w // r == g)].double() for g in range(groups)]
        exact = sum(first_honest)
        error = float((result.total.double() - exact).norm())
        bound = sum(float(h.norm()) for h in first_honest) * (radius_bound + spread) * 1.1 + 1e-5 * float(exact.norm())
        assert error <= bound


@pytest.mark.parametrize("scale", [1.0, 1e-20, 1e30])
def test_relative_distances_hold_for_tiny_and_huge_members(scale):
    """Distances are float32 differences with float64 sums; blocks whose squares would under- or overflow
    float32 (members around 1e-20, 1e30) are measured again in float64, so a lie of 4e-4 reads as 4e-4."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5000, dtype=torch.float64, generator=gen)
    members = base.clone()
    members[1] = base[0] * (1 + 4e-4)
    members[2] = base[0]
    relative, finite = relative_distances((members * scale).float(), chunk_size=1024)
    assert bool(finite.all())
    assert float(relative[0, 1]) == pytest.approx(4e-4 / (1 + 4e-4), rel=1e-3)
    assert float(relative[0, 2]) == 0.0
    zeros, _ = relative_distances(torch.zeros(3, 5000), chunk_size=1024)
    assert float(zeros.abs().max()) == 0.0


@st.composite
def blockwise_scenarios(draw):
    """Groups whose members lie in some blocks only, or carry kernel noise everywhere: the inputs that
    reach the block-wise vote (no whole-row majority), more liars than s included."""
    s = draw(st.integers(1, 2))
    r = 2 * s + 1
    groups = draw(st.integers(1, 3))
    chunk = draw(st.integers(1, 6))
    d = draw(st.integers(1, 30))
    dtype = draw(st.sampled_from(DTYPES))
    blocks = -(-d // chunk)
    members = [
        (g * r + m, draw(st.sampled_from(["honest", "honest", "blocks", "noise", "nan"])),
         draw(st.lists(st.integers(0, blocks - 1), min_size=1, max_size=blocks, unique=True)))
        for g in range(groups) for m in range(r)
    ]
    return s, r, groups, chunk, d, dtype, members, draw(st.integers(0, 2**31))


@given(blockwise_scenarios())
def test_the_batched_block_comparison_gives_the_block_by_block_outcome(case):
    """Off the CPU the block-wise vote compares every block of every pair in one batch (one host sync):
    it must give the totals, names and errors of the block-by-block comparisons, bit for bit."""
    s, r, groups, chunk, d, dtype, members, seed = case
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(groups, 1, d, generator=gen, dtype=torch.float64).to(dtype).repeat(1, r, 1).reshape(-1, d)
    received = honest.clone()
    for worker, kind, lied in members:
        for b in lied if kind in ("blocks", "nan") else []:
            part = slice(b * chunk, (b + 1) * chunk)
            received[worker, part] = float("nan") if kind == "nan" else -3 * received[worker, part] - 1
        if kind == "noise":
            noise = 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)
            received[worker] = (received[worker].double() * (1 + noise)).to(dtype)
    outcomes = []
    for batched in (False, True):
        code = FractionalRepetitionCode(groups * r, s, chunk_size=chunk, batched=batched, fused=False)
        try:
            result = code.decode(received)
            outcomes.append((result.total, result.faulty))
        except DracoDecodeError as err:
            outcomes.append(str(err))
    if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
        assert outcomes[0] == outcomes[1]
        return
    (total, faulty), (batched_total, batched_faulty) = outcomes
    assert batched_faulty == faulty
    # Bit for bit, but for a NaN's payload (more than s liars sending NaN can win a block: the whole-row
    # vote's sum and the block-wise sum widen a half-precision NaN to different float32 payloads).
    nan = torch.isnan(total)
    assert torch.equal(torch.isnan(batched_total), nan)
    assert torch.equal(batched_total[~nan].view(torch.uint8), total[~nan].view(torch.uint8))
