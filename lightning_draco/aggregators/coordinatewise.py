"""Rules that act on each coordinate separately: mean, median, trimmed mean."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import Aggregator, finite_rows


# Sorting networks beat torch.sort on the CPU up to this many rows (sort also writes int64 indices).
_NETWORK_MAX_ROWS = 32
# Columns per block: the block's rows stay in the core's cache through the whole network.
_NETWORK_BLOCK = 1 << 14


@functools.lru_cache(maxsize=None)
def sorting_network(n: int, keep: tuple[int, int] = (0, -1)) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` inputs, as compare-exchange pairs ``(i, j)``, ``i < j``.

    1. Build the network for the next power of two ``N >= n`` (Knuth, TAOCP vol. 3, 5.3.4).
    2. Drop the pairs that touch an index ``>= n``: the missing inputs stand for +Inf, which
       never moves, so those comparators never exchange anything.
    3. Walking backwards from the outputs ``keep = (lo, hi)`` (sorted positions lo..hi-1; hi=-1:
       all), drop the comparators that cannot reach them.
    """
    size = 1
    while size < n:
        size *= 2
    pairs = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p) and i + j + k < n:
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    lo, hi = keep[0], (n if keep[1] < 0 else keep[1])
    needed, kept = set(range(lo, hi)), []
    for i, j in reversed(pairs):
        if i in needed or j in needed:
            kept.append((i, j))
            needed.update((i, j))
    return tuple(reversed(kept))


def mean_of_order_statistics(inputs: Tensor, lo: int, hi: int) -> Tensor:
    """Per column, the mean of the ``lo``-th to ``(hi-1)``-th smallest of the n values.

    On the CPU with finite inputs and n <= 32, a sorting network run block by block (each
    compare-exchange is an elementwise min and max on rows that stay in cache) replaces
    ``torch.sort`` over the whole tensor, which also computes and writes an int64 index per entry.
    Otherwise (accelerators, many rows, a NaN or Inf present: min/max would spread a NaN), it
    sorts, with NaN sorting above +Inf.
    """
    n, d = inputs.shape
    if inputs.device.type != "cpu" or n > _NETWORK_MAX_ROWS or finite_rows(inputs) is not None:
        return inputs.sort(dim=0).values[lo:hi].mean(dim=0)
    pairs = sorting_network(n, (lo, hi))
    out = torch.empty(d, dtype=inputs.dtype)
    for start in range(0, d, _NETWORK_BLOCK):
        rows = list(inputs[:, start : start + _NETWORK_BLOCK].unbind(0))
        for i, j in pairs:
            rows[i], rows[j] = torch.minimum(rows[i], rows[j]), torch.maximum(rows[i], rows[j])
        total = rows[lo].clone() if hi - lo > 1 else rows[lo]
        for row in rows[lo + 1 : hi]:
            total += row
        torch.div(total, hi - lo, out=out[start : start + _NETWORK_BLOCK])
    return out


def sorted_columns(inputs: Tensor) -> Tensor:
    """``inputs`` sorted along dim 0, each column on its own (NaN above +Inf); the same engine as above."""
    n, d = inputs.shape
    if inputs.device.type != "cpu" or n > _NETWORK_MAX_ROWS or finite_rows(inputs) is not None:
        return inputs.sort(dim=0).values
    pairs = sorting_network(n)
    out = torch.empty_like(inputs)
    for start in range(0, d, _NETWORK_BLOCK):
        rows = list(inputs[:, start : start + _NETWORK_BLOCK].unbind(0))
        for i, j in pairs:
            rows[i], rows[j] = torch.minimum(rows[i], rows[j]), torch.maximum(rows[i], rows[j])
        torch.stack(rows, out=out[:, start : start + _NETWORK_BLOCK])
    return out


def coordinate_median(inputs: Tensor) -> Tensor:
    """Per-coordinate median (the mean of the two middle values for even n); a NaN counts as the largest value."""
    n = inputs.shape[0]
    return mean_of_order_statistics(inputs, (n - 1) // 2, n // 2 + 1)


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
        return mean_of_order_statistics(inputs, f, n - f)


@register_aggregator
class Meamed(Aggregator):
    """Mean around the median (Meamed; Xie, Koyejo, Gupta, "Generalized Byzantine-tolerant SGD",
    arXiv:1802.10116, 2018), per coordinate:

    1. m = the median of the n values (the mean of the two middle ones when n is even).
    2. Keep the n - f values closest to m (ties in |v - m|: the smaller value is kept).
    3. Return their mean.

    The kept values are a window of the sorted column, found by dropping, f times, whichever end
    of the window is farther from m (the larger one on a tie). NaN sorts above +Inf and counts as
    the farthest value.
    """

    name = "meamed"

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)

    def aggregate(self, inputs: Tensor) -> Tensor:
        n, f = inputs.shape[0], self.num_byzantine
        ordered = sorted_columns(inputs)
        median = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        lo = torch.zeros(inputs.shape[1], dtype=torch.long, device=inputs.device)
        hi = torch.full_like(lo, n - 1)
        for _ in range(f):
            below = median - ordered.gather(0, lo[None])[0]
            above = ordered.gather(0, hi[None])[0] - median
            drop_high = ~(above < below)  # NaN compares false: a NaN end is dropped
            hi = hi - drop_high.long()
            lo = lo + (~drop_high).long()
        index = torch.arange(n, device=inputs.device)[:, None]
        window = (index >= lo) & (index <= hi)
        zero = torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        return torch.where(window, ordered, zero).sum(dim=0) / (n - f)
