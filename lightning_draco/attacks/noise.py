"""Random corruptions: Gaussian noise and flipped bits (silent data corruption)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_draco._bits import bits_dtype
from lightning_draco.attacks import at_least, register_attack


@register_attack("gaussian")
def gaussian(honest: Tensor, *, sigma: float = 1.0, generator: torch.Generator) -> Tensor:
    """Independent ``N(0, sigma^2)`` entries in place of the gradient."""
    noise = torch.randn(honest.shape, generator=generator, dtype=torch.float32, device=generator.device)
    return (noise * sigma).to(device=honest.device, dtype=honest.dtype)


@register_attack("bit_flip", num_flips=at_least(1))
def bit_flip(honest: Tensor, *, num_flips: int = 1, generator: torch.Generator) -> Tensor:
    """Flip ``num_flips`` random bits of random entries, as a faulty GPU or memory would.

    Any bit may flip, the lowest mantissa bit included: a change of one unit in the last
    place that no tolerance-based check would see.
    """
    corrupted = honest.clone()
    bits = corrupted.view(-1).view(bits_dtype(corrupted))
    width = 8 * corrupted.element_size()
    where = torch.randint(bits.numel(), (num_flips,), generator=generator, device=generator.device).to(bits.device)
    which = torch.randint(width, (num_flips,), generator=generator, device=generator.device).to(bits.device)
    one = torch.ones((), dtype=bits.dtype, device=bits.device)
    # The top bit of a signed integer view is its sign bit; shifting 1 there is well defined in torch.
    masks = torch.bitwise_left_shift(one.expand(num_flips), which.to(bits.dtype))
    for i in range(num_flips):
        bits[where[i]] ^= masks[i]
    return corrupted
