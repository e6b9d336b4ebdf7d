"""Attacks that replace the gradient by a fixed function of it: scaled, negated, constant, non-finite."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_draco.attacks import register_attack


@register_attack("reverse")
def reverse(honest: Tensor, *, scale: float = 100.0) -> Tensor:
    """``-scale * g``: a large step the wrong way (the DRACO paper's attack, scale 100)."""
    return honest * (-scale)


@register_attack("sign_flip")
def sign_flip(honest: Tensor) -> Tensor:
    """``-g``: a plausible-looking vector of the right size pointing the wrong way."""
    return -honest


@register_attack("constant")
def constant(honest: Tensor, *, value: float = -100.0) -> Tensor:
    """Every entry ``value`` (-100 by default)."""
    return torch.full_like(honest, value)


@register_attack("nan")
def nan(honest: Tensor) -> Tensor:
    """Every entry NaN: one such vector poisons a plain average."""
    return torch.full_like(honest, float("nan"))


@register_attack("inf")
def inf(honest: Tensor) -> Tensor:
    """Every entry +Inf."""
    return torch.full_like(honest, float("inf"))
