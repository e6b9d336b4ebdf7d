"""The repetition code's fused decode (Triton, or torch.compile) against the block-wise reference, on the CPU.

The fused path runs on CUDA by default; here its two kernels run on the CPU, so CI checks them without a
GPU: the Triton kernel in Triton's interpreter (tests/conftest.py turns it on where no GPU is present) and
the compiled passes through Inductor's CPU backend. Totals must be equal bit for bit (NaN payloads aside: half precision widened
by Inductor's conversion gives the canonical NaN) and the named workers identical, on adversarial inputs
in every wire dtype. Compiling costs seconds per dtype: the functions are compiled once (dynamic shapes)
and every case of a dtype reuses them. On a CUDA GPU (scripts/gpu_check.sh) one more test compares both
kernels on the GPU with the reference on the CPU.
"""

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lightning_draco.codes import DracoDecodeError, FractionalRepetitionCode
from lightning_draco.codes import frc as frc_module
from lightning_draco.codes import _triton, frc_triton

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.fixture(scope="module")
def inductor():
    """Skip the module where Inductor cannot compile for the CPU (no C++ compiler, unsupported platform)."""
    received = torch.randn(2, 1, 16).repeat(1, 3, 1).reshape(6, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FractionalRepetitionCode(6, 1, fused=True, kernel="compiled").decode(received)
    failed = [w for w in caught if "fused decode could not run" in str(w.message)]
    if failed:
        frc_module._FUSED_FAILED.clear()
        pytest.skip(f"torch.compile (Inductor, CPU) unavailable here: {failed[0].message}")
    yield
    assert not frc_module._FUSED_FAILED, "a fused decode fell back to the reference path"


@pytest.fixture(scope="module", params=["triton", "compiled"])
def kernel(request):
    """Each fused kernel where it can run on the CPU: Triton's interpreter, Inductor's CPU backend."""
    if request.param == "compiled":
        request.getfixturevalue("inductor")
    elif not _triton.available("cpu"):
        pytest.skip("Triton's interpreter is not available here (Triton missing, or a GPU present)")
    yield request.param
    assert not frc_module._FUSED_FAILED, f"a fused decode ({request.param}) fell back to the reference path"


def decode_on(device, code_args, received, fused, parts=False, batched=False, **options):
    """(total, or each group's part, on the CPU; faulty) of a decode of ``received`` moved to ``device``,
    or the DracoDecodeError's message. ``options``: the code's keyword arguments (``kernel=`` included)."""
    code = FractionalRepetitionCode(*code_args, fused=fused, batched=batched, **options)
    try:
        if parts:
            out, faulty = code.parts(received.to(device))
        else:
            result = code.decode(received.to(device))
            out, faulty = result.total, result.faulty
    except DracoDecodeError as err:
        return str(err)
    return out.cpu(), faulty


def decode_both(code_args, received, kernel, parts=False, **options):
    """(reference, fused with ``kernel``) outcomes on the CPU (``decode_on``)."""
    return [decode_on("cpu", code_args, received, False, parts, **options),
            decode_on("cpu", code_args, received, True, parts, kernel=kernel, **options)]


def assert_same(reference, fused, name=""):
    if isinstance(reference, str) or isinstance(fused, str):
        assert reference == fused, name
        return
    (total_r, faulty_r), (total_f, faulty_f) = reference, fused
    assert faulty_f == faulty_r, name
    assert total_f.dtype == total_r.dtype and total_f.shape == total_r.shape, name
    # Bit for bit, except the payload of a NaN: half precision widened to float32 by Inductor's
    # conversion gives the canonical NaN where torch's eager conversion keeps other bits.
    assert torch.equal(total_f.isnan(), total_r.isnan()), f"{name}: NaN in different places"
    finite_f, finite_r = total_f.nan_to_num(nan=0.0), total_r.nan_to_num(nan=0.0)
    assert torch.equal(finite_f.view(torch.uint8), finite_r.view(torch.uint8)), f"{name}: totals differ bit for bit"


def honest_rows(groups, r, d, dtype, gen):
    base = torch.randn(groups, 1, d, generator=gen, dtype=torch.float64).to(dtype)
    base[:, :, ::7] = 0.0  # zeros, so that -0.0 lies have somewhere to go
    base[0, :, 1::7] = -0.0  # and honest -0.0 (the reference sums from +0.0)
    base[:, :, 2::7] = -0.0  # in every group: -0.0 + -0.0 from +0.0 is +0.0 (a compiler folding 0 + x gives -0.0)
    return base.repeat(1, r, 1).reshape(groups * r, d)


def adversarial_cases(dtype):
    """(name, received) for FractionalRepetitionCode(6, 1): two groups of three.

    Liars sit at the groups' first members (the fused sum then adds another member of every group)
    only in float32: each member index compiles its own sum, and one dtype covers that logic.
    """
    gen = torch.Generator().manual_seed(0)
    honest = honest_rows(2, 3, 301, dtype, gen)
    cases = [("honest", honest)]
    firsts = dtype == torch.float32

    def lie(name, rank, fn):
        rows = honest.clone()
        rows[rank] = fn(rows[rank])
        cases.append((name, rows))

    lie("second member NaN", 1, lambda v: torch.full_like(v, math.nan))
    lie("last member -Inf", 5, lambda v: torch.full_like(v, -math.inf))
    lie("one NaN entry", 4, lambda v: v.index_fill(0, torch.tensor([5]), math.nan))
    lie("signed zeros flipped", 4, lambda v: torch.where(v == 0, -v, v))
    lie("low bit", 2, lambda v: (v.view(INTS[v.element_size()]) ^ 1).view(v.dtype))
    lie("another group's row", 4, lambda v: honest[0].clone())
    lie("huge", 2, lambda v: torch.full_like(v, torch.finfo(dtype).max))
    if firsts:
        lie("first member -100x", 0, lambda v: v * -100)
        lie("first member, another group's row", 3, lambda v: honest[0].clone())
        two = honest.clone()
        two[0] = -two[0]
        two[4] = math.nan
        cases.append(("a liar in each group, no member honest in both", two))
    two = honest.clone()
    two[1] = -two[1]
    two[5] = math.nan
    cases.append(("a liar in each group", two))
    diverged = honest.clone()
    diverged[3:, 10] = math.nan  # the whole group agrees on a NaN: nobody lied
    cases.append(("honest NaN", diverged))
    noisy = honest.clone()
    noisy[1] = noisy[1] + (noisy[1].abs() * 4 * torch.finfo(dtype).eps).to(dtype)  # no bitwise majority: fallback
    noisy[2, 3] = 7.0
    cases.append(("noisy replicas", noisy))
    broken = honest.clone()
    broken[4], broken[5] = 1.0, 2.0
    cases.append(("two liars in a group", broken))
    return cases


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_decode_equals_the_reference_on_adversarial_inputs(kernel, dtype):
    for name, received in adversarial_cases(dtype):
        for chunk in (64, 1 << 20):
            reference, fused = decode_both((6, 1), received, kernel, chunk_size=chunk)
            assert_same(reference, fused, name)
        reference, fused = decode_both((6, 1), received, kernel, parts=True)
        assert_same(reference, fused, name)


def test_fused_decode_with_larger_groups_and_two_classes(kernel):
    """r = 5 (all ten pairs in one pass), s = 2 liars, and classes {A, A, B, B, C} that no bitwise vote settles."""
    gen = torch.Generator().manual_seed(1)
    five = honest_rows(2, 5, 257, torch.float32, gen)
    for liars in ([0, 1], [3, 4], [2, 9]):
        received = five.clone()
        received[liars] = -received[liars]
        assert_same(*decode_both((10, 2), received, kernel))
    split = five.clone()
    split[2:4] = split[2:4] * (1 + 1e-4)  # {A, A, B, B, A} in group 0 is a majority; {A, A, B, B, C} is not
    split[4] = split[4] * (1 - 1e-4)
    assert_same(*decode_both((10, 2), split, kernel))


@given(
    st.sampled_from(DTYPES),
    st.integers(2, 80),
    # ranks that are not their group's first member: the sum then always adds member 0 (one compile per dtype)
    st.lists(st.tuples(st.sampled_from([1, 2, 4, 5]), st.sampled_from(["nan", "neg", "zero", "bit", "copy", "inf"])),
             max_size=2),
    st.integers(0, 2**31),
)
def test_fused_decode_equals_the_reference_on_random_liars(kernel, dtype, d, lies, seed):
    gen = torch.Generator().manual_seed(seed)
    received = honest_rows(2, 3, d, dtype, gen)
    for rank, kind in lies:
        row = received[rank]
        if kind == "nan":
            row[int(torch.randint(d, (1,), generator=gen))] = math.nan
        elif kind == "neg":
            row.neg_()
        elif kind == "zero":
            row.zero_()
        elif kind == "bit":
            row.view(INTS[row.element_size()])[d // 2] ^= 1 << 9
        elif kind == "copy":
            row.copy_(received[(rank + 3) % 6])
        else:
            row.fill_(math.inf)
    assert_same(*decode_both((6, 1), received, kernel, chunk_size=16))


def test_a_failing_compile_falls_back_to_the_reference_with_a_warning(monkeypatch):
    def broken(*key):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(frc_module, "_compiled", broken)
    received = honest_rows(2, 3, 50, torch.float32, torch.Generator().manual_seed(2))
    received[1] = -received[1]
    key = ("cpu", torch.float32, "compiled")
    try:
        with pytest.warns(RuntimeWarning, match=r"fused decode \(compiled kernel\) could not run on cpu.*block-wise"
                                                r" decode runs instead"):
            fused = FractionalRepetitionCode(6, 1, fused=True, kernel="compiled").decode(received)
        assert key in frc_module._FUSED_FAILED
        reference = FractionalRepetitionCode(6, 1, fused=False).decode(received)
        assert fused.faulty == reference.faulty == [1] and torch.equal(fused.total, reference.total)
    finally:
        frc_module._FUSED_FAILED.discard(key)


def test_fused_is_the_default_on_cuda_only_and_uses_triton_there():
    cpu = torch.zeros(3, 4)
    assert FractionalRepetitionCode(3, 1)._fused_kernel(cpu) is None
    interpreted = _triton.available("cpu")  # TRITON_INTERPRET=1 (tests/conftest.py, without a GPU)
    assert FractionalRepetitionCode(3, 1, fused=True)._fused_kernel(cpu) == ("triton" if interpreted else "compiled")
    assert FractionalRepetitionCode(3, 1, fused=True, kernel="compiled")._fused_kernel(cpu) == "compiled"
    assert FractionalRepetitionCode(3, 1, fused=True, kernel="triton")._fused_kernel(cpu) == "triton"
    if torch.cuda.is_available():
        expected = "triton" if _triton.available("cuda") else "compiled"
        assert FractionalRepetitionCode(3, 1)._fused_kernel(cpu.cuda()) == expected


def test_a_failing_triton_kernel_hands_over_to_the_compiled_passes(monkeypatch):
    """kernel="auto" on a GPU where the Triton kernel fails: this decode runs block-wise, the next ones with
    the compiled passes; the results are the reference's throughout."""
    def broken(*args, **kwargs):
        raise RuntimeError("no PTX for this GPU")

    monkeypatch.setattr(frc_triton, "compare_and_sum", broken)
    monkeypatch.setattr(_triton, "available", lambda device: True)  # as on a GPU with Triton installed
    received = honest_rows(2, 3, 50, torch.float32, torch.Generator().manual_seed(2))
    received[1] = -received[1]
    code = FractionalRepetitionCode(6, 1, fused=True)
    try:
        with pytest.warns(RuntimeWarning, match=r"\(triton kernel\) could not run.*RuntimeError: no PTX for this GPU"
                                                r".*this decode runs block-wise and later ones with the compiled kernel"):
            first = code.decode(received)
        assert ("cpu", torch.float32, "triton") in frc_module._FUSED_FAILED
        assert code._fused_kernel(received) == "compiled"
    finally:
        frc_module._FUSED_FAILED.discard(("cpu", torch.float32, "triton"))
    reference = FractionalRepetitionCode(6, 1, fused=False).decode(received)
    assert first.faulty == reference.faulty == [1] and torch.equal(first.total, reference.total)


def test_kernel_is_checked_when_the_code_is_built():
    with pytest.raises(ValueError, match="kernel must be one of 'auto', 'triton', 'compiled' \\(got 'cuda'\\)"):
        FractionalRepetitionCode(3, 1, kernel="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_decode_on_cuda_equals_the_cpu_reference(dtype):
    """The fused decode compiled by Triton on the GPU against the block-wise reference on the CPU: the
    same totals bit for bit and the same workers named, on the adversarial inputs and with r = 5."""
    frc_module._FUSED_FAILED.clear()
    cases = [((6, 1), name, received) for name, received in adversarial_cases(dtype)]
    gen = torch.Generator().manual_seed(1)
    five = honest_rows(2, 5, 4099, dtype, gen)
    for liars in ([0, 1], [3, 4], [2, 9]):
        received = five.clone()
        received[liars] = -received[liars]
        cases.append(((10, 2), f"r=5, liars {liars}", received))
    cases += [((6, 1), name, received) for received, name in long_row_cases(dtype)]
    kernels = ["compiled"] + (["triton"] if _triton.available("cuda") else [])
    for code_args, name, received in cases:
        reference = decode_on("cpu", code_args, received, fused=False)
        for kernel in kernels:
            assert_same(reference, decode_on("cuda", code_args, received, fused=True, kernel=kernel), f"{name} ({kernel})")
        assert_same(reference, decode_on("cuda", code_args, received, fused=False), name)
    assert not frc_module._FUSED_FAILED, "the fused decode fell back to the reference path on CUDA"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_decode_compares_rows_longer_than_a_piece_everywhere(kernel, dtype):
    """Rows of several comparison pieces and a remainder: a lie in the first piece, the last whole piece
    or the remainder is found alike, and the totals are the reference's bit for bit."""
    for received, name in long_row_cases(dtype):
        reference, fused = decode_both((6, 1), received, kernel)
        assert_same(reference, fused, name)
        assert not frc_module._FUSED_FAILED, name


def long_row_cases(dtype):
    """(received, name) for FractionalRepetitionCode(6, 1) with rows of two pieces and more."""
    piece = frc_module._EQUALITY_PIECE
    d = 2 * piece + 77
    gen = torch.Generator().manual_seed(3)
    honest = honest_rows(2, 3, d, dtype, gen)
    cases = [(honest, "honest")]
    for rank, where in [(1, 5), (2, piece - 1), (4, piece), (5, 2 * piece - 1), (1, 2 * piece), (4, d - 1)]:
        received = honest.clone()
        received.view(INTS[received.element_size()])[rank, where] ^= 1
        cases.append((received, f"low bit of rank {rank} at {where}"))
    exact = honest_rows(2, 3, 2 * piece, dtype, gen)  # no remainder
    exact[4, piece + 3] = math.nan
    cases.append((exact, "NaN, rows of exactly two pieces"))
    return cases


def test_every_row_length_and_group_count_keeps_the_fused_decode(kernel):
    """Lengths of 0, 1 and more pieces (and Triton blocks) with 0, 1 and more left over, one group and
    several: the fused decode gives the reference's outcome in every case and never exhausts its
    recompilation budget (a fused decode that gives up falls back to the reference for the rest of the process)."""
    piece, block = frc_module._EQUALITY_PIECE, frc_triton.BLOCK
    gen = torch.Generator().manual_seed(5)
    lengths = [1, 2, 7, block - 1, block, block + 1, piece - 1, piece, piece + 1, 2 * piece, 2 * piece + 1,
               2 * piece + 9, 3 * piece + 2]
    for p in (6, 3, 12):
        for d in lengths:
            received = honest_rows(p // 3, 3, d, torch.float32, gen)
            received[p - 1, d // 2] += 1.0
            reference, fused = decode_both((p, 1), received, kernel)
            assert reference[1] == [p - 1]
            assert_same(reference, fused, f"P={p}, d={d}")
            assert not frc_module._FUSED_FAILED, (p, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_batched_vote_compares_rows_longer_than_a_piece_everywhere(dtype):
    """The eager batched vote (accelerators' path when not compiled) cuts rows into the same pieces."""
    for received, name in long_row_cases(dtype):
        assert_same(*[decode_on("cpu", (6, 1), received, fused=False, batched=batched) for batched in (False, True)], name)


def test_a_liar_that_stays_at_a_first_member_costs_one_extra_sum_once(kernel, monkeypatch):
    """The fused decode sums the likely winners while the host votes: the first members, then the last
    decode's winners. A liar that stays at group 1's first member makes the first decode sum again (the
    guess lost) and no later one; a liar that moves there again costs one more. Every total is the
    reference's, bit for bit."""
    sums = []
    compiled, one_pass = frc_module._compiled, frc_triton.compare_and_sum

    def counting(name, *key):
        fn = compiled(name, *key)
        if name != "sum":
            return fn
        return lambda rows, member, zero: sums.append(member) or fn(rows, member, zero)

    def counting_pass(rows, bits, member, acc, leaders, **options):
        sums.append(member)
        return one_pass(rows, bits, member, acc, leaders, **options)

    monkeypatch.setattr(frc_module, "_compiled", counting)
    monkeypatch.setattr(frc_triton, "compare_and_sum", counting_pass)
    gen = torch.Generator().manual_seed(9)
    honest = honest_rows(3, 3, 3 * frc_module._EQUALITY_PIECE + 5, torch.float32, gen)
    code = FractionalRepetitionCode(9, 1, fused=True, kernel=kernel)
    per_decode = []
    for liar in (3, 3, 3, 4, 4, 0):
        received = honest.clone()
        received[liar] *= -100
        sums.clear()
        result = code.decode(received)
        per_decode.append(list(sums))
        reference = FractionalRepetitionCode(9, 1, fused=False).decode(received)
        assert result.faulty == reference.faulty == [liar]
        assert torch.equal(result.total, reference.total)
    # member 0 guessed, lost to the liar at 3 (group 1's first): redone with member 1, the guess from then on;
    # the liar at 4 (member 1) makes member 0 the winner again; the liar at 0 sends it back to member 1.
    assert per_decode == [[0, 1], [1], [1], [1, 0], [0], [0, 1]]


def test_groups_of_one_decode_fused_without_falling_back(kernel):
    """r = 1 (s = 0) has no pairs to compare: the fused decode sums the rows and warns of nothing."""
    received = torch.randn(4, 3 * frc_module._EQUALITY_PIECE, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = FractionalRepetitionCode(4, 0, 1, fused=True, kernel=kernel).decode(received)
        parts = FractionalRepetitionCode(4, 0, 1, fused=True, kernel=kernel).parts(received)
    reference = FractionalRepetitionCode(4, 0, 1, fused=False).decode(received)
    assert fused.faulty == parts[1] == [] and torch.equal(fused.total, reference.total)
    assert torch.equal(parts[0], received)
    assert not frc_module._FUSED_FAILED


def test_larger_groups_compare_their_other_pairs_with_the_kernel_that_runs(monkeypatch):
    """r = 7 compares the first member with the others first; where it is not in a sole majority (a liar
    there) the other pairs are compared too, by the Triton kernel on its path: Inductor is never asked
    (it would compile mid-run, and its failure would be blamed on the Triton kernel)."""
    if not _triton.available("cpu"):
        pytest.skip("Triton's interpreter is not available here (Triton missing, or a GPU present)")

    def no_inductor(*key):
        raise AssertionError("the Triton path asked for a compiled kernel")

    monkeypatch.setattr(frc_module, "_compiled", no_inductor)
    received = honest_rows(2, 7, 2 * frc_module._EQUALITY_PIECE + 5, torch.float32, torch.Generator().manual_seed(4))
    received[0] = -received[0]  # group 0's first member
    received[9, 3] += 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused = FractionalRepetitionCode(14, 3, fused=True, kernel="triton").decode(received)
        parts = FractionalRepetitionCode(14, 3, fused=True, kernel="triton").parts(received)
    reference = FractionalRepetitionCode(14, 3, fused=False).decode(received)
    assert fused.faulty == parts[1] == reference.faulty == [0, 9] and torch.equal(fused.total, reference.total)
    assert not frc_module._FUSED_FAILED


def test_choosing_triton_without_a_recent_enough_one_says_what_was_found(monkeypatch):
    monkeypatch.setattr(_triton, "triton", None)
    monkeypatch.setattr(_triton, "FOUND", "3.5.1")
    with pytest.raises(ValueError, match=r"kernel='triton' needs Triton 3\.6 or newer \(found 3\.5\.1; CUDA builds"):
        FractionalRepetitionCode(3, 1, kernel="triton")
    monkeypatch.setattr(_triton, "FOUND", None)
    with pytest.raises(ValueError, match=r"needs Triton 3\.6 or newer \(none is installed;"):
        FractionalRepetitionCode(3, 1, kernel="triton")


def _triton_interpreter():
    if not _triton.available("cpu"):
        pytest.skip("Triton's interpreter is not available here (Triton missing, or a GPU present)")


@pytest.fixture
def short_probe(monkeypatch):
    """The first distance piece (measured by the pass and by the reference alike) cut to 1,024 coordinates,
    so that rows longer than it stay quick in Triton's interpreter."""
    _triton_interpreter()
    monkeypatch.setattr(frc_triton, "PROBE", 1024)
    monkeypatch.setattr(frc_module, "_DISTANCE_PROBE", 1024)
    return 1024


@pytest.mark.parametrize("d", [1, 517, 1023, 1024 + 700])
def test_the_triton_pass_measures_what_naming_needs(short_probe, d):
    """compare_and_sum's flags, squared norm and probe distances against torch on the same rows: every pair
    flagged exactly where it differs (also a pair numbered past 32, in a second word of flags), the measured
    member's squares over the whole row, each member's squared distance to it over the first PROBE
    coordinates, all in float32 per block and float64 across blocks (relative error under 1e-5)."""
    gen = torch.Generator().manual_seed(d)
    rows = torch.randn(2, 9, d, generator=gen).mul(3).repeat_interleave(1, dim=1)
    rows[:, 1:] = rows[:, :1]
    rows[0, 2, d - 1] += 1.0  # pair (0, 2) and every pair of member 2 differ at the last coordinate only
    rows[1, 8] *= -100  # pairs (7, 8), numbered 35, in the second word
    rows[1, 5, 0] = 0.5 + rows[1, 5, 0]
    bits = rows.view(torch.int32)
    found = frc_triton.compare_and_sum(rows, bits, 4, torch.float32, 8, measure=4)
    every = [(a, b) for a in range(8) for b in range(a + 1, 9)]
    for g in range(2):
        expected = [bool(torch.equal(rows[g, a], rows[g, b])) for a, b in every]
        assert found.equal[g] == expected, g
        squares, spread = found.measured[g]
        truth = rows[g, 4].double().square().sum().item()
        assert squares == pytest.approx(truth, rel=1e-5)
        probe = min(d, frc_triton.PROBE)
        near = (rows[g, :, :probe].double() - rows[g, 4, :probe].double()).square().sum(dim=1).tolist()
        assert spread == pytest.approx(near, rel=1e-5, abs=1e-30) and spread[4] == 0.0
    assert torch.equal(found.total, rows[0, 4] + rows[1, 4])  # +0.0 + row 0, then row 1: the reference's order
    # Without a sum, flags only; without pairs, no flags.
    assert frc_triton.compare_and_sum(rows, bits, None, torch.float32, 8).total is None
    alone = frc_triton.compare_and_sum(rows, bits, 3, torch.float32, 0)
    assert alone.equal is None and alone.measured is None


def test_the_triton_pass_refuses_what_it_cannot_measure():
    rows = torch.zeros(1, 3, 8)
    with pytest.raises(ValueError, match=r"measure must be a member in \[0, r=3\), the summed one where both are"
                                         r" given \(got measure=1, member=0\)"):
        frc_triton.compare_and_sum(rows, rows.view(torch.int32), 0, torch.float32, 2, measure=1)
    with pytest.raises(ValueError, match=r"block must be a power of two in \[1, 16384\] \(got 768\)"):
        frc_triton.compare_and_sum(rows, rows.view(torch.int32), 0, torch.float32, 2, block=768)


def test_a_gross_lie_is_named_from_the_pass_without_measuring_again(monkeypatch, short_probe):
    """With the Triton pass a -100x liar is named from the pass's own sums: the reference distance is not
    asked for it (no more launches or syncs on a GPU). A lie too small to tell there (one coordinate) is
    measured by the reference. Both decodes name what the block-wise reference names, with its totals."""
    measured = []
    reference_distance = FractionalRepetitionCode._distance_to_winner

    def recording(self, members, winner_of_block, which):
        measured.append(list(which))
        return reference_distance(self, members, winner_of_block, which)

    monkeypatch.setattr(FractionalRepetitionCode, "_distance_to_winner", recording)
    honest = honest_rows(3, 3, short_probe + 300, torch.float32, torch.Generator().manual_seed(6))
    code = FractionalRepetitionCode(9, 1, fused=True, kernel="triton")
    gross = honest.clone()
    gross[4] *= -100
    sparse = honest.clone()
    sparse[7, 12] += 1.0
    for received, calls in ((gross, []), (sparse, [[1]])):
        measured.clear()
        result = code.decode(received)
        assert measured == calls
        reference = FractionalRepetitionCode(9, 1, fused=False).decode(received)
        assert result.faulty == reference.faulty and torch.equal(result.total, reference.total)
    assert not frc_module._FUSED_FAILED


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1.0), (torch.float32, 1e-24), (torch.float32, 1e18),
                                          (torch.bfloat16, 1.0), (torch.bfloat16, 1e-24), (torch.bfloat16, 1e18),
                                          (torch.float64, 1.0)], ids=str)
@pytest.mark.parametrize("spread", [True, False], ids=["spread", "one coordinate"])
def test_the_pass_and_the_reference_name_alike_at_the_bar_of_a_gross_lie(short_probe, dtype, scale, spread):
    """A liar differing from its group's winner over the first piece only, by just under to just over the
    reference's bar for a gross lie (twice the winner's norm), spread over the piece or in one coordinate,
    at ordinary scale, where float32 squares underflow (1e-24) and where they overflow (1e18): the Triton
    pass and the block-wise reference name the same workers and give the same totals. Under the declared
    tolerance of 1.0 the bar decides: a liar just under it is within the tolerance and spared, one over it
    is named (the pass's sums must not call it gross early, nor from underflowed squares)."""
    gen = torch.Generator().manual_seed(8)
    d = 3 * short_probe + 900
    honest = honest_rows(2, 3, d, torch.float64, gen).mul(scale)
    winner = honest[3].double()
    direction = torch.randn(short_probe, generator=gen, dtype=torch.float64)
    if not spread:
        direction = torch.zeros(short_probe, dtype=torch.float64).index_fill(0, torch.tensor([300]), 1.0)
    for ratio in (0.98, 0.999, 1.001, 1.0101, 1.5):
        delta = direction * (2 * ratio**0.5 * winner.norm() / direction.norm())
        received = honest.clone()
        received[5, :short_probe] += delta
        received = received.to(dtype)
        reference, fused = decode_both((6, 1), received, "triton", tolerance=1.0)
        assert_same(reference, fused, f"ratio {ratio}")
        if ratio in (0.98, 1.5):
            assert reference[1] == ([] if ratio < 1 else [5]), ratio


def test_under_an_infinite_tolerance_the_pass_names_nobody_the_reference_spares(short_probe):
    """tolerance=inf spares every member however far (the reference's infinite distance is not beyond it):
    the pass's own sums must not name a gross liar there either."""
    received = honest_rows(2, 3, short_probe + 100, torch.float32, torch.Generator().manual_seed(12))
    received[2] *= -100
    reference, fused = decode_both((6, 1), received, "triton", tolerance=math.inf)
    assert reference[1] == [] and fused[1] == []
    assert_same(reference, fused)


def test_naming_measures_norms_accurately_where_float32_sums_drift():
    """The reference's squared norms add float32 squares over short rows and the rows in float64: on data
    where one float32 sum over millions of coordinates drifts by 3% (large squares first, then squares just
    under half their last place), the error stays under 1e-4, in every wire dtype that widens."""
    v = torch.full((1 << 22,), (2.0**-4 * (1 + 2**-14)) ** 0.5)
    v[:8] = 2.0**10
    exact = v.double().square().sum().item()
    assert abs(torch.linalg.vector_norm(v).item() ** 2 / exact - 1) > 0.01  # the drift this guards against
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        w = v.to(dtype)
        truth = w.double().square().sum().item()
        assert frc_module._sq_norm(w) == pytest.approx(truth, rel=1e-4), dtype
    # Squares that overflow or underflow float32 are redone in float64; zero stays zero; a remainder
    # shorter than a row counts.
    for extreme in (torch.full((5000,), 1e30), torch.full((5000,), 1e-30)):
        assert frc_module._sq_norm(extreme) == pytest.approx(extreme.double().square().sum().item(), rel=1e-12)
    assert frc_module._sq_norm(torch.zeros(4097)) == 0.0
    assert frc_module._sq_norm(torch.ones(4097)) == 4097.0


def test_groups_of_two_vote_in_batches_when_their_members_differ():
    """r = 2 (s = 0) has one pair: where it differs, the batched vote has no other pairs to compare and
    goes to the block-wise vote (honest noise between the replicas: the reference's outcome)."""
    w = torch.randn(2, 1000, generator=torch.Generator().manual_seed(13))
    received = w.repeat_interleave(2, 0).clone()
    received[1] += received[1].abs() * 1e-7
    batched = decode_on("cpu", (4, 0, 2), received, fused=False, batched=True)
    assert_same(decode_on("cpu", (4, 0, 2), received, fused=False), batched)
    assert batched[1] == []


def test_more_rows_than_the_pass_unrolls_decode_as_the_reference(monkeypatch, unroll_launches):
    """Past ``frc_triton.UNROLLED_ROWS`` rows the Triton pass loops over the groups (its code would grow with
    P): at P = 96 with liars in three groups (gross, one coordinate, a first member's NaN) the decode is the
    reference's bit for bit, and the looped pass's flags, total and measures are the unrolled pass's."""
    _triton_interpreter()
    p = 96
    assert p > frc_triton.UNROLLED_ROWS
    received = honest_rows(p // 3, 3, 700, torch.float32, torch.Generator().manual_seed(17))
    received[4] *= -100
    received[31, 3] += 1.0
    received[p - 3] = math.nan
    reference, fused = decode_both((p, 1), received, "triton")
    assert reference[1] == [4, 31, p - 3]
    assert_same(reference, fused)
    assert unroll_launches["frc"] and not any(unroll_launches["frc"])
    rows = received.view(p // 3, 3, -1)
    looped = frc_triton.compare_and_sum(rows, rows.view(torch.int32), 1, torch.float32, 2, measure=1)
    monkeypatch.setattr(frc_triton, "UNROLLED_ROWS", p)
    unrolled = frc_triton.compare_and_sum(rows, rows.view(torch.int32), 1, torch.float32, 2, measure=1)
    assert unroll_launches["frc"][-2:] == [False, True]
    assert looped.equal == unrolled.equal
    assert repr(looped.measured) == repr(unrolled.measured)  # the NaN member's distance too
    assert torch.equal(looped.total, unrolled.total)
    assert [g for g, flags in enumerate(looped.equal) if not all(flags)] == [1, 10, 31]
    # Up to the unrolled rows (P = 63, the largest timed on a GPU) the pass is unrolled.
    decode_both((63, 1), received[:63], "triton")
    assert unroll_launches["frc"][-1] is True
