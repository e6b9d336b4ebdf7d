"""CyclicRepetitionCode on its own: construction, decoding under <= s corrupted rows, adaptive liars."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lightning_draco.codes import CyclicRepetitionCode, DracoDecodeError, make_code
from lightning_draco.codes.crc import HALF_ROUNDING_SLACK


def encode(code, grads):
    """Honest coded vectors, rounded to the dtype of ``grads``."""
    return (code.encoding_matrix @ grads.double()).to(grads.dtype)


def projection(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("p, s", [(3, 1), (5, 2), (6, 1), (6, 2), (7, 3), (8, 3), (12, 5), (16, 2), (31, 4), (32, 6)])
def test_construction(p, s):
    code = CyclicRepetitionCode(p, s)
    w = code.encoding_matrix
    assert code.redundancy == 2 * s + 1
    for worker in range(p):
        held = code.partitions(worker)
        assert held == [(worker + t) % p for t in range(2 * s + 1)]
        assert set(torch.nonzero(w[worker]).flatten().tolist()) <= set(held)
    assert torch.linalg.matrix_rank(w).item() == p - 2 * s
    # The sum of all partitions is a combination of any P - s workers' vectors.
    gen = torch.Generator().manual_seed(p * 100 + s)
    for _ in range(10):
        suspects = tuple(sorted(torch.randperm(p, generator=gen)[:s].tolist()))
        b, _ = code._combiner(suspects)
        honest = [i for i in range(p) if i not in suspects]
        torch.testing.assert_close(b @ w[honest], torch.ones(p, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    "args, message",
    [
        ((4, 2), r"needs at least 2 \* num_adversaries \+ 1 = 5 workers"),
        ((7, 1, 5), r"code='crc' uses redundancy r = 2 \* num_adversaries \+ 1 = 3"),
        ((7, -1), r"num_adversaries must be an integer >= 0"),
    ],
)
def test_invalid_parameters_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        CyclicRepetitionCode(*args)


def test_half_precision_is_refused_where_it_is_inaccurate():
    CyclicRepetitionCode(8, 2).check_wire_dtype(torch.bfloat16)
    CyclicRepetitionCode(15, 2).check_wire_dtype(torch.float16)
    with pytest.raises(ValueError, match=r"P=15, s=2 amplifies rounding by 10.5, more than 6 allowed for bfloat16"):
        CyclicRepetitionCode(15, 2).check_wire_dtype(torch.bfloat16)
    with pytest.raises(ValueError, match=r"P=64, s=2 amplifies rounding by .* for bfloat16 gradients"):
        CyclicRepetitionCode(64, 2).check_wire_dtype(torch.bfloat16)
    CyclicRepetitionCode(64, 10).check_wire_dtype(torch.float32)


def test_zero_adversaries():
    code = make_code("crc", 4, 0)
    grads = torch.randn(4, 9, dtype=torch.float64)
    result = code.decode(encode(code, grads))
    torch.testing.assert_close(result.total, grads.sum(0))
    assert result.faulty == []


def _seed_of(row):
    finite = torch.nan_to_num(row.double(), nan=0.0, posinf=0.0, neginf=0.0)
    return int(finite.abs().sum() * 1e3) % 2**31


CORRUPT = {
    "nan": lambda row, other: torch.full_like(row, math.nan),
    "inf": lambda row, other: torch.full_like(row, math.inf),
    "huge": lambda row, other: torch.full_like(row, min(1e30, torch.finfo(row.dtype).max / 8)),
    "reverse": lambda row, other: -100 * row,
    "other_node": lambda row, other: other.clone(),
    "tiny": lambda row, other: row * (1 + 1e-6),
    "noise": lambda row, other: torch.randn(row.shape, generator=torch.Generator().manual_seed(_seed_of(other))),
}


@st.composite
def cases(draw):
    p = draw(st.sampled_from([3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 16]))
    s = draw(st.integers(1, min(4, (p - 1) // 2)))
    liars = draw(st.lists(st.integers(0, p - 1), min_size=0, max_size=s, unique=True))
    kinds = [draw(st.sampled_from(sorted(CORRUPT))) for _ in liars]
    return p, s, liars, kinds, draw(st.integers(0, 2**31)), draw(st.sampled_from([1, 2, 5, 64, 100, 300]))


@given(cases())
def test_decode_recovers_the_sum_and_catches_the_liars(case):
    p, s, liars, kinds, seed, d = case
    code = CyclicRepetitionCode(p, s)
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(p, d, dtype=torch.float64, generator=gen)
    honest = encode(code, grads.float())
    received = honest.clone()
    for liar, kind in zip(liars, kinds):
        received[liar] = CORRUPT[kind](honest[liar], honest[(liar + 1) % p])
    result = code.decode(received, generator=projection(seed))
    truth = grads.sum(0)
    # fp32 rounding is relative to the gradients' size: a sum that nearly cancels (d = 1) cannot
    # be known to 1e-5 of itself, so the error is measured against the larger of the two.
    scale = max(float(truth.norm()), float(grads.norm(dim=1).max()))
    assert float((result.total.double() - truth).norm()) <= 1e-5 * scale
    assert set(result.faulty) <= set(liars)
    # Every liar whose vector is far off (non-finite, or off by 10x the largest honest vector) is
    # named. Smaller lies are set aside whenever located (the sum above is right), but naming them
    # rests on one random projection of their error, which can fall below the rounding bound; for
    # a handful of coordinates it can even cancel (d = 2: a difference (a, a) under signs (+, -)).
    if d >= 64:
        big = {w for w in liars if not torch.isfinite(received[w]).all()
               or float((received[w] - honest[w]).norm()) > 10 * float(honest.norm(dim=1).max())}
        assert big <= set(result.faulty)


# float64: the code matrix and its solves carry their own float64 rounding, well above one ulp of the data.
EPS = {torch.float64: 1e-13, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@given(cases(), st.sampled_from(sorted(EPS, key=str)))
def test_decode_in_every_wire_dtype_the_code_accepts(case, dtype):
    p, s, liars, kinds, seed, d = case
    code = CyclicRepetitionCode(p, s)
    try:
        code.check_wire_dtype(dtype)
    except ValueError:
        assume(False)  # refused at setup for this (P, s): never decoded
    gen = torch.Generator().manual_seed(seed)
    grads = torch.randn(p, d, dtype=torch.float64, generator=gen).to(dtype)
    honest = encode(code, grads)
    received = honest.clone()
    for liar, kind in zip(liars, kinds):
        received[liar] = CORRUPT[kind](honest[liar], honest[(liar + 1) % p]).to(dtype)
    result = code.decode(received, generator=projection(seed))
    truth = grads.double().sum(0)
    # The coded vectors were rounded to the wire dtype, and the combiner amplifies that by at most its
    # growth. In half precision a lie is told from rounding only beyond the decoder's misfit allowance
    # (HALF_ROUNDING_SLACK units of rounding per partition, of the largest row): a lie below it may go
    # unnoticed and shift the sum by that much, amplified the same way.
    scale = max(float(truth.norm()), float(honest.double().norm(dim=1).max()), float(grads.double().norm(dim=1).max()))
    per_row = 4 * EPS[dtype] if dtype == torch.float64 else 2 * HALF_ROUNDING_SLACK * EPS[dtype] * code.redundancy
    assert float((result.total.double() - truth).norm()) <= per_row * max(1.0, code.growth) * scale
    assert set(result.faulty) <= set(liars)


def test_projection_is_fresh_and_secret():
    code = CyclicRepetitionCode(7, 1)
    grads = torch.randn(7, 64, dtype=torch.float64)
    received = encode(code, grads.float())
    one, two = code._project(received, projection(1))[0], code._project(received, projection(2))[0]
    assert not torch.allclose(one, two)


@pytest.mark.parametrize("guess", ["all_ones", "previous", "own_draw"])
def test_adaptive_adversary_hiding_from_a_guessed_projection_is_caught(guess):
    """The liar adds an error orthogonal to the sign vector it guesses; the server's secret one differs."""
    p, s, d = 7, 1, 4096
    code = CyclicRepetitionCode(p, s)
    grads = torch.randn(p, d, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    received = encode(code, grads.float())
    if guess == "all_ones":
        signs = torch.ones(d)
    else:
        seed = 41 if guess == "previous" else 12345  # the server's previous step, or the liar's own draw
        table = torch.tensor([[1.0 if (b >> k) & 1 else -1.0 for k in range(8)] for b in range(256)])
        raw = torch.empty(d // 8, dtype=torch.uint8).random_(0, 256, generator=projection(seed)).long()
        signs = table[raw].view(-1)
    error = torch.randn(d) * 50
    error -= (error @ signs) / (signs @ signs) * signs  # invisible under the guessed projection
    liar = 4
    received[liar] += error
    result = code.decode(received, generator=projection(42))  # the server's fresh secret draw
    truth = grads.sum(0)
    assert result.faulty == [liar]
    assert float((result.total.double() - truth).norm() / truth.norm()) <= 1e-5


def test_more_than_s_liars_are_detected_not_absorbed():
    code = CyclicRepetitionCode(9, 1)
    grads = torch.randn(9, 200, dtype=torch.float64)
    received = encode(code, grads.float())
    received[2] += 10 * torch.randn(200)
    received[6] += 10 * torch.randn(200)
    with pytest.raises(DracoDecodeError, match="more than s=1 workers are faulty"):
        code.decode(received, generator=projection(0))


def test_non_finite_rows_beyond_s_raise():
    code = CyclicRepetitionCode(7, 1)
    received = encode(code, torch.randn(7, 10))
    received[1] = math.nan
    received[3] = math.inf
    with pytest.raises(DracoDecodeError, match=r"2 workers \(\[1, 3\]\) sent non-finite or absurdly large values"):
        code.decode(received, generator=projection(0))
