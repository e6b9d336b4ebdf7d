"""Rules that act on each coordinate separately: mean, median, trimmed mean."""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from lightning_draco.aggregators import register_aggregator
from lightning_draco.aggregators.base import Aggregator, finite_rows
from lightning_draco.codes.base import accumulation_dtype


# Sorting networks beat torch.sort on the CPU up to this many rows (sort also writes int64 indices).
# Measured on 2 cores, d = 1M float32, medians of 5: n = 33 median 0.32 s against sort's 3.3 s, n = 64
# 2.6 s against 9.7 s, n = 100 2.7 s against 7.3 s; torch.topk was 1.1-1.9x faster than sort, kthvalue
# slower than both.
_NETWORK_MAX_ROWS = 128
# On a GPU each compare-exchange is one kernel over all columns. Measured on an H200 (docs/decode_cuda.md:
# P = 15 at d = 11.2M and 100M, P = 63 at d = 11.2M, float32 and bfloat16): the network took 0.17x to
# 0.53x the sort's time for the median and the trimmed mean in every case; beyond 63 rows, not measured.
_NETWORK_MAX_ROWS_ACCELERATOR = 64
# Up to this many rows and with every row finite, the network's outputs are summed row after row (the
# outputs this rule has always had there); otherwise as ``torch.mean`` sums them, bitwise what the sort
# path returns, so that extending the network changed no output.
_SEQUENTIAL_MAX_ROWS = 32
# Columns per block on the CPU: the block's rows stay in the core's cache through the whole network.
# Elsewhere one block spans every column (each compare-exchange is then one kernel over the data).
_NETWORK_BLOCK = 1 << 14
#: How order statistics are computed: "auto" (a sorting network up to 128 rows on the CPU and 64 on
#: accelerators, else a sort), "network" (the network on any device and any number of rows) or "sort"
#: (``torch.sort``).
ENGINES = ("auto", "network", "sort")


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


def _network_plan(inputs: Tensor, engine: str = "auto") -> Optional[tuple[list[int], list[int], bool]]:
    """Which rows a sorting network sorts (``engine``: see ``ENGINES``): ``(rows, all_nan_rows, finite)``,
    or None for a sort.

    A row that is NaN everywhere sorts last in every column (NaN sorts above +Inf), so it is set aside
    and its positions filled afterwards; +-Inf entries need nothing (min and max order them). A row with
    some NaN entries would spread them through min and max: the sort handles those inputs.
    """
    n = inputs.shape[0]
    most = _NETWORK_MAX_ROWS if inputs.device.type == "cpu" else _NETWORK_MAX_ROWS_ACCELERATOR
    if engine == "sort" or (engine == "auto" and n > most):
        return None
    finite = finite_rows(inputs)
    if finite is None:
        return list(range(n)), [], True
    suspects = (~finite).nonzero().flatten()
    nan = torch.isnan(inputs[suspects])
    all_nan = nan.all(dim=1)
    if bool((nan.any(dim=1) & ~all_nan).any()):
        return None
    dropped = set(suspects[all_nan].tolist())
    if len(dropped) == n:
        return None
    return [i for i in range(n) if i not in dropped], sorted(dropped), False


def _network_blocks(inputs: Tensor, rows: list[int], keep: tuple[int, int] = (0, -1)):
    """For each block of columns: its slice, and the kept rows after the network (lists of row tensors)."""
    pairs = sorting_network(len(rows), keep)
    width = _NETWORK_BLOCK if inputs.device.type == "cpu" else max(1, inputs.shape[1])
    for start in range(0, inputs.shape[1], width):
        block = slice(start, start + width)
        values = [inputs[i, block] for i in rows]
        for i, j in pairs:
            values[i], values[j] = torch.minimum(values[i], values[j]), torch.maximum(values[i], values[j])
        yield block, values


def mean_of_order_statistics(inputs: Tensor, lo: int, hi: int, engine: str = "auto") -> Tensor:
    """Per column, the mean of the ``lo``-th to ``(hi-1)``-th smallest of the n values (NaN above +Inf).

    With n <= 128 on the CPU (block by block: each compare-exchange is an elementwise min and max on
    rows that stay in cache) and n <= 64 on accelerators (each compare-exchange one kernel over all
    columns), a sorting network replaces ``torch.sort`` over the whole tensor, which also computes and
    writes an int64 index per entry; rows that are NaN everywhere (a liar's) are set aside. Otherwise
    (more rows, rows with some NaN entries, or more NaN rows than the window leaves out) it sorts.
    ``engine`` overrides the choice (``ENGINES``).
    """
    n, d = inputs.shape
    plan = _network_plan(inputs, engine)
    # Half-precision values are added in float32: a sum of finite float16 values can overflow.
    wide = accumulation_dtype(inputs.dtype)
    if plan is None or hi > len(plan[0]):
        return inputs.sort(dim=0).values[lo:hi].to(wide).mean(dim=0).to(inputs.dtype)
    rows, _, finite = plan
    sequential = finite and n <= _SEQUENTIAL_MAX_ROWS
    out = torch.empty(d, dtype=inputs.dtype, device=inputs.device)
    for block, values in _network_blocks(inputs, rows, (lo, hi)):
        if sequential:
            total = values[lo].to(wide, copy=hi - lo > 1)
            for row in values[lo + 1 : hi]:
                total += row
            torch.div(total, hi - lo, out=out[block])
        else:
            torch.mean(torch.stack(values[lo:hi]).to(wide), dim=0, out=out[block])
    return out


def sorted_columns(inputs: Tensor, engine: str = "auto") -> Tensor:
    """``inputs`` sorted along dim 0, each column on its own (NaN above +Inf); the same engine as above."""
    n, d = inputs.shape
    plan = _network_plan(inputs, engine)
    if plan is None:
        return inputs.sort(dim=0).values
    rows, nan_rows, _ = plan
    out = torch.empty_like(inputs)
    for block, values in _network_blocks(inputs, rows):
        torch.stack(values, out=out[: len(rows), block])
    if nan_rows:
        out[len(rows) :] = inputs[nan_rows]
    return out


def coordinate_median(inputs: Tensor, engine: str = "auto") -> Tensor:
    """Per-coordinate median (the mean of the two middle values for even n); a NaN counts as the largest value."""
    n = inputs.shape[0]
    return mean_of_order_statistics(inputs, (n - 1) // 2, n // 2 + 1, engine)


class _OrderStatistics(Aggregator):
    """A rule over each column's sorted values; ``engine`` chooses how they are sorted (``ENGINES``).

    The engines agree to rounding, and bit for bit except where the network adds up to 32 finite
    kept rows one after another (the outputs these rules have always had on the CPU), which a mean
    over sorted rows may round differently. The choice is one of speed: "auto" takes the measured
    winner (on the CPU; on an H200, measured up to 63 rows); the others let a benchmark compare them
    on another device (``benchmarks/decode.py`` methods ``aggregator:median:network`` and
    ``aggregator:median:sort``).
    """

    def __init__(self, num_byzantine: int, engine: str = "auto"):
        super().__init__(num_byzantine)
        if engine not in ENGINES:
            raise ValueError(
                f"aggregator {self.name!r}: engine must be one of {', '.join(ENGINES)} (got {engine!r})."
            )
        self.engine = engine

    def check(self, num_inputs: int) -> None:
        super().check(num_inputs)
        self._require(2 * self.num_byzantine < num_inputs, "2 * num_byzantine < n", num_inputs)


@register_aggregator
class Mean(Aggregator):
    """The plain average (what DDP computes): one liar moves it anywhere."""

    name = "mean"

    def aggregate(self, inputs: Tensor) -> Tensor:
        return inputs.mean(dim=0)


@register_aggregator
class CoordinateMedian(_OrderStatistics):
    """Per coordinate, the median of the n values (the mean of the two middle ones when n is even).

    Values are sorted with NaN above +Inf, so a NaN sent by a liar counts as the largest value.
    """

    name = "median"

    def aggregate(self, inputs: Tensor) -> Tensor:
        return coordinate_median(inputs, self.engine)


@register_aggregator
class TrimmedMean(_OrderStatistics):
    """Per coordinate, drop the f largest and f smallest values and average the remaining n - 2f
    (NaN sorts above +Inf, so NaN from up to f liars is dropped)."""

    name = "trimmed_mean"

    def aggregate(self, inputs: Tensor) -> Tensor:
        n, f = inputs.shape[0], self.num_byzantine
        return mean_of_order_statistics(inputs, f, n - f, self.engine)


@register_aggregator
class Meamed(_OrderStatistics):
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

    def aggregate(self, inputs: Tensor) -> Tensor:
        n, f = inputs.shape[0], self.num_byzantine
        ordered = sorted_columns(inputs, self.engine)
        # Distances to the median and the sum in float32 for half precision: in bfloat16 two unequal
        # distances can round to a tie and keep the wrong values; in float16 finite sums overflow.
        ordered = ordered.to(accumulation_dtype(inputs.dtype))
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
        zero = torch.zeros((), dtype=ordered.dtype, device=inputs.device)
        return (torch.where(window, ordered, zero).sum(dim=0) / (n - f)).to(inputs.dtype)
