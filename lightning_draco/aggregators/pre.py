"""Pre-aggregators: nearest-neighbour mixing, bucketing, static and adaptive robust clipping."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_draco.aggregators import register_pre_aggregator
from lightning_draco.aggregators.base import PreAggregator, finite_rows, is_count
from lightning_draco.aggregators.distance import pairwise_sq_distances


def average_groups(inputs: Tensor, groups: Tensor) -> Tensor:
    """Row ``i`` of the result is the mean of ``inputs[groups[i]]`` (``groups``: (m, k) indices, or a list).

    As one ``(m, n)`` averaging matrix times the inputs (one pass, no copy of the rows) when the
    inputs are finite float32/float64; else row by row, so that a non-finite input spoils only
    the groups that contain it (in a matrix product 0 * NaN would spoil them all).
    """
    m, n = len(groups), inputs.shape[0]
    if inputs.dtype in (torch.float32, torch.float64) and finite_rows(inputs) is None:
        weights = torch.zeros(m, n, dtype=inputs.dtype, device=inputs.device)
        for i, group in enumerate(groups):
            weights[i, group] += 1.0 / len(group)
        return weights @ inputs
    return torch.stack([inputs[group].mean(dim=0) for group in groups])


def clip_rows(inputs: Tensor, threshold: Tensor) -> Tensor:
    """Each row scaled to norm at most ``threshold``; the input itself when no row is longer."""
    norms = torch.linalg.vector_norm(inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs, dim=1)
    scale = torch.clamp(threshold / norms.clamp_min(1e-30), max=1.0)
    # NaN norms (a NaN row) give NaN scales: the row stays non-finite, for the rule to reject.
    if bool((scale == 1.0).all()):
        return inputs
    return inputs * scale.to(inputs.dtype)[:, None]


@register_pre_aggregator
class NearestNeighbourMixing(PreAggregator):
    """Nearest-neighbour mixing (NNM; Allouah, Farhadkhani, Guerraoui, Gupta, Pinot, Stephan,
    "Fixing by mixing: a recipe for optimal Byzantine ML under heterogeneity", AISTATS 2023):

    1. For each input x_i, order all inputs by ||x_j - x_i|| (x_i itself first, other ties:
       lower index first; ties of the distances as computed, which for distances equal in exact
       arithmetic may differ by a unit in the last place, in either order).
    2. Replace x_i by the mean of the first n - f.

    A non-finite input is infinitely far from every other, so it enters no finite input's mix
    (while at most f are non-finite) and its own mix stays non-finite.
    """

    name = "nnm"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(self.num_byzantine < num_inputs, "num_byzantine < n", num_inputs)

    def transform(self, inputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        k = inputs.shape[0] - self.num_byzantine
        sq = pairwise_sq_distances(inputs, self.scratch)
        sq.fill_diagonal_(-1.0)
        neighbours = torch.argsort(sq, dim=1, stable=True)[:, :k]
        return average_groups(inputs, neighbours.to(inputs.device))


@register_pre_aggregator
class Bucketing(PreAggregator):
    """Bucketing (Karimireddy, He, Jaggi, "Byzantine-robust learning on heterogeneous datasets via
    bucketing", ICLR 2022, Algorithm 1):

    1. Draw a uniformly random permutation pi of the n inputs from the PS's randomness (the
       decode's generator, derived from the PS's secret; ``seed`` seeds a private stream when
       none is given, e.g. outside training).
    2. Cut pi into ceil(n / s) buckets of s = ``bucket_size`` consecutive inputs (the last one
       holds the remainder) and return each bucket's mean.

    A liar spoils at most one bucket, so the rule after it still tolerates f of the
    ceil(n / s) vectors.
    """

    name = "bucketing"

    def __init__(self, num_byzantine: int, bucket_size: int = 2, seed: int = 0):
        super().__init__(num_byzantine)
        if not is_count(bucket_size) or bucket_size < 1:
            raise ValueError(f"pre-aggregator 'bucketing': bucket_size must be an integer >= 1 (got {bucket_size!r}).")
        self.bucket_size = bucket_size
        self._own = torch.Generator().manual_seed(int(seed))

    def output_size(self, num_inputs: int) -> int:
        return math.ceil(num_inputs / self.bucket_size)

    def transform(self, inputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        n = inputs.shape[0]
        gen = generator if generator is not None else self._own
        order = torch.randperm(n, generator=gen, device=gen.device).to(inputs.device)
        return average_groups(inputs, list(order.split(self.bucket_size)))

    def __repr__(self) -> str:
        return f"Bucketing(num_byzantine={self.num_byzantine}, bucket_size={self.bucket_size})"


@register_pre_aggregator
class StaticClipping(PreAggregator):
    """Static clipping: x_i <- x_i * min(1, C / ||x_i||), C = ``threshold``.

    C has no scale-free default (it depends on the gradients' size), so it must be given; ``arc``
    chooses it from the inputs.
    """

    name = "clipping"

    def __init__(self, num_byzantine: int, threshold: Optional[float] = None):
        super().__init__(num_byzantine)
        if threshold is None or not isinstance(threshold, (int, float)) or not threshold > 0:
            raise ValueError(
                f"pre-aggregator 'clipping' needs threshold > 0 (got {threshold!r}); static clipping has no"
                " scale-free default: pass {'name': 'clipping', 'threshold': C}, or use 'arc'."
            )
        self.threshold = float(threshold)

    def transform(self, inputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        return clip_rows(inputs, torch.tensor(self.threshold, device=inputs.device))

    def __repr__(self) -> str:
        return f"StaticClipping(num_byzantine={self.num_byzantine}, threshold={self.threshold})"


@register_pre_aggregator
class AdaptiveRobustClipping(PreAggregator):
    """Adaptive robust clipping (ARC; Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan, "The vital
    role of gradient clipping in Byzantine-resilient distributed learning", arXiv:2405.14432, 2024):

    1. k = floor(2 (f / n) (n - f)).
    2. C = the (k + 1)-th largest of the norms ||x_i|| (a non-finite norm counts as the largest).
    3. x_i <- x_i * min(1, C / ||x_i||): the k longest inputs are clipped to C, the rest untouched.
    """

    name = "arc"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(self.num_byzantine < num_inputs, "num_byzantine < n", num_inputs)

    def transform(self, inputs: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        n, f = inputs.shape[0], self.num_byzantine
        k = (2 * f * (n - f)) // n
        if k == 0:
            return inputs
        x = inputs.float() if inputs.dtype in (torch.float16, torch.bfloat16) else inputs
        norms = torch.nan_to_num(torch.linalg.vector_norm(x, dim=1), nan=math.inf)
        threshold = norms.sort(descending=True).values[k]
        return clip_rows(inputs, threshold)
