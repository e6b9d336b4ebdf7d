"""Rules that act on each coordinate separately: mean, median, trimmed mean."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import Aggregator


def coordinate_median(inputs: Tensor) -> Tensor:
    """Per-coordinate median by sorting (NaN sorts last, so a NaN input counts as the largest value)."""
    n = inputs.shape[0]
    ordered = inputs.sort(dim=0).values
    if n % 2:
        return ordered[n // 2].clone()
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@register_aggregator
class Mean(Aggregator):
    """The plain average (what DDP computes): one liar moves it anywhere."""

    name = "mean"

    def aggregate(self, inputs: Tensor) -> Tensor:
        return inputs.mean(dim=0)


@register_aggregator
class CoordinateMedian(Aggregator):
    """Per coordinate, the median of the n values (the mean of the two middle ones when n is even).

    Values are sorted with NaN above +Inf, so a NaN sent by a liar counts as the largest value.
    """

    name = "median"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        return coordinate_median(inputs)


@register_aggregator
class TrimmedMean(Aggregator):
    """Per coordinate, drop the f largest and f smallest values and average the remaining n - 2f
    (NaN sorts above +Inf, so NaN from up to f liars is dropped)."""

    name = "trimmed_mean"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        n, f = inputs.shape[0], self.num_byzantine
        ordered = inputs.sort(dim=0).values
        return ordered[f : n - f].mean(dim=0)
