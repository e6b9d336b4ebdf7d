"""Colluding adversaries: liars that hold the same vector (one repetition group) send the same plausible wrong one."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_draco.attacks import register_attack


@register_attack("collude")
def collude(honest: Tensor, *, strength: float = 1.0, shared_generator: torch.Generator) -> Tensor:
    """The honest vector plus noise of the same scale, drawn from a stream all adversaries share.

    Adversaries that hold the same honest vector (the members of one repetition group) send
    bitwise-identical wrong vectors: the worst case for a vote, which must still find the
    honest value among at least s+1 agreeing members.
    """
    scale = float(honest.float().norm()) / max(honest.numel(), 1) ** 0.5 or 1.0
    noise = torch.randn(honest.shape, generator=shared_generator, device=shared_generator.device)
    return (honest.float() + noise.to(honest.device) * scale * strength).to(honest.dtype)
