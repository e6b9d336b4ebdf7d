"""Centred clipping (Karimireddy et al., 2021): a stateful rule anchored on the previous step's result."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import (
    Aggregator, distances_to, far_rows_in_float64, finite_rows, is_count, is_number,
)


@register_aggregator
class CenteredClipping(Aggregator):
    """Centred clipping, ``iterations`` times (default 1), from the previous call's result
    (zero at the first call); ``tau`` defaults to 100:

    1. Find the non-finite inputs with one cheap pass; they contribute nothing (as if clipped
       to zero length), and only then are the finite rows copied out. With no finite input the
       result is NaN and the anchor stays (as the geometric median's): the previous step's
       result again would be applied as this step's gradient, where the step must fail
       (``NonFiniteGradientError``, or skipped with ``on_decode_failure="skip"``).
    2. c_i = min(1, tau / ||x_i - v||) for each input.
    3. v <- v + (1/n) sum_i c_i (x_i - v) = v (1 - sum_i c_i / n) + (sum_i c_i x_i) / n.

    Step 2 reads the inputs once without forming x_i - v (a distance to one point); step 3 is one
    matrix-vector product: two passes and no (n, d) temporaries per iteration, and one small
    transfer to the host (whether every distance held in the dtype; a finite liar far out is
    measured again in float64, its row alone, so that it keeps its pull of tau / n).

    The anchor is one vector of the full length: with whole-vector aggregation the PS lays the
    gradient out by parameter, not by DDP's buckets, so the anchor survives DDP's bucket rebuild
    and a resume (the strategy keeps it in the checkpoint).
    """

    name = "centered_clipping"

    def __init__(self, num_byzantine: int, tau: float = 100.0, iterations: int = 1):
        super().__init__(num_byzantine)
        if not (is_number(tau) and tau > 0 and is_count(iterations) and iterations >= 1):
            raise ValueError(
                f"aggregator 'centered_clipping' needs a number tau > 0 and an integer iterations >= 1"
                f" (got tau={tau!r}, iterations={iterations!r})."
            )
        self.tau, self.iterations = float(tau), int(iterations)
        self.anchor: Optional[Tensor] = None

    def aggregate(self, inputs: Tensor) -> Tensor:
        v = self.anchor
        if v is None or v.shape != inputs.shape[1:]:
            v = torch.zeros_like(inputs[0])
        else:  # e.g. restored from a checkpoint onto another device
            v = v.to(device=inputs.device, dtype=inputs.dtype)
        n = inputs.shape[0]
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        v = v.to(x.dtype)
        finite = finite_rows(x)
        if finite is not None:
            if not bool(finite.any()):
                return torch.full_like(inputs[0], float("nan"))
            x = x[finite]
        for _ in range(self.iterations):
            norms = distances_to(x, v)
            if not bool(torch.isfinite(norms).all()):
                # A finite row far out overflows its squared distance; it still pulls by tau / n towards itself.
                norms = far_rows_in_float64(norms, x, v)
            scale = torch.clamp(self.tau / norms.clamp_min(1e-30), max=1.0).to(x.dtype)
            v = v * (1 - scale.sum() / n) + (scale @ x) / n
        v = v.to(inputs.dtype)
        self.anchor = v.detach().clone()
        return v

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = state.get("anchor")
