"""Adaptive attacks: the attack factor searched against the defence in use, and mimicry.

They need every worker's honest vector (an all-gather per bucket in the simulation) and the
PS's defence, run on the liar's copy of the code and rule without touching their state. On a
DRACO code every candidate is caught, so the search finds nothing to gain; on a robust rule it
finds the factor that moves the result furthest.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from lightning_draco.attacks import Rule, at_least, positive, register_attack

Defence = Callable[[Tensor], Optional[Tensor]]


def _received_with(honest_vectors: Tensor, liars, lie: Tensor) -> Tensor:
    received = honest_vectors.clone()
    if liars:
        received[list(liars)] = lie.to(received.dtype)
    return received


def deviation(defence: Defence, honest_vectors: Tensor, liars, lie: Tensor, reference: Tensor) -> float:
    """How far the PS's result moves from ``reference`` when every liar sends ``lie`` (-1: decode failed)."""
    result = defence(_received_with(honest_vectors, liars, lie))
    if result is None:
        return -1.0
    value = float(torch.linalg.vector_norm((result - reference).double()))
    return value if math.isfinite(value) else math.inf


def search_factor(objective: Callable[[float], float], high: float, grid: int, refine: int) -> float:
    """The factor in [0, high] that maximises ``objective``, by a grid then a golden-section search.

    1. Evaluate 0 and ``grid - 1`` factors spaced geometrically from high / 1000 to ``high``
       (attack factors matter on a log scale: 0.1 and 1 differ as much as 1 and 10).
    2. Around the best grid point, search the bracket between its neighbours by golden
       section for ``refine`` more evaluations, keeping the best point seen.
    Ties go to the smaller factor (the less conspicuous lie).
    """
    if grid < 2 or refine < 0 or not high > 0:
        raise ValueError(
            f"the attack's factor search needs grid >= 2, refine >= 0 and a maximum factor (z_max, eps_max) > 0"
            f" (got grid={grid}, refine={refine}, maximum={high})."
        )
    points = [0.0] + [high * 1000.0 ** (i / (grid - 2) - 1) for i in range(grid - 1)] if grid > 2 else [0.0, high]
    values = [objective(p) for p in points]
    best = max(range(len(points)), key=lambda i: (values[i], -i))
    best_x, best_y = points[best], values[best]
    lo, hi = points[max(best - 1, 0)], points[min(best + 1, len(points) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa = objective(a) if refine >= 1 else -math.inf
    fb = objective(b) if refine >= 2 else -math.inf
    for _ in range(max(refine - 2, 0)):
        if fa >= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = objective(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = objective(b)
    for x, y in ((a, fa), (b, fb)):
        if y > best_y:
            best_x, best_y = x, y
    return best_x


@register_attack("optimal_alie", z_max=positive(), grid=at_least(2), refine=at_least(0))
def optimal_alie(
    honest: Tensor,
    *,
    z_max: float = 20.0,
    grid: int = 16,
    refine: int = 10,
    honest_vectors: Tensor,
    liars,
    defence: Defence,
) -> Tensor:
    """ALIE with its factor searched against the defence in use:

    1. mu, sigma = per-coordinate mean and standard deviation of all workers' honest vectors.
    2. z* = argmax over z in [0, z_max] of ||defence(received with every liar sending
       mu + z sigma) - defence(honest vectors)|| (``search_factor``: a grid, then golden section).
    3. Send mu + z* sigma.

    Baruch et al. (2019) set z from the world alone (``alie_z``: the largest z that a majority
    filter is expected to let through); the searched one is the largest move the PS's actual
    rule lets through. The reference is the defence's result on the honest vectors (ByzFL's
    Optimal ALIE measures from their mean instead; on an exact DRACO decode the two coincide).
    """
    x = honest_vectors.float() if honest_vectors.dtype in (torch.float16, torch.bfloat16) else honest_vectors
    mu, sigma = x.mean(dim=0), x.std(dim=0, unbiased=False)
    reference = defence(honest_vectors)
    if reference is None:
        return mu.to(honest.dtype)
    z = search_factor(lambda z: deviation(defence, honest_vectors, liars, mu + z * sigma, reference), z_max, grid, refine)
    return (mu + z * sigma).to(honest.dtype)


@register_attack("optimal_ipm", eps_max=positive(), grid=at_least(2), refine=at_least(0))
def optimal_ipm(
    honest: Tensor,
    *,
    eps_max: float = 20.0,
    grid: int = 16,
    refine: int = 10,
    honest_vectors: Tensor,
    liars,
    defence: Defence,
) -> Tensor:
    """Inner product manipulation (Xie et al., 2020) with its factor searched against the defence:

    1. mu = the mean of all workers' honest vectors.
    2. eps* = argmax over eps in [0, eps_max] of ||defence(received with every liar sending
       -eps mu) - defence(honest vectors)|| (``search_factor``).
    3. Send -eps* mu.
    """
    x = honest_vectors.float() if honest_vectors.dtype in (torch.float16, torch.bfloat16) else honest_vectors
    mu = x.mean(dim=0)
    reference = defence(honest_vectors)
    if reference is None:
        return (-mu).to(honest.dtype)
    eps = search_factor(lambda e: deviation(defence, honest_vectors, liars, -e * mu, reference), eps_max, grid, refine)
    return (-eps * mu).to(honest.dtype)


def _honest_rank(target: Optional[int], world_size: int, liars: frozenset) -> Optional[str]:
    if target is not None and target >= world_size:
        return f"a rank in [0, {world_size}) for a world of {world_size} ranks"
    if target in liars:  # a copy of the liar's own honest vector is no lie
        return f"an honest rank: rank {target} is one of the liars {sorted(liars)}, and it would send its own gradient"
    return None


@register_attack(
    "mimic", target=Rule(lambda v: v is None or at_least(0).holds(v), "a rank (an integer >= 0) or None", _honest_rank)
)
def mimic(honest: Tensor, *, target: Optional[int] = None, honest_vectors: Tensor, liars) -> Tensor:
    """Mimic (Karimireddy, He, Jaggi, ICLR 2022): every liar sends a copy of one honest worker's vector.

    ``target``: the worker copied (default: the lowest-ranked honest one). Each copy is a genuine
    gradient, so no filter rejects it; together they give that worker's data f + 1 votes, which
    under heterogeneous data biases the robust rule towards it.
    """
    world = honest_vectors.shape[0]
    if target is None:
        target = next((r for r in range(world) if r not in set(liars)), 0)
    if not isinstance(target, int) or not 0 <= target < world:
        raise ValueError(f"attack 'mimic': target must be a rank in [0, {world}) (got {target!r}).")
    return honest_vectors[target].to(honest.dtype).clone()
