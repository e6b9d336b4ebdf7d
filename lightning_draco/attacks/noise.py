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
    """Flip ``num_flips`` distinct random bits of random entries, as a faulty GPU or memory would.

    Any bit may flip, the lowest mantissa bit included: a change of one unit in the last
    place that no tolerance-based check would see. The bits are distinct: two draws of the
    same bit would flip it back and send the honest vector.
    """
    corrupted = honest.clone()
    bits = corrupted.view(-1).view(bits_dtype(corrupted))
    width = 8 * corrupted.element_size()
    total = bits.numel() * width
    if num_flips > total:
        raise ValueError(
            f"attack 'bit_flip': num_flips must be at most the vector's {total} bits (got {num_flips})."
        )

    def draw(k: int) -> list:
        where = torch.randint(bits.numel(), (k,), generator=generator, device=generator.device)
        which = torch.randint(width, (k,), generator=generator, device=generator.device)
        return (where.cpu() * width + which.cpu()).tolist()

    chosen = list(dict.fromkeys(draw(num_flips)))  # distinct, in the order drawn
    while len(chosen) < num_flips:  # a bit drawn twice: draw again until num_flips distinct ones
        seen = set(chosen)
        for pick in draw(num_flips - len(chosen)):
            if pick not in seen:
                seen.add(pick)
                chosen.append(pick)
    picks = torch.tensor(chosen, dtype=torch.int64)
    where, which = (picks // width).to(bits.device), (picks % width).to(bits.device)
    one = torch.ones((), dtype=bits.dtype, device=bits.device)
    # The top bit of a signed integer view is its sign bit; shifting 1 there is well defined in torch.
    masks = torch.bitwise_left_shift(one.expand(num_flips), which.to(bits.dtype))
    for i in range(num_flips):
        bits[where[i]] ^= masks[i]
    return corrupted
