"""Audit of the simulated attacks against their papers' definitions, single-process."""

import re
from statistics import NormalDist

import pytest
import torch

from lightning_draco import Adversary
from lightning_draco.attacks.adaptive import search_factor


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).to(torch.int64)


def _flipped_bits(a: torch.Tensor, b: torch.Tensor) -> int:
    width = 8 * a.element_size()
    xor = (_bits(a) ^ _bits(b)) & ((1 << width) - 1)
    return sum(bin(int(v)).count("1") for v in xor)


# -- bit_flip ------------------------------------------------------------------------------------------


def test_bit_flip_flips_exactly_num_flips_distinct_bits():
    """Silent data corruption flips ``num_flips`` bits. Drawn with replacement, the same bit of the same
    entry could be drawn twice and flipped back: with a one-entry float32 vector and two flips, 18 of
    400 seeds sent the honest vector unchanged (no lie, silently)."""
    honest = torch.tensor([1.0])
    for seed in range(400):
        sent = Adversary(ranks=[1], attack="bit_flip", num_flips=2, seed=seed).corrupt(honest, rank=1, step=0, bucket=0)
        assert _flipped_bits(honest, sent) == 2, seed
    every = Adversary(ranks=[1], attack="bit_flip", num_flips=32).corrupt(honest, rank=1, step=0, bucket=0)
    assert _flipped_bits(honest, every) == 32
    half = torch.randn(300).to(torch.bfloat16)
    sent = Adversary(ranks=[1], attack="bit_flip", num_flips=5, seed=3).corrupt(half, rank=1, step=2, bucket=1)
    assert _flipped_bits(half, sent) == 5
    message = "attack 'bit_flip': num_flips must be at most the vector's 32 bits (got 33)."
    with pytest.raises(ValueError, match=re.escape(message)):
        Adversary(ranks=[1], attack="bit_flip", num_flips=33).corrupt(honest, rank=1, step=0, bucket=0)


# -- sparse --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sparse_lie_stays_finite_and_cancelling_in_half_precision(dtype):
    """The sparse lie adds +X and -X (X = scale * max|g|) at a few coordinates, so the change sums to zero.
    In float16 X = 100 * 1000 = 1e5 overflowed (largest finite 65504): the pair became +Inf and -Inf,
    whose sum is NaN, a non-finite lie any finiteness check catches, not the cancelling one described."""
    honest = torch.tensor([1000.0, -3.0, 2.0, 5.0, 0.5, -7.0], dtype=dtype)
    sent = Adversary(ranks=[1], attack="sparse", seed=2).corrupt(honest, rank=1, step=0, bucket=0)
    assert sent.dtype == dtype and bool(torch.isfinite(sent).all()), sent
    change = sent.double() - honest.double()
    moved = change.nonzero().flatten()
    assert len(moved) == 2 and float(change[moved].min()) < -1e4 and float(change[moved].max()) > 1e4
    assert abs(float(change.sum())) <= 1e-2 * float(change.abs().max())


# -- optimal_alie / optimal_ipm: the factor search ----------------------------------------------------


@pytest.mark.parametrize("refine", [0, 1, 2, 3, 5])
def test_search_factor_spends_refine_more_evaluations(refine):
    """``search_factor`` documents a grid of ``grid`` factors then ``refine`` more evaluations of a golden
    section. With refine=1 it evaluated none: the bracket's first golden point was skipped."""
    calls = []
    search_factor(lambda x: calls.append(x) or -abs(x - 3.0), 20.0, grid=6, refine=refine)
    assert len(calls) == 6 + refine


def test_search_factor_refine_one_can_improve_on_the_grid():
    peak = 7.0  # between grid points 3.56 and 20: the one golden point refine=1 adds (8.03) lies nearer
    objective = lambda x: -abs(x - peak)  # noqa: E731
    grid_only = search_factor(objective, 20.0, grid=6, refine=0)
    assert abs(search_factor(objective, 20.0, grid=6, refine=1) - peak) < abs(grid_only - peak)


# -- label_flip ------------------------------------------------------------------------------------------


def test_label_flip_label_index_must_be_an_integer_when_the_adversary_is_made():
    """A non-integer ``label_index`` passed the check (its default, -1, made it 'a number') and failed the
    first step on the liar alone, which the other ranks see as a lost connection."""
    with pytest.raises(ValueError, match=re.escape("attack 'label_flip': label_index must be an integer (got 1.5).")):
        Adversary(ranks=[1], attack="label_flip", label_index=1.5)
    assert Adversary(ranks=[1], attack="label_flip", label_index=0).options == {"label_index": 0}


# -- alie: the paper's z_max ----------------------------------------------------------------------------


@pytest.mark.parametrize("n, f, expected", [(50, 12, 0.5828), (9, 2, 0.4307), (6, 1, 0.0), (20, 4, 0.3853)])
def test_alie_z_is_baruch_et_al_z_max(n, f, expected):
    """Baruch et al. (2019): with n workers and f liars, the liars need s = floor(n/2 + 1) - f honest
    supporters; z_max is the standard normal quantile of (n - s) / n. The built-in alie uses a fixed
    z = 1.5 (ByzFL's default, documented); ``alie_z`` gives the paper's factor to pass as z."""
    from lightning_draco.attacks.omniscient import alie_z

    s = (n // 2 + 1) - f
    assert alie_z(n, f) == pytest.approx(NormalDist().inv_cdf((n - s) / n), abs=1e-12)
    assert alie_z(n, f) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match=r"alie_z: f=5 liars of n=8 are a majority"):
        alie_z(8, 5)
    with pytest.raises(ValueError, match=r"alie_z: needs n >= 1 workers and 0 <= f < n"):
        alie_z(4, 4)


# -- what was checked and holds (guards) --------------------------------------------------------------


def _omniscient(name, vectors, liars, **options):
    adversary = Adversary(ranks=list(liars), attack=name, **options)
    mean, std = vectors.mean(0), vectors.std(0, unbiased=False)
    return [adversary.corrupt(vectors[r], rank=r, step=4, bucket=1, honest_mean=mean, honest_std=std,
                              honest_vectors=vectors, liars=tuple(liars)) for r in liars]


def test_alie_and_ipm_are_the_papers_vectors_and_every_liar_sends_the_same():
    """ALIE: mean + z * std per coordinate; IPM (Xie et al., 2020): -eps times the honest mean."""
    vectors = torch.randn(7, 50, generator=torch.Generator().manual_seed(0))
    mean, std = vectors.mean(0), vectors.std(0, unbiased=False)
    a, b = _omniscient("alie", vectors, [2, 5])
    assert torch.equal(a, b) and torch.allclose(a, mean + 1.5 * std)
    a, b = _omniscient("alie", vectors, [2, 5], z=0.43)
    assert torch.allclose(a, mean + 0.43 * std)
    a, b = _omniscient("ipm", vectors, [2, 5])
    assert torch.equal(a, b) and torch.allclose(a, -0.5 * mean)
    a, b = _omniscient("mimic", vectors, [0, 5])
    assert torch.equal(a, b) and torch.equal(a, vectors[1])


def test_random_attacks_draw_per_seed_step_bucket_and_rank():
    honest = torch.zeros(64)
    adversary = Adversary(ranks=[1, 2], attack="gaussian", seed=9)
    base = adversary.corrupt(honest, rank=1, step=3, bucket=0)
    assert torch.equal(base, adversary.corrupt(honest, rank=1, step=3, bucket=0))
    for other in (dict(rank=2, step=3, bucket=0), dict(rank=1, step=4, bucket=0), dict(rank=1, step=3, bucket=1)):
        assert not torch.equal(base, adversary.corrupt(honest, **other)), other
    reseeded = Adversary(ranks=[1], attack="gaussian", seed=10)
    assert not torch.equal(base, reseeded.corrupt(honest, rank=1, step=3, bucket=0))
