"""Rules that average a chosen subset of whole vectors: minimum-diameter averaging, MoNNA."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import Aggregator, distances_to, is_count
from lightning_draco.aggregators.distance import mean_of_rows, pairwise_sq_distances


@register_aggregator
class MinimumDiameterAveraging(Aggregator):
    """Minimum-diameter averaging (MDA; El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault, "Genuinely
    distributed Byzantine machine learning", PODC 2020):

    1. Among all subsets S of n - f inputs, find one of smallest diameter
       max_{i, j in S} ||x_i - x_j|| (ties: the first subset in lexicographic order of indices; ties
       of the diameters as computed, which may split diameters equal in exact arithmetic either way).
    2. Return the mean of the inputs in S.

    The search visits every one of C(n, f) subsets; ``max_subsets`` (default 10^6) bounds it and
    ``check`` refuses larger ones. A non-finite input is infinitely far from all the others.
    """

    name = "mda"

    def __init__(self, num_byzantine: int, max_subsets: int = 1_000_000):
        super().__init__(num_byzantine)
        if not isinstance(max_subsets, int) or max_subsets < 1:
            raise ValueError(f"aggregator 'mda': max_subsets must be an integer >= 1 (got {max_subsets!r}).")
        self.max_subsets = max_subsets

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)
        count = math.comb(num_inputs, self.num_byzantine)
        self._require(
            count <= self.max_subsets,
            f"C(n, num_byzantine) = {count} subsets <= max_subsets = {self.max_subsets}",
            num_inputs,
        )

    def aggregate(self, inputs: Tensor) -> Tensor:
        n, k = inputs.shape[0], inputs.shape[0] - self.num_byzantine
        dist = pairwise_sq_distances(inputs, self.scratch).sqrt()
        best, best_diameter = None, math.inf
        # Chunks of subsets as 0/1 masks: the diameter of each is a max over a masked (n, n) matrix.
        subsets = itertools.combinations(range(n), k)
        while chunk := list(itertools.islice(subsets, 4096)):
            masks = torch.zeros(len(chunk), n, dtype=torch.bool, device=dist.device)
            masks[torch.arange(len(chunk)).repeat_interleave(k), torch.tensor(chunk).flatten()] = True
            pairs = masks[:, :, None] & masks[:, None, :]
            diameters = torch.where(pairs, dist, torch.zeros((), dtype=dist.dtype, device=dist.device)).amax(dim=(1, 2))
            i = int(torch.argmin(diameters))  # the first of equal minima
            if float(diameters[i]) < best_diameter:
                best, best_diameter = chunk[i], float(diameters[i])
        if best is None:  # every subset infinitely wide: more than f non-finite inputs
            best = tuple(range(k))
        return mean_of_rows(inputs, torch.tensor(best, device=inputs.device))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_byzantine={self.num_byzantine}, max_subsets={self.max_subsets})"


@register_aggregator
class MoNNA(Aggregator):
    """MoNNA, the mean of the nearest neighbours of a trusted vector (Farhadkhani, Guerraoui, Gupta,
    Hoang, Pinot, Stephan, "Robust collaborative learning with linear gradient overhead", ICML 2023):

    1. Take the trusted vector x_r, r = ``reference`` (default 0: the PS's own row when
       ``ps_rank=0``; over DETOX's group sums, the PS's group).
    2. Order the inputs by ||x_i - x_r|| (ties: lower index first, of the distances as computed);
       x_r itself comes first.
    3. Return the mean of the first n - f.

    A non-finite input is infinitely far from x_r.
    """

    name = "monna"

    def __init__(self, num_byzantine: int, reference: int = 0):
        super().__init__(num_byzantine)
        if not is_count(reference) or reference < 0:
            raise ValueError(f"aggregator 'monna': reference must be an integer >= 0 (got {reference!r}).")
        self.reference = reference

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)
        self._require(self.reference < num_inputs, f"reference < n (reference={self.reference})", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        x = inputs if inputs.dtype == torch.float64 else inputs.float()
        dist = distances_to(x, x[self.reference])
        dist = torch.nan_to_num(dist, nan=math.inf)
        dist[self.reference] = -1.0  # first even if the trusted vector repeats another
        chosen = torch.argsort(dist, stable=True)[: inputs.shape[0] - self.num_byzantine]
        return mean_of_rows(inputs, chosen)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_byzantine={self.num_byzantine}, reference={self.reference})"
