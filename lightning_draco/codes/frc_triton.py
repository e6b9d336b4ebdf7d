"""The repetition code's comparison and sum in one pass over the received rows (a Triton kernel).

The fused decode otherwise runs two compiled passes: one compares every group's members, one sums
the likely winners. The second re-reads ``P / r`` rows the first has just read; on an H100 at
``P = 15, d = 11.2M`` the two took 1.43x and 0.70x the plain mean's time. This kernel reads every
member once per block of coordinates, compares the pairs while the block is in registers and adds
member ``m`` of each group to the running total in group order, the additions of the reference decode.

The same pass measures what naming a liar needs (the likely winner's squared norm, and how far each
other member is from it over the first coordinates), so that a gross lie is named without another
launch or host sync: on an H100 the norms and the transfer that followed the vote took longer than
the pass itself at ``d = 11.2M``.

Triton ships with CUDA builds of torch; elsewhere (or without it) the compiled passes run (_triton.py).
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lightning_draco.codes._triton import launching_on, triton

if triton is not None:
    import triton.language as tl

__all__ = ["BLOCK", "PROBE", "UNROLLED_ROWS", "Compared", "compare_and_sum"]

#: Coordinates per program: each program walks the groups over one block of this many coordinates. On an
#: H100 the pass took, against the plain mean (P = 15 and 63, d = 11.2M and 100M, float32 and bfloat16),
#: 0.78x to 1.38x in blocks of 512 (4 warps), 0.80x to 1.57x in blocks of 1,024, 0.75x to 3.03x in 2,048.
BLOCK = 512
#: The first coordinates over which the pass measures each member's distance to the measured member
#: (the decode's first distance piece: a gross lie shows there).
PROBE = 1 << 16
#: Up to this many rows (groups x r) the kernel is unrolled over the groups, as it was when timed on an
#: H100 (P = 15 and 63); beyond, it loops over them, so that its code and compile time stay bounded (unrolled
#: at P = 255, ptxas for sm_90 took 44 s on a 2-core CPU and the binary was 1.5 MB; a GPU compiles it
#: before its first decode).
UNROLLED_ROWS = 64


if triton is not None:

    @triton.jit
    def _group(
        group, mine, total, offsets, inside, row, member, program, probe_programs,
        SUM: tl.constexpr, MEASURE: tl.constexpr, R: tl.constexpr, LEADERS: tl.constexpr, NUM_PAIRS: tl.constexpr,
        FIELD: tl.constexpr, VALUE: tl.constexpr, ACC: tl.constexpr, SQUARE: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One group's steps of ``_compare_and_sum`` over the program's block: ``group`` points at its first
        member's block, ``mine`` at its columns of the program's row of partials; returns the running total."""
        for word in tl.static_range((NUM_PAIRS + 31 // FIELD - 1) // (31 // FIELD)):
            differ = tl.zeros([BLOCK], dtype=tl.int32)
            for a in tl.static_range(LEADERS):
                x = tl.load(group + a * row, mask=inside, other=0)
                for b in tl.static_range(a + 1, R):
                    # pairs (a, b) numbered as the vote lists them: (0, 1), (0, 2), ..., (1, 2), ...
                    k = a * (2 * R - a - 1) // 2 + b - a - 1
                    if k // (31 // FIELD) == word:
                        y = tl.load(group + b * row, mask=inside, other=0)
                        differ += (x != y).to(tl.int32) << (FIELD * (k % (31 // FIELD)))
            counts = tl.sum(differ, axis=0)
            for k in tl.static_range(word * (31 // FIELD), NUM_PAIRS):
                if k // (31 // FIELD) == word:
                    field = (counts >> (FIELD * (k % (31 // FIELD)))) & ((1 << FIELD) - 1)
                    tl.store(mine + k, (field > 0).to(tl.float32))
        if SUM or MEASURE:
            w = tl.load(group + member * row, mask=inside, other=0).to(VALUE, bitcast=True)
            if SUM:
                total = total + w.to(ACC)
            if MEASURE:
                v = w.to(SQUARE)
                tl.store(mine + NUM_PAIRS, tl.sum(v * v, axis=0))
                for m in tl.static_range(R):
                    spread = tl.zeros([], dtype=SQUARE)
                    if program < probe_programs:
                        y = tl.load(group + m * row, mask=inside, other=0).to(VALUE, bitcast=True).to(SQUARE)
                        spread = tl.sum((y - v) * (y - v), axis=0)
                    tl.store(mine + NUM_PAIRS + 1 + m, spread)
        return total

    @triton.jit(do_not_specialize=["member"])
    def _compare_and_sum(
        bits,
        out,
        partials,
        d,
        member,
        probe_programs,
        SUM: tl.constexpr,
        MEASURE: tl.constexpr,
        GROUPS: tl.constexpr,
        R: tl.constexpr,
        LEADERS: tl.constexpr,
        NUM_PAIRS: tl.constexpr,
        FIELD: tl.constexpr,
        COLUMNS: tl.constexpr,
        VALUE: tl.constexpr,
        ACC: tl.constexpr,
        SQUARE: tl.constexpr,
        BLOCK: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        """Program ``i`` takes coordinates ``[i * BLOCK, (i + 1) * BLOCK)`` and writes its row of ``partials``
        (``COLUMNS`` per group: a flag per pair, then with ``MEASURE`` a squared norm and ``R`` probe
        distances). Per group, in order (unrolled with ``UNROLL``, else a loop; ``_group``):

        1. load each member's bits once (the loads below repeat addresses; the compiler and the cache
           serve the repeats); count where the pairs ``(a < LEADERS, a < b < R)`` differ, several pairs
           to a 32-bit word (pair ``k`` in the ``FIELD`` bits at ``FIELD * (k % per word)``; a field
           holds up to ``BLOCK``), one sum over the block per word, and store each pair's flag (1.0
           where the pair differs somewhere in the block);
        2. with ``SUM``, add member ``member``'s values, widened to ``ACC``, to the block's running
           total (which starts at +0.0, as the reference decode's does);
        3. with ``MEASURE``, store member ``member``'s sum of squares over the block (in ``SQUARE``)
           and, in the first ``probe_programs`` programs, each member's sum of squared differences
           from it (zeros elsewhere, and for ``member`` itself).
        """
        program = tl.program_id(0)
        offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < d
        row = tl.zeros([], dtype=tl.int64) + d  # offsets past 2**31 (P x d), whatever d's type
        mine = partials + program.to(tl.int64) * (GROUPS * COLUMNS)
        total = tl.zeros([BLOCK], dtype=ACC)
        if UNROLL:
            for g in tl.static_range(GROUPS):
                total = _group(bits + (g * R) * row + offsets, mine + g * COLUMNS, total, offsets, inside, row,
                               member, program, probe_programs, SUM, MEASURE, R, LEADERS, NUM_PAIRS, FIELD,
                               VALUE, ACC, SQUARE, BLOCK)
        else:
            for g in tl.range(0, GROUPS):
                total = _group(bits + (g * R) * row + offsets, mine + g * COLUMNS, total, offsets, inside, row,
                               member, program, probe_programs, SUM, MEASURE, R, LEADERS, NUM_PAIRS, FIELD,
                               VALUE, ACC, SQUARE, BLOCK)
        if SUM:
            tl.store(out + offsets, total, mask=inside)

    _TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


class Compared(NamedTuple):
    """What one pass leaves. ``equal`` and ``measured`` are on the host (the pass has finished); ``total`` is
    on the rows' device."""

    #: ``equal[g][k]``: whether pair ``k`` of group ``g`` is equal bit for bit over the whole row (None
    #: when no pairs were compared).
    equal: Optional[list[list[bool]]]
    #: The sum in the accumulation dtype, in group order, of member ``member`` of every group (None when
    #: ``member`` was None).
    total: Optional[Tensor]
    #: Per group ``(squares, spread)``: member ``measure``'s squared norm over the whole row, and each
    #: member's squared distance to it over the first ``PROBE`` coordinates (list of ``r``), in float32
    #: (float64 for float64 rows) per block and added in float64 (None when nothing was measured).
    measured: Optional[list[tuple[float, list[float]]]]


def compare_and_sum(
    rows: Tensor, bits: Tensor, member: Optional[int], acc: torch.dtype, leaders: int, *,
    measure: Optional[int] = None, block: int = BLOCK, warps: int = 4,
) -> Compared:
    """One pass over ``rows`` (``(groups, r, d)``, contiguous) and ``bits`` (its integer view), then one
    transfer of its few results to the host.

    Compares the pairs ``(a, b)`` for ``a < leaders``, ``a < b < r``, in that order; sums member ``member``
    of every group (no sum where it is None); with ``measure`` (a member, the one summed where both are
    given), measures that member as ``Compared.measured`` says. ``block`` (a power of two, at most
    2**14) and ``warps``: coordinates and warps per program.
    """
    groups, r, d = rows.shape
    if not rows.is_contiguous():
        raise ValueError("rows must be contiguous (groups, r, d): the kernel walks them by offset.")
    if not (member is None or 0 <= member < r) or not 0 <= leaders < r:
        raise ValueError(f"member and leaders must be in [0, r={r}) (got member={member}, leaders={leaders}).")
    if not (measure is None or (0 <= measure < r and member in (None, measure))):
        raise ValueError(f"measure must be a member in [0, r={r}), the summed one where both are given"
                         f" (got measure={measure}, member={member}).")
    if block & (block - 1) or not 0 < block <= min(PROBE, 1 << 14):  # a count of 2**14 fills 15 bits: 2 to a word
        raise ValueError(f"block must be a power of two in [1, {min(PROBE, 1 << 14)}] (got {block}).")
    pairs = sum(r - 1 - a for a in range(leaders))
    columns = pairs + (1 + r if measure is not None else 0)
    programs = triton.cdiv(d, block)
    total = torch.empty(d if member is not None else 0, dtype=acc, device=rows.device)
    square = torch.float64 if rows.dtype == torch.float64 else torch.float32
    partials = torch.empty(programs, groups, max(columns, 1), dtype=square, device=rows.device)
    chosen = member if member is not None else (measure or 0)
    if programs:
        with launching_on(rows.device):
            _compare_and_sum[(programs,)](
                bits, total, partials, d, chosen, triton.cdiv(min(d, PROBE), block), SUM=member is not None,
                MEASURE=measure is not None, GROUPS=groups, R=r, LEADERS=leaders, NUM_PAIRS=pairs,
                FIELD=block.bit_length(), COLUMNS=max(columns, 1), VALUE=_TL[rows.dtype], ACC=_TL[acc], SQUARE=_TL[square], BLOCK=block,
                UNROLL=groups * r <= UNROLLED_ROWS, num_warps=warps,
            )
    # One reduction and one transfer: differing blocks counted per pair, squares added in float64.
    found = partials.sum(dim=0, dtype=torch.float64).tolist() if columns else [[] for _ in range(groups)]
    equal = [[count == 0 for count in per_group[:pairs]] for per_group in found] if pairs else None
    measured = None
    if measure is not None:
        measured = [(per_group[pairs], per_group[pairs + 1 :]) for per_group in found]
    return Compared(equal, total if member is not None else None, measured)
