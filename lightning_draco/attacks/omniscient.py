"""Omniscient attacks: crafted from the honest vectors of all workers (ALIE, IPM).

A real adversary would need to see every honest gradient; the simulation pays for that with an
extra collective per bucket (two all-reduces of the bucket: the sum and the sum of squares of
the honest outgoing vectors), which plain training does not do. Timings of runs with these
attacks include that cost.
"""

from __future__ import annotations

from torch import Tensor

from lightning_draco.attacks import register_attack


@register_attack("alie")
def alie(honest: Tensor, *, z: float = 1.5, honest_mean: Tensor, honest_std: Tensor) -> Tensor:
    """"A little is enough" (Baruch et al., 2019): ``mean + z * std`` of the honest vectors, per coordinate.

    Close enough to the honest cloud to pass median-style filters, consistently biased.
    """
    return (honest_mean + z * honest_std).to(honest.dtype)


@register_attack("ipm")
def ipm(honest: Tensor, *, eps: float = 0.5, honest_mean: Tensor) -> Tensor:
    """Inner product manipulation (Xie et al., 2020): ``-eps * mean`` of the honest vectors."""
    return (-eps * honest_mean).to(honest.dtype)
