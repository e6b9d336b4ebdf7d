"""A lie confined to a few coordinates whose changes cancel: invisible to sums and to sign tests."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_draco.attacks import at_least, register_attack


@register_attack("sparse", pairs=at_least(1))
def sparse(honest: Tensor, *, pairs: int = 1, scale: float = 100.0, generator: torch.Generator) -> Tensor:
    """Add ``+X`` at ``pairs`` random coordinates and ``-X`` at ``pairs`` others, ``X = scale * max|g|``
    (``max|g|`` taken as 1 where it is 0 or not finite), capped so that the entries stay finite in the
    vector's dtype (float16 overflows at 65504: uncapped, the pair would be +-Inf, summing to NaN).

    The change sums to zero and touches a handful of entries, so the vector's sum, its norm (to
    first order) and any projection with equal weights on the chosen coordinates stay put: a code
    that checks only such statistics lets it through. A code under test should name the liar and
    recover the honest total.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1 (got {pairs!r}).")
    corrupted = honest.clone()
    flat = corrupted.view(-1)
    if flat.numel() < 2:
        return corrupted.add_(scale)
    count = min(2 * pairs, flat.numel() - flat.numel() % 2)
    where = torch.randperm(flat.numel(), generator=generator, device=generator.device)[:count].to(flat.device)
    size = float(honest.detach().abs().max()) if honest.numel() else 0.0
    largest = size if size > 0 and size == size and size != float("inf") else 1.0
    size = scale * largest
    if corrupted.is_floating_point():
        # In half precision scale * max|g| can pass the dtype's largest finite value: the pair would be
        # +Inf and -Inf, which sum to NaN (a non-finite lie, not a cancelling one). Keep g +- X finite.
        room = (torch.finfo(corrupted.dtype).max - largest) / 2
        size = max(min(size, room), -room)
    signs = torch.tensor([1.0, -1.0], dtype=flat.dtype, device=flat.device).repeat(count // 2)
    flat.index_add_(0, where, signs * size)
    return corrupted
