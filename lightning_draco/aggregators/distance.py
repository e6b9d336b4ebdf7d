"""Rules defined by distances between whole vectors: Krum, Multi-Krum, Bulyan, geometric median."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import (
    Aggregator, Scratch, distances_to, far_rows_in_float64, finite_rows, is_count, is_number,
)
from lightning_draco.aggregators.coordinatewise import coordinate_median


def pairwise_sq_distances(inputs: Tensor, scratch: Optional[Scratch] = None) -> Tensor:
    """``(n, n)`` squared Euclidean distances in float64; a non-finite input is infinitely far from all.

    1. Find the non-finite rows with one cheap pass (``finite_rows``); copy the finite ones
       out only when a non-finite row exists.
    2. Pick a centre c: the medoid (smallest sum of distances to the others) estimated on the
       first ``_CENTRE_COLUMNS`` coordinates.
    3. Centre the rows on c (into ``scratch`` when given: no fresh allocation), form their Gram
       matrix G in one matrix product and return G_ii + G_jj - 2 G_ij.

    Centring is for accuracy: ``|a|^2 + |b|^2 - 2ab`` on raw gradients loses the digits of a
    small distance between long vectors, while centred on a point of the honest cloud the terms
    are of the distances' own size (a centre a liar chose costs accuracy, never correctness).
    With a scratch buffer this costs about a fifth of ``torch.cdist``'s direct differences for
    n <= 25 (15 x 4M float32: 0.10 s against 0.48 s).
    """
    x = inputs if inputs.dtype == torch.float64 else inputs.float()
    n = x.shape[0]
    finite = finite_rows(x)
    if finite is not None:
        x = x[finite]
    sq = _centred_sq_distances(x, scratch) if x.shape[0] else x.new_zeros(0, 0, dtype=torch.float64)
    if finite is None:
        return sq
    full = torch.full((n, n), float("inf"), dtype=torch.float64, device=x.device)
    index = finite.nonzero().flatten()
    full[index[:, None], index[None, :]] = sq
    return full.fill_diagonal_(0.0)


# Coordinates that choose the centre: enough to tell the honest cloud from liars, 1/60 of a 4M pass.
_CENTRE_COLUMNS = 1 << 16


def _sq_from_gram(gram: Tensor) -> Tensor:
    norms = gram.diagonal()
    sq = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min_(0)
    # Finite vectors whose squares overflow are as good as infinitely far.
    return torch.nan_to_num(sq, nan=float("inf")).fill_diagonal_(0.0)


def _centred_sq_distances(x: Tensor, scratch: Optional[Scratch]) -> Tensor:
    head = x[:, :_CENTRE_COLUMNS]
    head = head - head[0]
    rough = _sq_from_gram((head @ head.T).double())
    centre = x[int(torch.argmin(rough.sqrt().sum(dim=1)))]
    centred = torch.sub(x, centre, out=scratch.like(x)) if scratch is not None else x - centre
    return _sq_from_gram((centred @ centred.T).double())


def krum_scores(sq_dist: Tensor, num_byzantine: int) -> Tensor:
    """Krum's score of each input: the sum of squared distances to its n - f - 2 nearest other inputs."""
    n = sq_dist.shape[0]
    k = n - num_byzantine - 2
    others = sq_dist + torch.diag(torch.full((n,), float("inf"), dtype=sq_dist.dtype, device=sq_dist.device))
    return others.sort(dim=1).values[:, :k].sum(dim=1)


@register_aggregator
class Krum(Aggregator):
    """The input with the smallest Krum score (Blanchard et al., 2017); ties go to the lowest index.

    Ties are of the scores as computed: scores equal in exact arithmetic (sums of squared distances
    from a Gram matrix) may come out a unit in the last place apart, in either order."""

    name = "krum"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(num_inputs >= 2 * self.num_byzantine + 3, "n >= 2 * num_byzantine + 3", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        scores = krum_scores(pairwise_sq_distances(inputs, self.scratch), self.num_byzantine)
        return inputs[int(torch.argmin(scores))].clone()


@register_aggregator
class MultiKrum(Aggregator):
    """The mean of the ``m`` inputs with the smallest Krum scores (default ``m = n - f``)."""

    name = "multi_krum"

    def __init__(self, num_byzantine: int, m: int | None = None):
        super().__init__(num_byzantine)
        if m is not None and not (is_count(m) and m >= 1):
            raise ValueError(f"aggregator {self.name!r}: m must be None or an integer >= 1 (got {m!r}).")
        self.m = m

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(num_inputs >= 2 * self.num_byzantine + 3, "n >= 2 * num_byzantine + 3", num_inputs)
        if self.m is not None:
            self._require(1 <= self.m <= num_inputs, f"1 <= m <= n (m={self.m})", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        m = self.m if self.m is not None else inputs.shape[0] - self.num_byzantine
        scores = krum_scores(pairwise_sq_distances(inputs, self.scratch), self.num_byzantine)
        chosen = torch.argsort(scores, stable=True)[:m]
        return mean_of_rows(inputs, chosen)


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
        sq_dist = pairwise_sq_distances(inputs, self.scratch)
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


def mean_of_rows(inputs: Tensor, rows: Tensor) -> Tensor:
    """The mean of ``inputs[rows]``, read in one pass without copying the rows out when possible.

    A weight vector times the matrix (``w @ X``) skips the copy of ``inputs[rows]``; it cannot be
    used when an unchosen row is non-finite (0 * NaN is NaN) or for dtypes without a fast CPU
    matrix product.
    """
    if inputs.dtype in (torch.float32, torch.float64) and finite_rows(inputs) is None:
        weights = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
        weights[rows] = 1.0 / rows.numel()
        return weights @ inputs
    return inputs[rows].mean(dim=0)


@register_aggregator
class GeometricMedian(Aggregator):
    """argmin_z sum_i ||z - x_i|| (the geometric median), by Weiszfeld's iterations, modified where an
    input coincides with the iterate (Vardi and Zhang, 2000):

    1. Drop non-finite inputs (infinitely far: weight 0), found with one cheap pass.
    2. Start from their mean.
    3. Repeat from z, with d_i = ||x_i - z||:
       a. the inputs within ``max(tol, 8 eps) * ||z||`` of z coincide with it (eta of them);
       b. T = sum_i(x_i / b_i) / sum_i(1 / b_i) over the others, b_i = max(d_i, nu), and
          r = ||sum_i (x_i - z) / b_i||, the pull of the others (the resultant of their unit vectors);
       c. z' = z + max(0, 1 - eta / r) (T - z): Weiszfeld's step where nothing coincides, a step
          off a coinciding input that is not the minimiser, and no step where it is (r <= eta);
       stop when ||z' - z|| <= tol * ||z'|| (tol = 1e-5).
    4. If ``max_iter`` (100) iterations did not stop, start again from the coordinate-wise median,
       for up to ``max_iter`` more.

    The minimiser does not depend on the start, but liars choose the mean. Two of ten can put it on
    one of their own vectors, where plain Weiszfeld gives that input the weight 1 / nu, barely
    moves, and stops on the liar: step (a) is what makes the iterate leave an input that is not the
    minimiser (and from one just outside the tolerance, the iterate moves away by at least its
    distance, so the stopping test does not fire there either). Liars far out are the other way to
    the start: the iterate then comes in by a factor of about f / (n - f) per iteration (11/12 with
    11 liars of 23), so liars 1e10 away left it 1e6 away after 100 iterations. The coordinate-wise
    median starts inside the honest inputs' range on every coordinate whatever the liars send; it is
    step 4 and not the start because it costs 1.5 (15 rows) to 25 (63 rows) times an iteration on
    the CPU, while from the mean honest inputs take a few iterations. The price: liars far out can
    make every decode run both, up to 2 * ``max_iter`` iterations. Where the minimiser is an input
    (duplicated honest rows), Weiszfeld's iterate approaches it slowly, and may stop short of it
    by more than the tolerance when ``max_iter`` runs out.

    Each iteration reads the inputs twice (the distances, then the weighted sum as one
    matrix-vector product), copies nothing, and brings one small tensor to the host: whether every
    distance held in the dtype, and the stopping test's two norms. A distance that did not hold
    (the square of a finite liar's 1e20 overflows float32) is measured again in float64, its row
    alone, and that iteration redone with it.
    """

    name = "geometric_median"

    def __init__(self, num_byzantine: int, tol: float = 1e-5, max_iter: int = 100, nu: float = 1e-8):
        super().__init__(num_byzantine)
        if not (is_number(tol) and tol > 0 and is_count(max_iter) and max_iter >= 1 and is_number(nu) and nu > 0):
            raise ValueError(
                f"aggregator 'geometric_median' needs numbers tol > 0 and nu > 0 and an integer max_iter >= 1"
                f" (got tol={tol!r}, max_iter={max_iter!r}, nu={nu!r})."
            )
        self.tol, self.max_iter, self.nu = tol, max_iter, nu
        self.iterations = 0

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        finite = finite_rows(x)
        if finite is not None:
            x = x[finite]
        if x.shape[0] == 0:  # every row has NaN or Inf in it: no point to move towards
            return torch.full_like(inputs[0], float("nan"))
        self.iterations = 0
        z, stopped = self._iterate(x, x.mean(dim=0))
        if not stopped:
            z, _ = self._iterate(x, coordinate_median(x))
        return z.to(inputs.dtype)

    def _iterate(self, x: Tensor, z: Tensor) -> tuple[Tensor, bool]:
        """Step 3 from ``z`` for up to ``max_iter`` iterations: the last iterate, and whether the test stopped them."""
        # Rounding alone puts a landed iterate a few units in the last place of ||z|| away from the input.
        within = max(self.tol, 8 * torch.finfo(x.dtype).eps)
        for _ in range(self.max_iter):
            self.iterations += 1
            distances = distances_to(x, z)
            new = self._step(x, z, distances, within)
            held, moved, size = self._outcome(new, z, torch.isfinite(distances).all())
            if not held:
                distances = far_rows_in_float64(distances, x, z)
                new = self._step(x, z, distances, within)
                _, moved, size = self._outcome(new, z, distances.new_ones((), dtype=torch.bool))
            z = new
            if moved <= self.tol * size:
                return z, True
        return z, False

    def _step(self, x: Tensor, z: Tensor, distances: Tensor, within: float) -> Tensor:
        """Step 3 from ``z``, on the device (no host sync): inputs within ``within * ||z||`` count as reached."""
        reached = distances <= within * torch.linalg.vector_norm(z, dtype=torch.float64)
        weights = torch.where(reached, 0.0, 1.0 / distances.clamp_min(self.nu)).to(x.dtype)
        total = weights.sum()
        tiny = torch.finfo(x.dtype).tiny
        towards = (weights @ x) / total.clamp_min(tiny) - z
        pull = total * torch.linalg.vector_norm(towards)
        # No input reached: 1, Weiszfeld's step. All of them reached: total = pull = 0, and no step.
        return z + (1 - reached.sum() / pull.clamp_min(tiny)).clamp_min(0) * towards

    @staticmethod
    def _outcome(new: Tensor, z: Tensor, held: Tensor) -> tuple[bool, float, float]:
        """(whether the distances held, ||new - z||, ||new||) in one transfer to the host. The norms are
        taken in float64, as a float32 norm of 1e19-sized entries overflows to inf <= inf."""
        moved = torch.linalg.vector_norm(new - z, dtype=torch.float64)
        size = torch.linalg.vector_norm(new, dtype=torch.float64)
        held, moved, size = torch.stack([held.double(), moved, size]).tolist()
        return bool(held), moved, size
