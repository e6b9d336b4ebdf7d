"""Values logged in ``training_step`` mean what they mean under DDP: one value per rank and step.

A DRACO rank runs the user's ``training_step`` once per partition it holds. Left alone, each
``self.log("loss", ...)`` call overwrites the previous one, so a per-step value would be the last
partition's. While the partitions run, ``log`` calls are collected instead and replayed once per
name with the mean of the partitions' values (tensors and numbers); torchmetrics ``Metric``
objects pass straight through, since they accumulate their own state across calls.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def mean_over_partitions(module: Any) -> Iterator[None]:
    """Within the block, ``module.log`` collects; on leaving it, each name is logged once, averaged."""
    if module is None or "log" in module.__dict__:
        yield
        return
    original = module.log
    calls: dict[str, tuple[list[Any], dict]] = {}

    def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if args or not isinstance(value, (torch.Tensor, int, float)):
            original(name, value, *args, **kwargs)  # a Metric (or positional options): as the user wrote it
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
        original(name, torch.stack([v.float().reshape(()) for v in values]).mean(), **kwargs)


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
    """On leaving the block, every torchmetrics ``Metric`` in ``module`` holds the state it held on entering.

    A training step run again for another group's partitions (reactive mode) must not count that
    group's batches into this rank's metrics. States are saved by ``Metric.metric_state`` and put back
    with the metric's update count and cached result.
    """
    torchmetrics = sys.modules.get("torchmetrics")  # never imported here: without it, no module holds a Metric
    if module is None or torchmetrics is None:
        yield
        return
    metrics = [m for m in module.modules() if isinstance(m, torchmetrics.Metric)]
    saved = [(m, _copied(m.metric_state), m._update_count, m._computed) for m in metrics]
    try:
        yield
    finally:
        for metric, state, count, computed in saved:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count, metric._computed = count, computed


def _copied(state: dict[str, Any]) -> dict[str, Any]:
    return {name: [v.clone() for v in value] if isinstance(value, list) else value.clone()
            for name, value in state.items()}
