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

__all__ = ["BLOCK", "Certified", "certify"]

#: Coordinates per program.
BLOCK = 512


if triton is not None:

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
        ACC: tl.constexpr,
        MEASURE: tl.constexpr,
        KEEP_CHECKS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program ``i`` takes coordinates ``[i * BLOCK, (i + 1) * BLOCK)``. For each row ``j`` in order:

        1. load its block once, widened to ``ACC``;
        2. ``total += mix[0, j] * y`` and ``checks[c] += mix[1 + c, j] * y`` for the ``C`` check rows;
        3. with ``MEASURE``, store the row's sum of squares over the block in ``squares[C + j, i]``.

        Then store the total, each check row's sum of squares in ``squares[c, i]`` and, with
        ``KEEP_CHECKS``, the check rows themselves.
        """
        program = tl.program_id(0)
        offsets = program.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < d
        stride = tl.zeros([], dtype=tl.int64) + d  # offsets past 2**31 (P x d), whatever d's type
        c = tl.arange(0, CP)
        out = tl.zeros([BLOCK], dtype=ACC)
        check = tl.zeros([CP, BLOCK], dtype=ACC)
        for j in tl.static_range(P):
            y = tl.load(rows + j * stride + offsets, mask=inside, other=0).to(ACC)
            out += tl.load(mix + j) * y
            weights = tl.load(mix + (1 + c) * P + j, mask=c < C, other=0)
            check += weights[:, None] * y[None, :]
            if MEASURE:
                tl.store(squares + (C + j) * programs + program, tl.sum(y * y, axis=0))
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


def certify(rows: Tensor, mix: Tensor, measure: bool, keep_checks: bool, *, block: int = BLOCK) -> Certified:
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
                P=p, C=checks_count, CP=max(triton.next_power_of_2(checks_count), 1), ACC=_TL[acc],
                MEASURE=measure, KEEP_CHECKS=keep_checks, BLOCK=block,
            )
    norms = squares.double().sum(dim=1).sqrt().cpu()
    return Certified(
        total,
        norms[:checks_count],
        norms[checks_count:] if measure else None,
        checks[:checks_count] if keep_checks else None,
    )
