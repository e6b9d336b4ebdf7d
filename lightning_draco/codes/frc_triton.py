"""The repetition code's comparison and sum in one pass over the received rows (a Triton kernel).

The fused decode otherwise runs two compiled passes: one compares every group's members, one sums
the likely winners. The second re-reads ``P / r`` rows the first has just read; on an H100 at
``P = 15, d = 11.2M`` the two took 1.43x and 0.70x the plain mean's time. This kernel reads every
member once per block of coordinates, compares the pairs while the block is in registers and adds
member ``m`` of each group to the running total in group order, the additions of the reference decode.

Triton ships with CUDA builds of torch; elsewhere (or without it) the compiled passes run (_triton.py).
"""

from typing import Optional

import torch
from torch import Tensor

from lightning_draco.codes._triton import launching_on, triton

if triton is not None:
    import triton.language as tl

__all__ = ["BLOCK", "compare_and_sum"]

#: Coordinates per program: each program walks the groups over one block of this many coordinates. On an
#: H100 the pass took, against the plain mean (P = 15 and 63, d = 11.2M and 100M, float32 and bfloat16),
#: 0.78x to 1.38x in blocks of 512 (4 warps), 0.80x to 1.57x in blocks of 1,024, 0.75x to 3.03x in 2,048.
BLOCK = 512


if triton is not None:

    @triton.jit(do_not_specialize=["member"])
    def _compare_and_sum(
        bits,
        out,
        equal,
        d,
        member,
        SUM: tl.constexpr,
        GROUPS: tl.constexpr,
        R: tl.constexpr,
        LEADERS: tl.constexpr,
        NUM_PAIRS: tl.constexpr,
        VALUE: tl.constexpr,
        ACC: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Program ``i`` takes coordinates ``[i * BLOCK, (i + 1) * BLOCK)``. Per group, in order:

        1. load each member's bits once (the loads below repeat addresses; the compiler and the
           cache serve the repeats), compare member ``a < LEADERS`` with every later member ``b``,
           and clear ``equal[g, pair(a, b)]`` where any coordinate of the block differs;
        2. with ``SUM``, add member ``member``'s values, widened to ``ACC``, to the block's running
           total (which starts at +0.0, as the reference decode's does).
        """
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < d
        row = tl.zeros([], dtype=tl.int64) + d  # offsets past 2**31 (P x d), whatever d's type
        total = tl.zeros([BLOCK], dtype=ACC)
        for g in tl.static_range(GROUPS):
            group = bits + (g * R) * row + offsets
            for a in tl.static_range(LEADERS):
                x = tl.load(group + a * row, mask=inside, other=0)
                for b in tl.static_range(a + 1, R):
                    y = tl.load(group + b * row, mask=inside, other=0)
                    differ = tl.max((x != y).to(tl.int32), axis=0)
                    if differ > 0:
                        # pairs (a, b) numbered as the vote lists them: (0, 1), (0, 2), ..., (1, 2), ...
                        tl.atomic_min(equal + g * NUM_PAIRS + (a * (2 * R - a - 1) // 2 + b - a - 1), 0)
            if SUM:
                w = tl.load(group + member * row, mask=inside, other=0)
                total = total + w.to(VALUE, bitcast=True).to(ACC)
        if SUM:
            tl.store(out + offsets, total, mask=inside)

    _TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def compare_and_sum(
    rows: Tensor, bits: Tensor, member: Optional[int], acc: torch.dtype, leaders: int, *, block: int = BLOCK,
    warps: int = 4,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """One pass over ``rows`` (``(groups, r, d)``, contiguous) and ``bits`` (its integer view).

    Returns ``(equal, total)``: ``equal[g, p]`` (int32) 1 where pair ``p`` of group ``g`` is equal bit for bit
    over the whole row, else 0, the pairs being ``(a, b)`` for ``a < leaders``, ``a < b < r``, in that order
    (``None`` when ``leaders`` is 0); ``total`` the sum in ``acc``, in group order, of member
    ``member`` of every group (None, and no sum, where ``member`` is None). Both are queued on the rows'
    device; reading ``equal`` waits for them.
    ``block`` (a power of two) and ``warps``: coordinates and warps per program.
    """
    groups, r, d = rows.shape
    if not rows.is_contiguous():
        raise ValueError("rows must be contiguous (groups, r, d): the kernel walks them by offset.")
    if not (member is None or 0 <= member < r) or not 0 <= leaders < r:
        raise ValueError(f"member and leaders must be in [0, r={r}) (got member={member}, leaders={leaders}).")
    pairs = sum(r - 1 - a for a in range(leaders))
    equal = torch.ones(groups, max(pairs, 1), dtype=torch.int32, device=rows.device)  # 1: equal until a block differs
    total = torch.empty(d if member is not None else 0, dtype=acc, device=rows.device)
    with launching_on(rows.device):
        _compare_and_sum[(triton.cdiv(d, block),)](
            bits, total, equal, d, member or 0, SUM=member is not None, GROUPS=groups, R=r, LEADERS=leaders,
            NUM_PAIRS=max(pairs, 1), VALUE=_TL[rows.dtype], ACC=_TL[acc], BLOCK=block, num_warps=warps,
        )
    return (equal[:, :pairs] if pairs else None), (total if member is not None else None)
