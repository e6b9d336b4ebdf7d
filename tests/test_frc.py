"""FractionalRepetitionCode on its own: assignment, encoding, and decoding under any <= s corrupted rows."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_draco.codes import DracoDecodeError, FractionalRepetitionCode, accumulation_dtype, make_code

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
