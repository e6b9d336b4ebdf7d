"""Values logged in ``training_step`` mean what they mean under DDP: one value per rank and step.

A DRACO rank runs the user's ``training_step`` once per partition it holds. Left alone, each
``self.log("loss", ...)`` call overwrites the previous one, so a per-step value would be the last
partition's. While the partitions run, ``log`` calls are collected instead and replayed once per
name with the partitions' values (tensors and numbers) combined by the call's ``reduce_fx``: their
maximum for ``"max"``, their minimum for ``"min"``, their mean otherwise; torchmetrics ``Metric``
objects pass straight through, since they accumulate their own state across calls.

With ``sync_dist=True`` this logs what DDP logs, where DDP's rank ``i`` trains on partition ``i``.
Every partition is held by the same number ``r`` of ranks, so across the ranks the per-rank maxima
(minima) reach the largest (smallest) partition's value, and the per-rank means add up to
``(1/r) * r * (sum over partitions)``: the sum DDP's ``reduce_fx="sum"`` gives, and, over the
``P`` ranks, the mean its ``"mean"`` gives. (Summing over a rank's partitions instead would make
the sum ``r`` times too large.)
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, ContextManager

import torch


@contextlib.contextmanager
def combined_over_partitions(
    module: Any, passed_on: Callable[[], ContextManager] = contextlib.nullcontext
) -> Iterator[None]:
    """Within the block, ``module.log`` collects; on leaving it, each name is logged once, its values
    combined over the partitions by ``over_partitions(reduce_fx)`` (the mean unless it asks for max or min).

    A call it cannot combine (a ``Metric``, another kind of value, options passed by position) goes to
    Lightning at once, inside ``passed_on()``: Lightning may reduce it across the ranks there
    (``sync_dist=True``), which is its own collective, not one the user's step made."""
    if module is None or "log" in module.__dict__:
        yield
        return
    original = module.log
    calls: dict[str, tuple[list[Any], dict]] = {}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args or not isinstance(value, (torch.Tensor, int, float)):
            with passed_on():  # a Metric (or positional options): as the user wrote it
                original(name, value, *args, **kwargs)
            return
        values, _ = calls.setdefault(name, ([], kwargs))
        values.append(value.detach() if isinstance(value, torch.Tensor) else torch.tensor(float(value)))
        calls[name] = (values, kwargs)

    module.log = log
    try:
        yield
    finally:
        del module.__dict__["log"]
    for name, (values, kwargs) in calls.items():
        combine = over_partitions(kwargs.get("reduce_fx", "mean"))
        original(name, combine(torch.stack([v.float().reshape(()) for v in values])), **kwargs)


def over_partitions(reduce_fx: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """How a rank combines its partitions' values of one name, for ``self.log(..., reduce_fx=...)``.

    Lightning accepts ``"max"``, ``"min"``, ``"mean"``, ``"avg"`` and ``"sum"`` (any case), and
    ``torch.max``, ``max``, ``torch.min``, ``min``, ``torch.mean``, ``torch.sum`` and ``sum``. The
    maximum and minimum are kept as they are; anything else is averaged (see the module's docstring
    for why the mean is also right for a sum). Lightning itself refuses other reductions when the
    value is logged.
    """
    name = reduce_fx.lower() if isinstance(reduce_fx, str) else None
    if name == "max" or any(reduce_fx is fx for fx in (torch.max, max)):
        return torch.amax
    if name == "min" or any(reduce_fx is fx for fx in (torch.min, min)):
        return torch.amin
    return torch.mean


@contextlib.contextmanager
def silenced_logging(module: Any) -> Iterator[None]:
    """Within the block, ``module.log`` does nothing: a training step run again for another group's
    partitions (reactive mode) must not log that group's values as this rank's."""
    if module is None or "log" in module.__dict__:
        yield
        return
    module.log = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.__dict__["log"]


@contextlib.contextmanager
def unchanged_metrics(module: Any) -> Iterator[None]:
    """On leaving the block, every torchmetrics ``Metric`` in ``module`` holds what it held on entering.

    A training step run again for another group's partitions (reactive mode) must not count that
    group's batches into this rank's metrics. Each metric's plain attributes are saved and put back:
    its states (tensors and lists of tensors), update count, cached result and last ``forward`` value
    (what ``self.log(name, metric)`` logs), and the counters and extremes of wrappers such as
    ``Running`` and ``MinMaxMetric``. Metrics held outside the module tree (in a plain dict or list
    attribute) are not seen.
    """
    torchmetrics = sys.modules.get("torchmetrics")  # never imported here: without it, no module holds a Metric
    if module is None or torchmetrics is None:
        yield
        return
    saved = [(m, _plain_attributes(m)) for m in module.modules() if isinstance(m, torchmetrics.Metric)]
    try:
        yield
    finally:
        for metric, attributes in saved:
            for name, value in attributes.items():
                setattr(metric, name, value)


def _plain_attributes(metric: Any) -> dict[str, Any]:
    """Copies of ``metric``'s own attributes that are tensors, numbers, ``None`` or lists of them."""
    def copied(value: Any) -> Any:
        return value.clone() if isinstance(value, torch.Tensor) else value

    kept = {}
    for name, value in vars(metric).items():
        if isinstance(value, (torch.Tensor, int, float, bool)) or value is None:
            kept[name] = copied(value)
        elif isinstance(value, list) and all(isinstance(v, (torch.Tensor, int, float)) for v in value):
            kept[name] = [copied(v) for v in value]
    return kept
