"""Red-team probes of the cyclic code's decoder that found defects, pinned as regression tests."""

import pytest
import torch

from lightning_draco.codes import _triton
from lightning_draco.codes.crc import CyclicRepetitionCode, _allowed, _liar_sets


def _lie_under_the_floor(code, received, suspects, fraction):
    """``received`` with the lie that moves the total furthest while every parity row of the honest set
    ``not suspects`` stays at ``fraction`` of its floor: on the liar set ``L`` of ``H`` maximising
    ``sum_t |c_t| allowed_t`` with ``c = N_L^{-T} b_L``, lies ``X = N_L^{-1} a`` along one direction, with
    ``a_t = fraction * sign(c_t) * allowed_t``. Returns the rows and the liars."""
    p, d = received.shape
    comb = code._combiner(suspects)
    allowed = _allowed(comb, received.double().norm(dim=1), code.floor(received.dtype), d)
    best = None
    for liars in _liar_sets(len(comb.honest), code.num_adversaries).tolist():
        reach = torch.linalg.solve(comb.parity[:, liars].T, comb.weights[liars])
        value = float((reach.abs() * allowed).sum())
        if best is None or value > best[0]:
            best = (value, liars, reach)
    _, liars, reach = best
    sizes = torch.linalg.solve(comb.parity[:, liars], fraction * torch.sign(reach) * allowed)
    direction = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    direction /= direction.norm()
    lied = received.clone()
    for size, position in zip(sizes.tolist(), liars):
        lied[comb.honest[position]] += (size * direction).to(received.dtype)
    return lied, {comb.honest[position] for position in liars}


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize(
    "p, s, spike, scale",
    [(21, 1, 12, 1e4), (6, 2, 1, 1e4), (16, 1, 1, 0.0)],  # scale 0.0: the spike is the only non-zero partition
)
def test_a_lie_under_the_floor_of_spiky_rows_moves_the_total_no_further_than_hidden_error(p, s, spike, scale, kernel):
    """A loss spike in one partition makes the rows holding it large: every parity row's floor grows with them,
    while the sum grows only by the spike. Liars on small rows, kept just under that floor, moved the float32
    total by 1.1e-5 of the sum at P = 21, s = 1 (1.34 times ``hidden_error``, over float32's 1e-5) and at
    P = 6, s = 2 with two colluding liars (1.15e-5)."""
    if kernel == "triton" and not _triton.available("cpu"):
        pytest.skip("Triton's interpreter is not available here (Triton missing, or a GPU present)")
    code = CyclicRepetitionCode(p, s, kernel=kernel)
    d = 2048
    grads = torch.randn(p, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    if scale:
        grads[spike] *= scale
    else:
        grads *= (torch.arange(p) == spike)[:, None]
    received = code.encode(grads, torch.float32)
    # The set a fresh decode certifies first is public: the liars aim just under its floor.
    lied, liars = _lie_under_the_floor(code, received, tuple(range(s)), 0.97)
    honest = CyclicRepetitionCode(p, s, kernel=kernel).decode(received, generator=torch.Generator().manual_seed(1))
    result = code.decode(lied, generator=torch.Generator().manual_seed(1))
    truth = grads.sum(0)
    shift = float((result.total.double() - honest.total.double()).norm())
    assert shift <= code.hidden_error(torch.float32) * float(truth.norm())
    assert float((result.total.double() - truth).norm()) <= 1e-5 * float(truth.norm())
    assert set(result.faulty) <= liars


def test_a_lie_under_the_measured_noise_floor_of_spiky_rows_moves_the_total_no_further_than_the_noise_bound():
    """The same stretch under kernel noise: liars who know the honest noise (so the floor the decode will
    certify under) and sit just under it, on small rows beside a spiky one, moved the total by 1.4 times the
    noise bound ``(growth + 8 x exposure) x noise`` at P = 9, 13, 15 and 21 with s = 1 and at P = 7, s = 2."""
    p, s, spike, level, d = 15, 1, 9, 1e-4, 2048
    gen = torch.Generator().manual_seed(p * 100 + spike)
    grads = torch.randn(p, d, dtype=torch.float64, generator=gen)
    grads[spike] *= 1e4
    code = CyclicRepetitionCode(p, s)
    received = code.encode(grads, torch.float32, noise=level, generator=gen)
    code.decode(received, generator=torch.Generator().manual_seed(0))  # what the liars know: the floor it settles on
    floor, code._hint = code.certified_floor, None
    measured = CyclicRepetitionCode(p, s)
    measured.floor = lambda dtype: floor
    lied, liars = _lie_under_the_floor(measured, received, tuple(range(s)), 0.97)
    result = code.decode(lied, generator=torch.Generator().manual_seed(1))
    truth = grads.sum(0)
    bound = 1e-5 + (code.growth + 8 * code.exposure) * level  # benchmarks/crc_accuracy.py --noise
    assert float((result.total.double() - truth).norm()) <= bound * float(truth.norm())
    assert set(result.faulty) <= liars


@pytest.mark.parametrize("p", [10, 15])
def test_honest_float16_rows_near_the_top_of_the_range_are_formed_finite_and_name_nobody(p):
    """Formed by Horner's rule in the partitions' own order, the rows of P = 15 holding a partition with entries
    of 3.5e4 overflowed on the way on one rank alone (a rescaling by 1.96), which the decode named; formed in
    increasing |w| (the coded step's order), every honest row is finite and nobody is named."""
    code = CyclicRepetitionCode(p, 1)
    gen = torch.Generator().manual_seed(3)
    gradients = torch.randn(p, 256, generator=gen, dtype=torch.float64)
    gradients[1] = 3.5e4 * torch.rand(256, generator=gen, dtype=torch.float64)
    rows = code.encode(gradients.to(torch.float16))
    assert bool(torch.isfinite(rows).all())
    result = code.decode(rows)
    assert result.faulty == []
