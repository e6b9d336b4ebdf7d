"""Robust aggregators against direct transcriptions of their textbook definitions."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_draco.aggregators import AGGREGATORS, make_aggregator
from lightning_draco.aggregators import coordinatewise

# -- textbook transcriptions: plain Python over lists, one coordinate or one vector at a time ---------


def ref_median(column):
    v = sorted(column)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def ref_trimmed(column, f):
    v = sorted(column)
    kept = v[f : len(v) - f]
    return sum(kept) / len(kept)


def sqdist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def ref_krum_scores(xs, f):
    n = len(xs)
    scores = []
    for i in range(n):
        d = sorted(sqdist(xs[i], xs[j]) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return scores


def ref_krum(xs, f):
    scores = ref_krum_scores(xs, f)
    return xs[scores.index(min(scores))]


def ref_multi_krum(xs, f, m):
    scores = ref_krum_scores(xs, f)
    order = sorted(range(len(xs)), key=lambda i: (scores[i], i))[:m]
    return [sum(xs[i][c] for i in order) / m for c in range(len(xs[0]))]


class Tie(Exception):
    """The definition leaves the choice to an arbitrary order: two smallest scores, or distances, are equal."""


def _unique_smallest(values, count=1):
    ranked = sorted(values)
    if count < len(ranked) and math.isclose(ranked[count - 1], ranked[count], rel_tol=1e-9, abs_tol=1e-12):
        raise Tie


def ref_bulyan(xs, f):
    n = len(xs)
    theta, beta = n - 2 * f, n - 4 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        sub = [xs[i] for i in remaining]
        if len(sub) > f + 2:
            scores = ref_krum_scores(sub, f)
        else:
            scores = [sum(sqdist(a, b) for b in sub) for a in sub]
        _unique_smallest(scores)
        pick = remaining[scores.index(min(scores))]
        chosen.append(pick)
        remaining.remove(pick)
    out = []
    for c in range(len(xs[0])):
        values = [xs[i][c] for i in chosen]
        med = ref_median(values)
        _unique_smallest([abs(v - med) for v in values], beta)
        closest = sorted(values, key=lambda v: abs(v - med))[:beta]
        out.append(sum(closest) / beta)
    return out


def ref_geometric_median(xs, iters=2000):
    z = [ref_median([x[c] for x in xs]) for c in range(len(xs[0]))]
    for _ in range(iters):
        w = [1 / max(math.sqrt(sqdist(x, z)), 1e-12) for x in xs]
        z = [sum(wi * x[c] for wi, x in zip(w, xs)) / sum(w) for c in range(len(xs[0]))]
    return z


def ref_clip(xs, v, tau):
    out = list(v)
    n = len(xs)
    for x in xs:
        diff = [a - b for a, b in zip(x, v)]
        norm = math.sqrt(sum(d * d for d in diff))
        scale = min(1.0, tau / norm) if norm > 0 else 1.0
        for c in range(len(v)):
            out[c] += diff[c] * scale / n
    return out


# -- cases -----------------------------------------------------------------------------------------

@st.composite
def inputs(draw, min_n=1, allow_ties=True):
    n = draw(st.integers(min_n, 9))
    d = draw(st.integers(1, 5))
    ties = allow_ties and draw(st.booleans())
    values = st.sampled_from([-2.0, 0.0, 1.0, 3.0]) if ties else st.floats(-10, 10, allow_nan=False, width=32)
    rows = [[draw(values) for _ in range(d)] for _ in range(n)]
    return rows


def as_tensor(rows):
    return torch.tensor(rows, dtype=torch.float64)


@given(inputs(), st.integers(0, 4))
def test_coordinatewise_rules_match_their_definitions(rows, f):
    n = len(rows)
    x = as_tensor(rows)
    torch.testing.assert_close(make_aggregator("mean", f)(x), x.mean(0))
    if 2 * f < n:
        columns = list(zip(*rows))
        torch.testing.assert_close(make_aggregator("median", f)(x), torch.tensor([ref_median(c) for c in columns], dtype=torch.float64))
        torch.testing.assert_close(make_aggregator("trimmed_mean", f)(x), torch.tensor([ref_trimmed(c, f) for c in columns], dtype=torch.float64))


@given(inputs(min_n=3), st.integers(0, 3))
def test_krum_and_multi_krum_match_their_definitions(rows, f):
    n = len(rows)
    if n < 2 * f + 3:
        return
    x = as_tensor(rows)
    krum = make_aggregator("krum", f)(x)
    # With tied scores any minimiser is a Krum output: check the score, not the index.
    scores = ref_krum_scores(rows, f)
    chosen = [i for i in range(n) if torch.equal(x[i], krum)]
    assert chosen and min(scores[i] for i in chosen) == pytest.approx(min(scores), rel=1e-9, abs=1e-9)
    # The order of the scores decides the outputs only where no two are equal to rounding: scores equal in
    # exact arithmetic (32.02 for two rows of [[3.3, -3.3], [0, 6.5], [0, 3.3], [3.3, 0], [0, -6.5]]) come
    # out of the transcription's sums and the rule's centred Gram matrix a unit in the last place apart, in
    # either order. On integers the sums are exact and the condition is that the scores are distinct.
    ranked = sorted(scores)
    if all(b - a > 1e-9 * ranked[-1] for a, b in zip(ranked, ranked[1:])):
        torch.testing.assert_close(krum, torch.tensor(ref_krum(rows, f), dtype=torch.float64))
        m = n - f
        torch.testing.assert_close(make_aggregator("multi_krum", f)(x), torch.tensor(ref_multi_krum(rows, f, m), dtype=torch.float64))


@given(inputs(min_n=3, allow_ties=False), st.integers(0, 1))
def test_bulyan_matches_its_definition(rows, f):
    # Bulyan's output under ties (equal Krum scores, also of distinct rows; values equidistant from a
    # median) depends on an arbitrary order, so it is compared where the definition picks alone.
    n = len(rows)
    if n < 4 * f + 3 or len({tuple(r) for r in rows}) < n:
        return
    try:
        want = ref_bulyan(rows, f)
    except Tie:
        return
    torch.testing.assert_close(make_aggregator("bulyan", f)(as_tensor(rows)), torch.tensor(want, dtype=torch.float64))


def test_geometric_median_matches_weiszfeld_to_its_tolerance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, dtype=torch.float64, generator=gen)
    rule = make_aggregator("geometric_median", 2)
    z = rule(x)
    ref = torch.tensor(ref_geometric_median(x.tolist()), dtype=torch.float64)
    assert float((z - ref).norm()) <= 1e-4 * float(ref.norm())
    assert 1 <= rule.iterations <= 100


def test_centered_clipping_matches_its_definition_and_keeps_its_anchor():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, dtype=torch.float64, generator=gen) * 10
    rule = make_aggregator("centered_clipping", 1, tau=2.0)
    first = rule(x)
    torch.testing.assert_close(first, torch.tensor(ref_clip(x.tolist(), [0.0, 0.0, 0.0], 2.0), dtype=torch.float64))
    second = rule(x)
    torch.testing.assert_close(second, torch.tensor(ref_clip(x.tolist(), first.tolist(), 2.0), dtype=torch.float64))
    state = rule.state_dict()
    fresh = make_aggregator("centered_clipping", 1, tau=2.0)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(x), rule(x))


ORDER_INVARIANT = ["mean", "median", "trimmed_mean", "geometric_median", "multi_krum", "centered_clipping"]


@pytest.mark.parametrize("name", ORDER_INVARIANT)
def test_order_of_workers_does_not_matter(name):
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    a = make_aggregator(name, 2)(x)
    b = make_aggregator(name, 2)(x[perm])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_never_aliases_or_modifies_its_input(name):
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    out = make_aggregator(name, 2)(x)
    assert torch.equal(x, before)
    assert out.data_ptr() not in {row.data_ptr() for row in x} and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize(
    "name, n, f, message",
    [
        ("bulyan", 6, 1, r"aggregator 'bulyan' needs n >= 4 \* num_byzantine \+ 3 \(got n=6, num_byzantine=1\)"),
        ("krum", 4, 1, r"aggregator 'krum' needs n >= 2 \* num_byzantine \+ 3"),
        ("multi_krum", 6, 2, r"aggregator 'multi_krum' needs n >= 2 \* num_byzantine \+ 3"),
        ("median", 4, 2, r"aggregator 'median' needs 2 \* num_byzantine < n"),
        ("trimmed_mean", 2, 1, r"aggregator 'trimmed_mean' needs 2 \* num_byzantine < n"),
        ("geometric_median", 3, 2, r"aggregator 'geometric_median' needs 2 \* num_byzantine < n"),
    ],
)
def test_preconditions_are_refused_with_the_rule(name, n, f, message):
    with pytest.raises(ValueError, match=message):
        make_aggregator(name, f)(torch.zeros(n, 3))


def test_smallest_allowed_sizes_work():
    for name, n, f in [("bulyan", 7, 1), ("krum", 5, 1), ("multi_krum", 5, 1), ("median", 3, 1), ("trimmed_mean", 3, 1)]:
        assert make_aggregator(name, f)(torch.randn(n, 4)).shape == (4,)


def test_unknown_rule_lists_the_known_ones():
    with pytest.raises(ValueError, match="aggregator must be one of bulyan, centered_clipping, geometric_median"):
        make_aggregator("average", 1)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "geometric_median", "krum", "multi_krum", "bulyan", "centered_clipping"])
def test_robust_rules_survive_non_finite_liars(name):
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(5))
    x[3] = float("nan")
    x[7] = float("inf")
    assert torch.isfinite(make_aggregator(name, 2)(x)).all()


def test_alie_moves_median_rules_but_not_draco():
    """Six workers, one liar sending ALIE (mean + 1.5 std of the honest vectors): the median-style rules
    land away from the honest mean; FRC's decode (r=3) returns exactly the honest sum."""
    from lightning_draco.attacks import get_attack
    from lightning_draco.codes import FractionalRepetitionCode

    gen = torch.Generator().manual_seed(7)
    partitions = torch.randn(6, 2000, generator=gen)
    honest_mean = partitions.mean(0)
    honest_std = partitions.std(0, unbiased=False)
    lie = get_attack("alie")(partitions[0], honest_mean=honest_mean, honest_std=honest_std)
    received = partitions.clone()
    received[4] = lie
    for name in ("median", "trimmed_mean", "geometric_median"):
        moved = make_aggregator(name, 1)(received) - honest_mean
        unattacked = make_aggregator(name, 1)(partitions) - honest_mean
        # The liar drags the rule towards +std, coordinate by coordinate, beyond its usual spread.
        drift = float((moved * honest_std.sign()).mean() - (unattacked * honest_std.sign()).mean())
        assert drift > 0.05, (name, drift)

    code = FractionalRepetitionCode(6, 1)
    coded = torch.stack([partitions[code.partitions(w)].sum(0) for w in range(6)])
    stats = (coded.mean(0), coded.std(0, unbiased=False))
    coded[4] = get_attack("alie")(coded[4], honest_mean=stats[0], honest_std=stats[1])
    result = code.decode(coded)
    assert result.faulty == [4]
    assert torch.equal(result.total, coded[0] + coded[3])


# -- rules added with issue 13: MDA, MoNNA, Meamed ---------------------------------------------------


def ref_mda(xs, f):
    import itertools as it

    best, best_diameter = None, math.inf
    for subset in it.combinations(range(len(xs)), len(xs) - f):
        diameter = max((sqdist(xs[i], xs[j]) for i, j in it.combinations(subset, 2)), default=0.0)
        if diameter < best_diameter:
            best, best_diameter = subset, diameter
    return [sum(xs[i][c] for i in best) / len(best) for c in range(len(xs[0]))]


def ref_monna(xs, f, reference):
    order = sorted(range(len(xs)), key=lambda j: (-1.0 if j == reference else sqdist(xs[j], xs[reference]), j))
    kept = order[: len(xs) - f]
    return [sum(xs[i][c] for i in kept) / len(kept) for c in range(len(xs[0]))]


def ref_meamed(column, f):
    med = ref_median(column)
    kept = sorted(column, key=lambda v: (abs(v - med), v))[: len(column) - f]
    return sum(kept) / len(kept)


def _rounding_slack(xs):
    """How far apart two squared distances between ``xs`` may be and still be computed in either order: the
    rules' distances (a Gram matrix of rows centred on one of them, or sums of squared differences) carry
    rounding of about eps times the largest squared distance."""
    return 1e-9 * max(sqdist(a, b) for a in xs for b in xs)


def mda_subsets(xs, f):
    """Every subset of n - f inputs whose diameter is the smallest, to rounding."""
    import itertools as it

    diameters = {
        subset: max((sqdist(xs[i], xs[j]) for i, j in it.combinations(subset, 2)), default=0.0)
        for subset in it.combinations(range(len(xs)), len(xs) - f)
    }
    least = min(diameters.values())
    return [subset for subset, diameter in diameters.items() if diameter <= least + _rounding_slack(xs)]


def monna_sets(xs, f, reference):
    """Every set of n - f inputs that are x_r and the n - f - 1 others nearest to it, to rounding."""
    import itertools as it

    k = len(xs) - f
    others = sorted((sqdist(xs[j], xs[reference]), j) for j in range(len(xs)) if j != reference)
    if k == 1:
        return [(reference,)]
    bound, slack = others[k - 2][0], _rounding_slack(xs)
    sure = [j for v, j in others if v < bound - slack]
    tied = [j for v, j in others if abs(v - bound) <= slack]
    return [(reference, *sure, *chosen) for chosen in it.combinations(tied, k - 1 - len(sure))]


def assert_mean_of_one_of(got, xs, subsets):
    means = [torch.tensor([sum(xs[i][c] for i in s) / len(s) for c in range(len(xs[0]))], dtype=torch.float64)
             for s in subsets]
    assert any(torch.allclose(got, mean, rtol=1e-7, atol=1e-7) for mean in means), (got.tolist(), subsets)


@given(inputs(min_n=1), st.integers(0, 3), st.data())
def test_mda_monna_meamed_match_their_definitions(rows, f, data):
    """MDA and MoNNA average a subset chosen by distances, ties to the lower indices. On integers the rules'
    distances are exact and so are their tie-breaks: the outputs are the transcriptions'. Otherwise distances
    equal in exact arithmetic (0 is as far from 0.9 as from -0.9) may be computed a unit in the last place
    apart, in either order: the output must be the mean of one of the subsets that are the rule's choice
    when such near-equal distances are taken as equal."""
    n = len(rows)
    if 2 * f >= n:
        return
    x = as_tensor(rows)
    exact = all(float(v).is_integer() for row in rows for v in row)
    reference = data.draw(st.integers(0, n - 1))
    mda = make_aggregator("mda", f)(x)
    monna = make_aggregator("monna", f, reference=reference)(x)
    if exact:
        torch.testing.assert_close(mda, torch.tensor(ref_mda(rows, f), dtype=torch.float64))
        torch.testing.assert_close(monna, torch.tensor(ref_monna(rows, f, reference), dtype=torch.float64))
    else:
        assert_mean_of_one_of(mda, rows, mda_subsets(rows, f))
        assert_mean_of_one_of(monna, rows, monna_sets(rows, f, reference))
    columns = list(zip(*rows))
    torch.testing.assert_close(make_aggregator("meamed", f)(x), torch.tensor([ref_meamed(c, f) for c in columns], dtype=torch.float64))


def test_mda_and_krum_on_ties_of_real_distances_take_one_of_the_tied_choices():
    """Ties in exact arithmetic that rounding splits either way. MDA, n=4, f=1: {5.6, -3.8, 3.8} and
    {-5.6, -3.8, 3.8} both have diameter 9.4, and the rule took the second while the transcription's
    lexicographic tie-break takes the first. Krum, f=1: rows 0 and 2 both score 32.02 exactly, which the
    transcription sums to 32.02 and 32.019999999999996."""
    rows = [[5.6], [-5.6], [-3.8], [3.8]]
    assert mda_subsets(rows, 1) == [(0, 2, 3), (1, 2, 3)]
    assert_mean_of_one_of(make_aggregator("mda", 1)(as_tensor(rows)), rows, mda_subsets(rows, 1))
    rows = [[3.3, -3.3], [0.0, 6.5], [0.0, 3.3], [3.3, 0.0], [0.0, -6.5]]
    scores = ref_krum_scores(rows, 1)
    assert scores[0] == pytest.approx(scores[2], rel=1e-15) and min(scores) in (scores[0], scores[2])
    krum = make_aggregator("krum", 1)(as_tensor(rows))
    assert torch.equal(krum, as_tensor(rows[0])) or torch.equal(krum, as_tensor(rows[2]))


def test_new_rules_on_the_smallest_inputs_and_ties():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    for name in ("mda", "monna", "meamed"):
        # n = 2f + 1 = 3: the two nearest of three equally spaced points, ties to the lower ones.
        torch.testing.assert_close(make_aggregator(name, 1)(x), torch.tensor([2.5, 3.5, 4.5]))
        torch.testing.assert_close(make_aggregator(name, 0)(x), x.mean(0))  # f = 0: the mean
        assert torch.equal(make_aggregator(name, 0)(x[:1]), x[0])  # n = 1
    # Meamed: values equidistant from the median keep the smaller one.
    column = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # median 1.5: 1 and 2 first, then 0 (dist 1.5) before 10
    torch.testing.assert_close(make_aggregator("meamed", 1)(column), torch.tensor([1.0]))


def test_monna_averages_the_neighbours_of_the_trusted_vector_only():
    x = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    torch.testing.assert_close(make_aggregator("monna", 2, reference=0)(x), torch.tensor([1.0]))
    torch.testing.assert_close(make_aggregator("monna", 2, reference=4)(x), torch.tensor([23.0 / 3]))


@pytest.mark.parametrize("name", ["meamed", "mda"])
def test_new_rules_do_not_depend_on_the_order_of_workers(name):
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(make_aggregator(name, 2)(x), make_aggregator(name, 2)(x[perm]))


def test_monna_follows_its_trusted_vector_when_workers_are_reordered():
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    moved = int((perm == 0).nonzero())
    torch.testing.assert_close(make_aggregator("monna", 2)(x), make_aggregator("monna", 2, reference=moved)(x[perm]))


@pytest.mark.parametrize(
    "name, options, n, f, message",
    [
        ("mda", {}, 4, 2, r"aggregator 'mda' needs 2 \* num_byzantine < n \(got n=4, num_byzantine=2\)"),
        ("mda", {"max_subsets": 10}, 7, 2, r"aggregator 'mda' needs C\(n, num_byzantine\) = 21 subsets <= max_subsets = 10"),
        ("monna", {}, 2, 1, r"aggregator 'monna' needs 2 \* num_byzantine < n"),
        ("monna", {"reference": 5}, 5, 1, r"aggregator 'monna' needs reference < n \(reference=5\)"),
        ("meamed", {}, 6, 3, r"aggregator 'meamed' needs 2 \* num_byzantine < n"),
    ],
)
def test_new_rules_refuse_their_preconditions(name, options, n, f, message):
    with pytest.raises(ValueError, match=message):
        make_aggregator(name, f, **options)(torch.zeros(n, 3))


@pytest.mark.parametrize("name", ["mda", "monna", "meamed"])
def test_new_rules_survive_non_finite_liars(name):
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(5))
    x[3] = float("nan")
    x[7] = float("inf")
    assert torch.isfinite(make_aggregator(name, 2)(x)).all()


# -- the engines underneath: cheap finiteness, sorting networks, centred distances --------------------


@given(st.lists(st.lists(st.sampled_from([0.0, -1.0, 2.5, 3e38, -3e38, float("inf"), float("-inf"), float("nan")]),
                         min_size=3, max_size=3), min_size=1, max_size=6))
def test_finite_rows_agrees_with_the_exact_check(rows):
    from lightning_draco.aggregators.base import finite_rows

    x = torch.tensor(rows, dtype=torch.float32)
    exact = torch.isfinite(x).all(dim=1)
    got = finite_rows(x)
    assert (got is None) == bool(exact.all())
    if got is not None:
        assert torch.equal(got, exact)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=32))
def test_sorting_network_sorts_every_sequence(values):
    from lightning_draco.aggregators.coordinatewise import sorting_network

    v = list(values)
    for i, j in sorting_network(len(v)):
        if v[i] > v[j]:
            v[i], v[j] = v[j], v[i]
    assert v == sorted(values)


@given(st.integers(1, 33), st.integers(0, 16), st.data())
def test_order_statistics_match_a_sort_across_blocks(n, f, data):
    from lightning_draco.aggregators import coordinatewise

    lo = data.draw(st.integers(0, n - 1))
    hi = data.draw(st.integers(lo + 1, n))
    block = 64  # the engine's block, made small: three blocks in a few hundred columns
    x = torch.randint(-3, 4, (n, 2 * block + 5)).float()  # ties, and three blocks
    expected = x.sort(dim=0).values[lo:hi].mean(dim=0)
    with _network_block(block):
        torch.testing.assert_close(coordinatewise.mean_of_order_statistics(x, lo, hi), expected)
        torch.testing.assert_close(coordinatewise.sorted_columns(x), x.sort(dim=0).values)


class _network_block:
    """Within the block, the sorting network works on ``size`` columns at a time."""

    def __init__(self, size):
        self.size = size

    def __enter__(self):
        from lightning_draco.aggregators import coordinatewise

        self.saved, coordinatewise._NETWORK_BLOCK = coordinatewise._NETWORK_BLOCK, self.size

    def __exit__(self, *exc):
        from lightning_draco.aggregators import coordinatewise

        coordinatewise._NETWORK_BLOCK = self.saved


def _same_bits(a, b):
    """Equal entry for entry, NaN matching NaN (whatever its payload)."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        torch.nan_to_num(a, nan=0.0).view(torch.uint8), torch.nan_to_num(b, nan=0.0).view(torch.uint8)
    )


# Where the sorting network now runs instead of the sort (n from 33 to 128, rows of NaN), it must give
# bitwise what the sort gave: the rule's outputs did not change.
@given(
    st.integers(2, 128),
    st.lists(st.integers(0, 127), max_size=4),
    st.sampled_from(["nan_rows", "inf_rows", "mixed_nan", "finite", "ties"]),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    st.sampled_from(["median", "trimmed_mean", "meamed"]),
    st.sampled_from([0, 1 / 3, 1]),
    st.integers(0, 2**31),
)
def test_network_paths_give_the_sorts_outputs_bit_for_bit(n, bad, kind, dtype, rule, share, seed):
    from lightning_draco.aggregators import coordinatewise

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 100, generator=gen, dtype=torch.float64).to(dtype)
    if kind == "ties":
        x = torch.randint(-2, 3, (n, 100), generator=gen).to(dtype)
        x[x == 0] = -0.0 if seed % 2 else 0.0
    for row in {i % n for i in bad}:
        if kind == "nan_rows":
            x[row] = math.nan
        elif kind == "inf_rows":
            x[row] = math.inf if row % 2 else -math.inf
        elif kind == "mixed_nan":
            x[row, ::3] = math.nan
    byz = int(share * ((n - 1) // 2))
    with _network_block(64):  # two blocks
        if rule == "median":
            expected = x.sort(dim=0).values[(n - 1) // 2 : n // 2 + 1].mean(dim=0)
        elif rule == "trimmed_mean":
            expected = x.sort(dim=0).values[byz : n - byz].mean(dim=0)
        else:
            expected = _meamed_with_a_sort(x, byz)
        got = make_aggregator(rule, byz)(x)
        # Finite and n <= 32 is the unchanged path (the network, summed row by row): tested above.
        if n > coordinatewise._SEQUENTIAL_MAX_ROWS or not bool(torch.isfinite(x).all()) or rule == "meamed":
            assert _same_bits(got, expected)
        if rule == "meamed":
            assert _same_bits(coordinatewise.sorted_columns(x).abs(), x.sort(dim=0).values.abs())


def _meamed_with_a_sort(x, f):
    """Meamed as it was computed before the network took rows of NaN and n > 32: on a full sort."""
    from lightning_draco.aggregators import coordinatewise

    saved = coordinatewise._NETWORK_MAX_ROWS
    coordinatewise._NETWORK_MAX_ROWS = 0
    try:
        return make_aggregator("meamed", f)(x)
    finally:
        coordinatewise._NETWORK_MAX_ROWS = saved


def test_distances_keep_their_digits_for_long_vectors_close_together():
    from lightning_draco.aggregators.distance import pairwise_sq_distances

    gen = torch.Generator().manual_seed(8)
    x = 100.0 + 1e-2 * torch.randn(6, 100_000, generator=gen)  # |x|^2 = 1e9, distances^2 ~ 20
    exact = torch.cdist(x.double(), x.double()).pow(2)
    torch.testing.assert_close(pairwise_sq_distances(x), exact, rtol=1e-4, atol=1e-6)
    x[2] = float("nan")
    sq = pairwise_sq_distances(x)
    assert torch.isinf(sq[2, [0, 1, 3]]).all() and sq[2, 2] == 0 and torch.isfinite(sq[[0, 1], :][:, [0, 1]]).all()


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "meamed"])
def test_the_order_statistics_engines_agree(name):
    """The sorting network on any number of rows and torch.sort give the same outputs: bit for bit
    past 32 rows (both then average the kept rows as a mean does), to rounding below."""
    generator = torch.Generator().manual_seed(3)
    for n, exact in ((7, False), (40, True), (130, True)):
        inputs = torch.randn(n, 3000, generator=generator)
        inputs[1, ::7] = float("inf")
        outputs = {engine: make_aggregator(name, 2, engine=engine)(inputs) for engine in ("auto", "network", "sort")}
        if exact:
            assert torch.equal(outputs["network"], outputs["sort"])
        torch.testing.assert_close(outputs["network"], outputs["sort"], rtol=1e-6, atol=1e-6)
        assert torch.equal(outputs["auto"], outputs["network" if n <= 128 else "sort"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("name", ["median", "trimmed_mean"])
def test_the_auto_engine_on_cuda_is_the_network_up_to_64_rows_and_agrees_with_the_cpu(name):
    generator = torch.Generator().manual_seed(4)
    for n in (7, 40, 64, 65):
        inputs = torch.randn(n, 5000, generator=generator)
        assert (coordinatewise._network_plan(inputs.cuda()) is not None) == (n <= 64), n
        on_cuda = {engine: make_aggregator(name, 2, engine=engine)(inputs.cuda()) for engine in ("auto", "network", "sort")}
        assert torch.equal(on_cuda["auto"], on_cuda["network" if n <= 64 else "sort"]), n
        torch.testing.assert_close(on_cuda["auto"].cpu(), make_aggregator(name, 2)(inputs), rtol=1e-6, atol=1e-6)


def test_an_unknown_engine_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="aggregator 'median': engine must be one of auto, network, sort"):
        make_aggregator("median", 1, engine="heap")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("far", [1e20, 3e38])
def test_the_geometric_median_ignores_one_finite_liar_however_far_out(far, dtype):
    """Its breakdown point is 1/2: a liar's finite vector whose squared distance overflows the dtype moves it by nothing."""
    honest = torch.randn(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.cat([honest, torch.full((1, 50), far, dtype=torch.float64)]).to(dtype)
    got = make_aggregator("geometric_median", 1)(x)
    assert bool(torch.isfinite(got).all())
    # Within the honest points' spread: the liar's pull, at ~1e20 away, is below the dtype's resolution.
    assert float((got.double() - honest.mean(0)).norm()) < float((honest - honest.mean(0)).norm(dim=1).max())


def test_the_geometric_median_of_rows_all_with_nan_or_inf_is_nan():
    x = torch.tensor([[math.nan, 1.0], [math.inf, 2.0], [3.0, -math.inf]])
    assert bool(make_aggregator("geometric_median", 1)(x).isnan().all())


@pytest.mark.parametrize("engine", coordinatewise.ENGINES)
@pytest.mark.parametrize("name", ["median", "trimmed_mean", "meamed"])
def test_half_precision_sums_of_finite_values_do_not_overflow(name, engine):
    """float16's largest value is 65504: two or more kept values of 40000 sum past it."""
    for n in (6, 7):
        x = torch.full((n, 3), 40000.0, dtype=torch.float16)
        x[0] = -1.0  # one liar the rule drops
        assert make_aggregator(name, 1, engine=engine)(x).tolist() == [40000.0] * 3


@given(st.lists(st.integers(-2**15, 2**15), min_size=3, max_size=9), st.integers(1, 4), st.integers(-8, 8))
def test_meamed_in_bfloat16_keeps_the_values_it_keeps_in_float64(numerators, f, exponent):
    """The distances to the median, computed in bfloat16, rounded unequal distances to a tie."""
    column = [v * 2.0**exponent / 256 for v in numerators]  # exactly representable in bfloat16 (8-bit mantissa)
    column = [float(torch.tensor(v).to(torch.bfloat16)) for v in column]
    if 2 * f >= len(column):
        return
    x = torch.tensor(column, dtype=torch.float64)[:, None]
    expected = make_aggregator("meamed", f)(x).to(torch.bfloat16)
    got = make_aggregator("meamed", f)(x.to(torch.bfloat16))
    torch.testing.assert_close(got, expected, rtol=2**-8, atol=0)  # one rounding of the mean apart at most


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("median", {"bogus": 1}, r"aggregator 'median' has no option 'bogus': its options are engine\."),
        ("krum", {"tau": 1}, r"aggregator 'krum' has no option 'tau': its options are none\."),
        ("multi_krum", {"m": 2.5}, r"aggregator 'multi_krum': m must be None or an integer >= 1 \(got 2\.5\)"),
        ("multi_krum", {"m": True}, r"aggregator 'multi_krum': m must be None or an integer >= 1 \(got True\)"),
        ("centered_clipping", {"tau": "x"}, r"needs a number tau > 0 and an integer iterations >= 1 \(got tau='x'"),
        ("centered_clipping", {"iterations": 1.5}, r"\(got tau=100\.0, iterations=1\.5\)"),
        ("geometric_median", {"max_iter": 2.0}, r"an integer max_iter >= 1 \(got tol=1e-05, max_iter=2\.0, nu=1e-08\)"),
    ],
)
def test_options_a_rule_does_not_take_or_of_the_wrong_type_are_refused_when_it_is_made(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_aggregator(name, 1, **options)


def test_pre_aggregator_options_are_checked_by_name_too():
    with pytest.raises(ValueError, match=r"pre-aggregator 'bucketing' has no option 'size': its options are bucket_size, seed"):
        make_aggregator("median", 1, pre_aggregators=[{"name": "bucketing", "size": 2}])


def _close_cloud(n, d, offset, seed):
    """``n`` float32 points whose spread (about 1) is tiny next to their common ``offset``: honest gradients
    that share most of their direction. The first point strays a little further."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(d, generator=gen, dtype=torch.float64)
    x = offset * common / common.norm() * math.sqrt(d) + torch.randn(n, d, generator=gen, dtype=torch.float64)
    x[0] += 3 * torch.randn(d, generator=gen, dtype=torch.float64)
    return x.float()


@given(st.integers(3, 70), st.integers(1, 200), st.sampled_from([0.0, 1e3, 3e3]), st.integers(0, 2**16))
def test_rules_measuring_distances_to_one_point_keep_their_float64_result_for_any_number_of_inputs(n, d, offset, seed):
    """The geometric median, centred clipping and MoNNA measure each input's distance to one point. In
    float32 they must land where the same rule lands in float64 on the same inputs, to a small part of
    the points' spread, however many inputs there are and however long the common part of the vectors.
    (``torch.cdist``'s default expands ``|a - b|^2`` above 25 rows, which made all three land about a
    whole spread away.) On a line the minimiser is often an input, which Weiszfeld reaches only in the limit:
    the modified step reaches it, in both dtypes, within the 100 iterations given. On a line with an even
    number of inputs every point between the two middle ones is a minimiser, so there the float32 result
    must lie in that interval rather than on the float64 run's point of it."""
    x = _close_cloud(n, d, offset, seed)
    exact = x.double()
    centre = exact.median(dim=0).values
    spread = float((exact - centre).norm(dim=1).median())
    options = {"geometric_median": {"tol": 1e-12, "max_iter": 100}, "centered_clipping": {"tau": spread}, "monna": {}}
    for name, kwargs in options.items():
        single, double = (make_aggregator(name, (n - 1) // 2, **kwargs) for _ in range(2))
        if name == "centered_clipping":  # anchored at the common part, as after a first step
            single.anchor, double.anchor = centre.float(), centre.clone()
        got, want = single(x).double(), double(exact)
        slack = 1e-2 * spread + 1e-6 * float(want.norm())
        if name == "geometric_median" and d == 1 and n % 2 == 0:
            middle = exact[:, 0].sort().values[n // 2 - 1 : n // 2 + 1]
            assert middle[0] - slack <= got[0] <= middle[1] + slack, (name, float(got[0]), middle.tolist())
            continue
        error = float((got - want).norm())
        assert error <= slack, (name, error, spread)


@given(st.integers(5, 40), st.integers(1, 300), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       st.floats(1.0, 1e12), st.integers(0, 2**16))
def test_liars_far_out_cannot_hold_the_geometric_median_away_from_the_honest_inputs(n, d, dtype, distance, seed):
    """f liars steer the mean at will: here one sends a target far out, the others what puts the mean on it.
    Plain Weiszfeld started from the mean weighs that input 1 / nu and stops on the liar's vector; from far
    out it also comes in by only f / (n - f) per iteration, so liars far enough away outlast ``max_iter``
    (the rule then starts again from the coordinate-wise median).
    Whatever they send, the rule keeps the geometric median's guarantee: for f < n / 2,
    ||GM - m|| <= 2 (n - f) / (n - 2 f) * max_honest ||x_i - m|| about the honest mean m."""
    f = (n - 1) // 2
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(n - f, d, generator=gen, dtype=torch.float64)
    m = honest.mean(0)
    target = m + distance * torch.nn.functional.normalize(torch.randn(d, generator=gen, dtype=torch.float64), dim=0)
    balance = (n * target - honest.sum(0) - target) / (f - 1) if f > 1 else target
    x = torch.cat([honest, target[None], balance.expand(f - 1, d)]).to(dtype)
    rule = make_aggregator("geometric_median", f)
    got = rule(x).double()
    honest = x[: n - f].double()  # as rounded into the dtype
    m = honest.mean(0)
    bound = 2 * (n - f) / (n - 2 * f) * float((honest - m).norm(dim=1).max())
    # The rule stops within tol (1e-5) of its iterate's norm; bfloat16's answer is rounded back to 8 bits.
    slack = (1e-5 if dtype != torch.bfloat16 else 2 ** -7) * 2 * float(got.norm())
    assert float((got - m).norm()) <= bound + slack, (float((got - target.to(dtype).double()).norm()), bound)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("far", [1e20, 3e38])
def test_centred_clipping_keeps_the_pull_of_a_finite_liar_whose_squared_distance_overflows(far, dtype):
    """The liar's clipped pull, tau / n towards it, is in the definition however far out it is; a float32
    distance that overflowed to inf would clip it to nothing."""
    honest = torch.randn(6, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.cat([honest, torch.full((1, 50), far, dtype=torch.float64)]).to(dtype)
    want = make_aggregator("centered_clipping", 1, tau=1.0)(x.double())
    got = make_aggregator("centered_clipping", 1, tau=1.0)(x).double()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if dtype == torch.float32 else 2e-3)
    # The liar's pull is really there: a step of tau / n = 1/7 along the all-ones direction.
    without = make_aggregator("centered_clipping", 1, tau=1.0)(x.double()[:6]) * 6 / 7
    assert float((want - without).norm()) == pytest.approx(1 / 7, rel=1e-3)


def test_the_geometric_median_reads_no_scalar_inside_its_iterations():
    """On a GPU every scalar read is a host sync. Each iteration brings its three outcomes to the host in one
    transfer (``tolist``, which the CPU does not dispatch); the scalar reads are outside the iterations:
    ``finite_rows``' check, and the coordinate-wise median's where the iterations from the mean ran out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    x = _close_cloud(9, 40, 0.0, seed=1)
    for iterations in (2, 20):
        rule = make_aggregator("geometric_median", 2, tol=1e-12, max_iter=iterations)
        with ScalarReads() as counted:
            rule(x)
        # tol 1e-12 stops them only where the float32 iterate stops moving at all, which the CPU's matmul
        # kernels decide (after 13 iterations on one machine, not within 20 on another); a read inside the
        # iterations would count at least one per iteration.
        assert rule.iterations >= min(iterations, 10)
        restarted_from_the_median = rule.iterations > iterations
        assert counted.count == 1 + restarted_from_the_median, (rule.iterations, counted.count)
