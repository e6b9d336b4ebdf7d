"""The cyclic code's certifying pass in one read of the received rows (a Triton kernel).

The pass computes, for the honest set being certified, the total ``b^T Y`` and the check rows
``M Y`` (the parity rows, then each suspect's miss), and the norms of the checks and of every row.
As torch operations on a GPU that is a product with a few output rows (cuBLAS ran it in a kernel
with 32 x 32 tiles: 3.6x the plain mean's time at P = 15, d = 11.2M on an H100), one more pass for
the row norms and, for half precision, a conversion pass before both. Here each program loads its
block of coordinates of every row once, widened in registers, and keeps the total and the checks
there; norms leave as one partial sum of squares per program, added in float64 on the host side.

Every certifying pass of a decode runs this kernel where it runs, so a set certified in one pass
or another gives the same total and norms, bit for bit. Where Triton is missing the torch passes
run; ``TRITON_INTERPRET=1`` (set before Triton is imported) runs the kernel on CPU tensors in
Triton's interpreter, which is how the tests check it without a GPU (_triton.py).
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lightning_draco.codes._triton import launching_on, triton

if triton is not None:
    import triton.language as tl

__all__ = ["BLOCK", "TERMS", "UNROLLED_ROWS", "Certified", "certify", "tile_rows"]

#: Coordinates per program.
BLOCK = 512
#: Product terms (check rows x rows of a tile) a program holds per coordinate: a tile of rows is
#: ``TERMS // check rows`` rows (a power of two, at most the rows' count rounded up).
TERMS = 16
#: Up to this many rows the kernel is unrolled over its tiles, as it was when timed on an H100 (P = 15 and
#: 63); beyond, it loops over them, so that its code and compile time stay bounded (unrolled at P = 255,
#: ptxas for sm_90 took 13 s on a 2-core CPU and the binary was 0.8 MB).
UNROLLED_ROWS = 64


def tile_rows(p: int, checks: int, terms: int = TERMS) -> int:
    """Rows per tile for ``p`` rows and ``checks`` check rows: ``terms // checks`` rounded down to a power of
    two, at least 1 and at most ``p`` rounded up to one."""
    per = max(1, terms // max(checks, 1))
    return min(1 << (per.bit_length() - 1), triton.next_power_of_2(p) if triton is not None else p)


if triton is not None:

    @triton.jit
    def _tile(
        rows, mix, squares, out, check, first, c, t, offsets, inside, stride, program, programs,
        P: tl.constexpr, C: tl.constexpr, CP: tl.constexpr, TILE: tl.constexpr, ACC: tl.constexpr,
        MEASURE: tl.constexpr,
    ):
        """The steps of ``_certify`` for the tile of rows from ``first``; returns the total and the checks."""
        j = first + t
        live = j < P
        y = tl.load(rows + j[:, None] * stride + offsets[None, :], mask=live[:, None] & inside[None, :], other=0)
        y = y.to(ACC)
        out += tl.sum(tl.load(mix + j, mask=live, other=0)[:, None] * y, axis=0)
        weights = tl.load(mix + (1 + c[:, None]) * P + j[None, :], mask=(c[:, None] < C) & live[None, :], other=0)
        check += tl.sum(weights[:, :, None] * y[None, :, :], axis=1)
        if MEASURE:
            tl.store(squares + (C + j) * programs + program, tl.sum(y * y, axis=1), mask=live)
        return out, check

    @triton.jit
    def _certify(
        rows,
        mix,
        total,
        squares,
        checks,
        d,
        programs,
        P: tl.constexpr,
        C: tl.constexpr,
        CP: tl.constexpr,
        TILE: tl.constexpr,
        ACC: tl.constexpr,
        MEASURE: tl.constexpr,
        KEEP_CHECKS: tl.constexpr,
        BLOCK: tl.constexpr,
        UNROLL: tl.constexpr,
    ):
        """Program ``i`` takes coordinates ``[i * BLOCK, (i + 1) * BLOCK)``. For each tile of ``TILE`` rows
        in order (rows past ``P`` load as zeros, with zero weights; unrolled with ``UNROLL``, else a loop;
        ``_tile``):

        1. load the tile's block once, widened to ``ACC``;
        2. ``total += sum_j mix[0, j] y_j`` and ``checks[c] += sum_j mix[1 + c, j] y_j`` over the tile's
           rows, for the ``C`` check rows;
        3. with ``MEASURE``, store each row's sum of squares over the block in ``squares[C + j, i]`` (one
           reduction for the tile: per row, one would cost a synchronization of the program per row).

        Then store the total, each check row's sum of squares in ``squares[c, i]`` and, with
        ``KEEP_CHECKS``, the check rows themselves.
        """
        program = tl.program_id(0)
        offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < d
        stride = tl.zeros([], dtype=tl.int64) + d  # offsets past 2**31 (P x d), whatever d's type
        c = tl.arange(0, CP)
        t = tl.arange(0, TILE)
        out = tl.zeros([BLOCK], dtype=ACC)
        check = tl.zeros([CP, BLOCK], dtype=ACC)
        if UNROLL:
            for first in tl.static_range(0, P, TILE):
                out, check = _tile(rows, mix, squares, out, check, first, c, t, offsets, inside, stride, program, programs,
                                   P, C, CP, TILE, ACC, MEASURE)
        else:
            for first in tl.range(0, P, TILE):
                out, check = _tile(rows, mix, squares, out, check, first, c, t, offsets, inside, stride, program, programs,
                                   P, C, CP, TILE, ACC, MEASURE)
        tl.store(total + offsets, out, mask=inside)
        tl.store(squares + c * programs + program, tl.sum(check * check, axis=1), mask=c < C)
        if KEEP_CHECKS:
            where = c[:, None].to(tl.int64) * stride + offsets[None, :]
            tl.store(checks + where, check, mask=(c[:, None] < C) & inside[None, :])

    _TL = {torch.float32: tl.float32, torch.float64: tl.float64}


class Certified(NamedTuple):
    """What one certifying pass leaves: on the rows' device ``total`` (``d``) and ``checks`` (``C x d``, or
    None); on the host, in float64, ``check_norms`` (``C``) and ``row_norms`` (``P``, or None)."""

    total: Tensor
    check_norms: Tensor
    row_norms: Optional[Tensor]
    checks: Optional[Tensor]


def certify(
    rows: Tensor, mix: Tensor, measure: bool, keep_checks: bool, *, block: int = BLOCK, terms: int = TERMS,
    warps: int = 4,
) -> Certified:
    """``mix @ rows`` in one pass over ``rows`` (``P x d``, contiguous): its first row (the total) and the
    norms of the others (the checks); with ``measure`` every row's norm; with ``keep_checks`` the checks.

    ``mix`` (``1 + C`` x ``P``) is in the accumulation dtype (float32 for half-precision rows). Norms are
    sums of squares in that dtype per block of ``block`` coordinates, added in float64 and brought to the
    host in one transfer: where squares over- or underflow, the caller redoes them in float64 as it would a
    torch pass's.
    """
    p, d = rows.shape
    acc = mix.dtype
    if not rows.is_contiguous():
        raise ValueError("rows must be contiguous (P, d): the kernel walks them by offset.")
    if mix.shape[1] != p or mix.shape[0] < 1:
        raise ValueError(f"mix must have P={p} columns and at least one row (got {tuple(mix.shape)}).")
    checks_count = mix.shape[0] - 1
    programs = triton.cdiv(d, block)
    device = rows.device
    total = torch.empty(d, dtype=acc, device=device)
    # Per program: each check row's sum of squares, then (with ``measure``) each row's.
    squares = torch.empty(checks_count + (p if measure else 0), programs, dtype=acc, device=device)
    checks = torch.empty(max(checks_count, 1), d, dtype=acc, device=device) if keep_checks else total
    if programs:  # else every partial sum is over no coordinates: zero
        with launching_on(device):
            _certify[(programs,)](
                rows, mix.contiguous(), total, squares, checks, d, programs,
                P=p, C=checks_count, CP=max(triton.next_power_of_2(checks_count), 1),
                TILE=tile_rows(p, checks_count, terms), ACC=_TL[acc], MEASURE=measure, KEEP_CHECKS=keep_checks,
                BLOCK=block, UNROLL=p <= UNROLLED_ROWS, num_warps=warps,
            )
    # One reduction in float64 and one transfer; the roots on the host (a conversion pass and a root pass
    # on the device were two more launches).
    norms = squares.sum(dim=1, dtype=torch.float64).cpu().sqrt()
    return Certified(
        total,
        norms[:checks_count],
        norms[checks_count:] if measure else None,
        checks[:checks_count] if keep_checks else None,
    )
