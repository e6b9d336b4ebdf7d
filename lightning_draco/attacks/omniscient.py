"""Omniscient attacks: crafted from the honest vectors of all workers (ALIE, IPM).

A real adversary would need to see every honest gradient; the simulation pays for that with an
extra collective per bucket (two all-reduces of the bucket: the sum and the sum of squares of
the honest outgoing vectors), which plain training does not do. Timings of runs with these
attacks include that cost.
"""

from __future__ import annotations

from statistics import NormalDist

from torch import Tensor

from lightning_draco.attacks import register_attack


def alie_z(n: int, f: int) -> float:
    """Baruch et al.'s (2019) ``z_max`` for ``n`` workers of which ``f`` lie.

    The liars need ``s = floor(n / 2 + 1) - f`` honest workers on their side of the mean for a
    majority; ``z_max`` is the standard normal quantile that leaves that many behind:
    ``Phi^-1((n - s) / n)``. For example ``alie_z(50, 12) = 0.58``, ``alie_z(9, 2) = 0.43``,
    ``alie_z(6, 1) = 0``. Pass it as ``alie``'s ``z`` for the paper's factor.
    """
    if not (isinstance(n, int) and isinstance(f, int)) or isinstance(n, bool) or isinstance(f, bool):
        raise ValueError(f"alie_z: n and f must be integers (got n={n!r}, f={f!r}).")
    if n < 1 or not 0 <= f < n:
        raise ValueError(f"alie_z: needs n >= 1 workers and 0 <= f < n liars (got n={n}, f={f}).")
    s = (n + 2) // 2 - f  # floor(n / 2 + 1) - f
    if s <= 0:
        raise ValueError(
            f"alie_z: f={f} liars of n={n} are a majority on their own (s = floor(n/2 + 1) - f = {s}):"
            " the paper's z_max is unbounded; pass alie a z of your choosing."
        )
    return NormalDist().inv_cdf((n - s) / n)


@register_attack("alie")
def alie(honest: Tensor, *, z: float = 1.5, honest_mean: Tensor, honest_std: Tensor) -> Tensor:
    """"A little is enough" (Baruch et al., 2019): ``mean + z * std`` of the honest vectors, per coordinate.

    Every liar sends the same vector. ``z`` is a fixed factor, 1.5 by default (ByzFL's default);
    the paper derives it from the world instead, ``z_max = Phi^-1((n - s) / n)`` with
    ``s = floor(n / 2 + 1) - f`` (``alie_z(n, f)``), which is smaller in small worlds (0.43 for
    n = 9, f = 2; 0 for n = 6, f = 1). Close enough to the honest cloud to pass median-style
    filters, consistently biased.
    """
    return (honest_mean + z * honest_std).to(honest.dtype)


@register_attack("ipm")
def ipm(honest: Tensor, *, eps: float = 0.5, honest_mean: Tensor) -> Tensor:
    """Inner product manipulation (Xie et al., 2020): ``-eps * mean`` of the honest vectors."""
    return (-eps * honest_mean).to(honest.dtype)
