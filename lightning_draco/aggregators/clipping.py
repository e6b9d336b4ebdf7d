"""Centred clipping (Karimireddy et al., 2021): a stateful rule anchored on the previous step's result."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import Aggregator


@register_aggregator
class CenteredClipping(Aggregator):
    """v <- v + mean_i (x_i - v) * min(1, tau / ||x_i - v||), ``iterations`` times (default 1),
    starting from the previous call's result (zero at the first call). ``tau`` defaults to 100.

    A non-finite input contributes nothing (as if clipped to zero length). The anchor is one vector
    of the full length: with whole-vector aggregation the PS lays the gradient out by parameter,
    not by DDP's buckets, so the anchor survives DDP's bucket rebuild and a resume (the strategy
    keeps it in the checkpoint).
    """

    name = "centered_clipping"

    def __init__(self, num_byzantine: int, tau: float = 100.0, iterations: int = 1):
        super().__init__(num_byzantine)
        if tau <= 0 or iterations < 1:
            raise ValueError("aggregator 'centered_clipping' needs tau > 0 and iterations >= 1.")
        self.tau, self.iterations = float(tau), int(iterations)
        self.anchor: Optional[Tensor] = None

    def aggregate(self, inputs: Tensor) -> Tensor:
        v = self.anchor
        if v is None or v.shape != inputs.shape[1:]:
            v = torch.zeros_like(inputs[0])
        else:  # e.g. restored from a checkpoint onto another device
            v = v.to(device=inputs.device, dtype=inputs.dtype)
        finite = torch.isfinite(inputs).all(dim=1, keepdim=True)
        for _ in range(self.iterations):
            diff = torch.where(finite, inputs - v, torch.zeros((), dtype=inputs.dtype, device=inputs.device))
            norms = torch.linalg.vector_norm(diff.float(), dim=1)
            scale = torch.clamp(self.tau / norms.clamp_min(1e-30), max=1.0).to(inputs.dtype)
            v = v + (diff * scale[:, None]).mean(dim=0)
        self.anchor = v.detach().clone()
        return v

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = state.get("anchor")
