"""Rules defined by distances between whole vectors: Krum, Multi-Krum, Bulyan, geometric median."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import Aggregator
from lightning_draco.aggregators.coordinatewise import coordinate_median


def pairwise_sq_distances(inputs: Tensor) -> Tensor:
    """``(n, n)`` squared Euclidean distances in float64; a non-finite input is infinitely far from all.

    ``cdist`` computes differences directly for up to 25 inputs and through one matrix product
    (a single pass over the data, with the cancellation error of ``|a|^2 + |b|^2 - 2ab``) above.
    """
    x = inputs if inputs.dtype == torch.float64 else inputs.float()
    finite = torch.isfinite(x).all(dim=1)
    x = torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    sq = torch.cdist(x, x).double().pow(2)
    far = ~(finite[:, None] & finite[None, :])
    return sq.masked_fill(far, float("inf")).fill_diagonal_(0.0)


def krum_scores(sq_dist: Tensor, num_byzantine: int) -> Tensor:
    """Krum's score of each input: the sum of squared distances to its n - f - 2 nearest other inputs."""
    n = sq_dist.shape[0]
    k = n - num_byzantine - 2
    others = sq_dist + torch.diag(torch.full((n,), float("inf"), dtype=sq_dist.dtype, device=sq_dist.device))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


@register_aggregator
class Krum(Aggregator):
    """The input with the smallest Krum score (Blanchard et al., 2017); ties go to the lowest index."""

    name = "krum"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(num_inputs >= 2 * self.num_byzantine + 3, "n >= 2 * num_byzantine + 3", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        scores = krum_scores(pairwise_sq_distances(inputs), self.num_byzantine)
        return inputs[int(torch.argmin(scores))].clone()


@register_aggregator
class MultiKrum(Aggregator):
    """The mean of the ``m`` inputs with the smallest Krum scores (default ``m = n - f``)."""

    name = "multi_krum"

    def __init__(self, num_byzantine: int, m: int | None = None):
        super().__init__(num_byzantine)
        self.m = m

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(num_inputs >= 2 * self.num_byzantine + 3, "n >= 2 * num_byzantine + 3", num_inputs)
        if self.m is not None:
            self._require(1 <= self.m <= num_inputs, f"1 <= m <= n (m={self.m})", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        m = self.m if self.m is not None else inputs.shape[0] - self.num_byzantine
        scores = krum_scores(pairwise_sq_distances(inputs), self.num_byzantine)
        chosen = torch.argsort(scores, stable=True)[:m]
        return inputs[chosen].mean(dim=0)


@register_aggregator
class Bulyan(Aggregator):
    """Bulyan (El Mhamdi et al., 2018): Krum-select theta = n - 2f inputs one at a time, then per
    coordinate average the beta = theta - 2f values closest to their median."""

    name = "bulyan"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(num_inputs >= 4 * self.num_byzantine + 3, "n >= 4 * num_byzantine + 3", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        n, f = inputs.shape[0], self.num_byzantine
        theta, beta = n - 2 * f, n - 4 * f
        sq_dist = pairwise_sq_distances(inputs)
        remaining = list(range(n))
        selected = []
        for _ in range(theta):
            sub = sq_dist[remaining][:, remaining]
            scores = krum_scores(sub, f) if len(remaining) > f + 2 else sub.sum(dim=1)
            pick = remaining[int(torch.argmin(scores))]
            selected.append(pick)
            remaining.remove(pick)
        chosen = inputs[selected]
        median = coordinate_median(chosen)
        closest = (chosen - median).abs().argsort(dim=0, stable=True)[:beta]
        return chosen.gather(0, closest).mean(dim=0)


@register_aggregator
class GeometricMedian(Aggregator):
    """argmin_z sum_i ||z - x_i||, by Weiszfeld's iterations z <- sum(x_i / b_i) / sum(1 / b_i),
    b_i = max(||x_i - z||, nu), from the coordinate-wise median; stops when ||z' - z|| <= tol * ||z||
    (tol = 1e-5) or after ``max_iter`` (100) iterations. Non-finite inputs get weight 0."""

    name = "geometric_median"

    def __init__(self, num_byzantine: int, tol: float = 1e-5, max_iter: int = 100, nu: float = 1e-8):
        super().__init__(num_byzantine)
        if tol <= 0 or max_iter < 1 or nu <= 0:
            raise ValueError("aggregator 'geometric_median' needs tol > 0, max_iter >= 1 and nu > 0.")
        self.tol, self.max_iter, self.nu = tol, max_iter, nu
        self.iterations = 0

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        finite = torch.isfinite(x).all(dim=1)
        if not bool(finite.all()):  # a non-finite input is infinitely far: weight 0
            x = x[finite]
        z = coordinate_median(x)
        for self.iterations in range(1, self.max_iter + 1):
            weights = 1.0 / torch.linalg.vector_norm(x - z, dim=1).clamp_min(self.nu)
            new = (weights[:, None] * x).sum(dim=0) / weights.sum()
            moved = float(torch.linalg.vector_norm(new - z))
            z = new
            if moved <= self.tol * float(torch.linalg.vector_norm(z)):
                break
        return z.to(inputs.dtype)
