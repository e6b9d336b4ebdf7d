"""Pre-aggregators (NNM, bucketing, static clipping, ARC) against transcriptions of their definitions,
and their composition with every rule, over workers and over DETOX's group sums."""

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_draco.aggregators import AGGREGATORS, PRE_AGGREGATORS, make_aggregator, make_pre_aggregator
from lightning_draco.aggregators.base import PreAggregated

# -- textbook transcriptions --------------------------------------------------------------------------


def sqdist(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b))


def mean_rows(rows):
    return [sum(col) / len(rows) for col in zip(*rows)]


def ref_nnm(xs, f):
    out = []
    for i, xi in enumerate(xs):
        order = sorted(range(len(xs)), key=lambda j: (-1.0 if j == i else sqdist(xs[j], xi), j))
        out.append(mean_rows([xs[j] for j in order[: len(xs) - f]]))
    return out


def ref_bucketing(xs, perm, s):
    return [mean_rows([xs[j] for j in perm[k : k + s]]) for k in range(0, len(xs), s)]


def clip(x, c):
    norm = math.sqrt(sum(v * v for v in x))
    return [v * min(1.0, c / norm) for v in x] if norm > 0 else list(x)


def ref_arc(xs, f):
    n = len(xs)
    k = math.floor(2 * (f / n) * (n - f) + 1e-12)
    if k == 0:
        return [list(x) for x in xs]
    c = sorted((math.sqrt(sum(v * v for v in x)) for x in xs), reverse=True)[k]
    return [clip(x, c) for x in xs]


@st.composite
def inputs(draw, min_n=1):
    n = draw(st.integers(min_n, 9))
    d = draw(st.integers(1, 4))
    values = st.sampled_from([-2.0, 0.0, 1.0, 3.0]) if draw(st.booleans()) else st.floats(-10, 10, allow_nan=False, width=32)
    return [[draw(values) for _ in range(d)] for _ in range(n)]


def t(rows):
    return torch.tensor(rows, dtype=torch.float64)


def nearest_sets(xs, i, k):
    """Every set of ``k`` inputs that are x_i and the k - 1 others nearest to it, where distances within
    rounding of the (k - 1)-th nearest one count as equal (any of them may be the one taken)."""
    others = sorted((sqdist(xs[j], xs[i]), j) for j in range(len(xs)) if j != i)
    if k == 1:
        return [(i,)]
    bound = others[k - 2][0]
    # The rule's distances (a Gram matrix of rows centred on one of them) carry rounding of about eps times
    # the largest squared distance: only distances that close to the boundary can be taken in either order.
    slack = 1e-9 * max(v for v, _ in others)
    sure = [j for v, j in others if v < bound - slack]
    tied = [j for v, j in others if abs(v - bound) <= slack]
    return [(i, *sure, *chosen) for chosen in itertools.combinations(tied, k - 1 - len(sure))]


@given(inputs(), st.integers(0, 4))
def test_nnm_matches_its_definition(rows, f):
    """Each row becomes the mean of its n - f nearest inputs (itself first), ties to the lower index. On
    integers the rule's distances are exact and so is its tie-break: the output is the transcription's.
    Otherwise two distances equal in exact arithmetic (0 is as far from 0.9 as from -0.9) may be computed a
    unit in the last place apart, in either order, so a row may average either set of nearest inputs: it
    must be the mean of one of the sets whose distances are all at most every distance left out."""
    if f >= len(rows):
        return
    got = make_pre_aggregator("nnm", f)(t(rows))
    if all(float(v).is_integer() for row in rows for v in row):
        torch.testing.assert_close(got, t(ref_nnm(rows, f)))
        return
    for i, row in enumerate(got):
        means = [t(mean_rows([rows[j] for j in chosen])) for chosen in nearest_sets(rows, i, len(rows) - f)]
        assert any(torch.allclose(row, mean, rtol=1e-7, atol=1e-7) for mean in means), (i, row.tolist(), means)


def test_nnm_on_a_tie_of_real_distances_averages_one_of_the_nearest_sets():
    """0 is exactly as far from 0.9 as from -0.9 (twice): any two of the three are its nearest others. The
    rule's centred Gram matrix computes one 0.81 a unit in the last place larger than the others and averages
    rows 1 and 3 with it (-0.6), the transcription's tie-break rows 0 and 1 (0.0); both are NNM's output."""
    rows = [[0.9], [-0.9], [0.0], [-0.9]]
    assert nearest_sets(rows, 2, 3) == [(2, 0, 1), (2, 0, 3), (2, 1, 3)]
    got = make_pre_aggregator("nnm", 1)(t(rows))
    assert any(torch.allclose(got[2], t(mean_rows([rows[j] for j in chosen]))) for chosen in nearest_sets(rows, 2, 3))


@given(inputs(), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_bucketing_averages_the_buckets_of_the_ps_permutation(rows, size, seed):
    n = len(rows)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = make_pre_aggregator({"name": "bucketing", "bucket_size": size}, 1)(t(rows), generator=torch.Generator().manual_seed(seed))
    assert out.shape[0] == math.ceil(n / size)
    torch.testing.assert_close(out, t(ref_bucketing(rows, perm, size)))


@given(inputs(), st.floats(0.01, 20))
def test_static_clipping_matches_its_definition(rows, c):
    out = make_pre_aggregator({"name": "clipping", "threshold": c}, 0)(t(rows))
    torch.testing.assert_close(out, t([clip(x, c) for x in rows]))


@given(inputs(), st.integers(0, 4))
def test_arc_matches_its_definition(rows, f):
    if f >= len(rows):
        return
    torch.testing.assert_close(make_pre_aggregator("arc", f)(t(rows)), t(ref_arc(rows, f)))


def test_smallest_inputs_and_f_zero():
    x = torch.tensor([[3.0, 4.0]])
    for spec in ("nnm", "arc", "bucketing", {"name": "clipping", "threshold": 1.0}):
        assert make_pre_aggregator(spec, 0)(x).shape == (1, 2)
    y = torch.tensor([[0.0], [1.0], [5.0]])
    torch.testing.assert_close(make_pre_aggregator("nnm", 0)(y), y.mean(0).expand(3, 1))  # f = 0: everyone's mean
    assert torch.equal(make_pre_aggregator("arc", 0)(y), y)  # k = 0: nothing clipped
    # ARC with n=3, f=1: k = floor(2 * 2 / 3) = 1, the longest is clipped to the second longest.
    torch.testing.assert_close(make_pre_aggregator("arc", 1)(y), torch.tensor([[0.0], [1.0], [1.0]]))
    # NNM ties: 1 is as far from 0 as from 2; the lower index wins.
    torch.testing.assert_close(make_pre_aggregator("nnm", 1)(torch.tensor([[0.0], [1.0], [2.0]])),
                               torch.tensor([[0.5], [0.5], [1.5]]))


@pytest.mark.parametrize("spec", ["nnm", "arc", {"name": "clipping", "threshold": 0.5}])
def test_permuting_the_workers_permutes_the_output(spec):
    x = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(make_pre_aggregator(spec, 2)(x[perm]), make_pre_aggregator(spec, 2)(x)[perm])


@pytest.mark.parametrize("pre", sorted(PRE_AGGREGATORS))
@pytest.mark.parametrize("rule", ["mean", "median", "krum", "geometric_median", "centered_clipping"])
def test_composition_never_modifies_or_aliases_its_input(pre, rule):
    spec = {"name": "clipping", "threshold": 0.1} if pre == "clipping" else pre
    x = torch.randn(11, 8, generator=torch.Generator().manual_seed(4))
    before = x.clone()
    aggregator = make_aggregator(rule, 1, pre_aggregators=[spec])
    out = aggregator(x, generator=torch.Generator().manual_seed(0))
    assert isinstance(aggregator, PreAggregated) and aggregator.name == f"{pre}+{rule}"
    assert torch.equal(x, before) and out.shape == (8,)
    assert out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


@pytest.mark.parametrize("pre", ["nnm", "arc", "bucketing"])
@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "geometric_median", "meamed"])
def test_compositions_survive_non_finite_liars(pre, rule):
    x = torch.randn(15, 5, generator=torch.Generator().manual_seed(5))  # 8 buckets of 2: enough for Krum, f=2
    x[3] = float("nan")
    x[7] = float("inf")
    assert torch.isfinite(make_aggregator(rule, 2, pre_aggregators=[pre])(x, generator=torch.Generator().manual_seed(1))).all()


def test_nnm_then_krum_resists_a_liar_that_krum_alone_picks_under_heterogeneity():
    """Krum returns one input; NNM first makes every honest input a mix of n - f of them, so Krum's
    output moves to the honest mean (Allouah et al. 2023's motivation)."""
    gen = torch.Generator().manual_seed(3)
    honest = torch.randn(8, 50, generator=gen) * 3  # heterogeneous: far apart
    krum = make_aggregator("krum", 2)(honest)
    mixed = make_aggregator("krum", 2, pre_aggregators=["nnm"])(honest)
    target = honest.mean(0)
    assert float((mixed - target).norm()) < 0.5 * float((krum - target).norm())


def test_bucketing_draws_from_the_generator_it_is_given():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    rule = make_aggregator("median", 1, pre_aggregators=[{"name": "bucketing", "bucket_size": 2}])
    a = rule(x, generator=torch.Generator().manual_seed(1))
    b = rule(x, generator=torch.Generator().manual_seed(1))
    c = rule(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pre_aggregators_work_over_detox_group_sums():
    from lightning_draco.codes import FractionalRepetitionCode
    from lightning_draco.aggregators.coded import AggregatedCode

    code = AggregatedCode(FractionalRepetitionCode(9, 1), make_aggregator("median", 1, pre_aggregators=["nnm"]))
    gen = torch.Generator().manual_seed(6)
    partitions = torch.randn(9, 30, generator=gen)
    received = torch.stack([partitions[code.partitions(w)].sum(0) for w in range(9)])
    received[4] = -100 * received[4]
    result = code.decode(received, generator=torch.Generator().manual_seed(0))
    groups = torch.stack([received[0], received[3], received[6]])  # the three verified group sums
    expected = make_aggregator("median", 1, pre_aggregators=["nnm"])(groups) * 3
    assert result.faulty == [4]
    torch.testing.assert_close(result.total, expected)


@pytest.mark.parametrize(
    "spec, n, message",
    [
        ("nnm", 2, r"pre-aggregator 'nnm' needs num_byzantine < n \(got n=2, num_byzantine=2\)"),
        ("arc", 1, r"pre-aggregator 'arc' needs num_byzantine < n"),
        ({"name": "clipping"}, 3, r"pre-aggregator 'clipping' needs threshold > 0 \(got None\)"),
        ({"name": "bucketing", "bucket_size": 0}, 3, r"pre-aggregator 'bucketing': bucket_size must be an integer >= 1"),
        ("mixing", 3, r"pre_aggregators must be one of arc, bucketing, clipping, nnm \(got 'mixing'\)"),
        (3, 3, r"pre_aggregators entries must be a name"),
    ],
)
def test_bad_pre_aggregators_are_refused_with_the_parameter(spec, n, message):
    with pytest.raises(ValueError, match=message):
        make_pre_aggregator(spec, 2)(torch.zeros(n, 3))


def test_a_rule_refused_after_bucketing_says_why():
    rule = make_aggregator("median", 1, pre_aggregators=[{"name": "bucketing", "bucket_size": 2}])
    with pytest.raises(ValueError, match=r"needs 2 \* num_byzantine < n \(got n=2.*The 3 inputs became 2 after the pre-aggregators \(bucketing\)"):
        rule.check(3)


def test_strategy_takes_pre_aggregators():
    from lightning_draco import DracoStrategy

    strategy = DracoStrategy(code="none", num_adversaries=1, aggregator="krum", pre_aggregators=["nnm"])
    assert isinstance(strategy.aggregator, PreAggregated) and strategy.aggregator.name == "nnm+krum"
    rule = make_aggregator("centered_clipping", 1, tau=1.0)
    strategy = DracoStrategy(code="frc", num_adversaries=1, aggregator=rule, pre_aggregators=["arc"])
    assert strategy.aggregator.rule is rule and strategy.aggregator.name == "arc+centered_clipping"
    with pytest.raises(ValueError, match="pre_aggregators need an aggregator"):
        DracoStrategy(code="none", pre_aggregators=["nnm"])


def test_composed_state_is_the_rules_state():
    rule = make_aggregator("centered_clipping", 1, tau=1.0, pre_aggregators=["nnm"])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    rule(x)
    fresh = make_aggregator("centered_clipping", 1, tau=1.0, pre_aggregators=["nnm"])
    fresh.load_state_dict(rule.state_dict())
    torch.testing.assert_close(fresh(x), rule(x))


def test_every_rule_accepts_every_pre_aggregator():
    x = torch.randn(15, 6, generator=torch.Generator().manual_seed(9))
    for rule in sorted(AGGREGATORS):
        for pre in ("nnm", "arc"):
            assert make_aggregator(rule, 1, pre_aggregators=[pre])(x).shape == (6,)
