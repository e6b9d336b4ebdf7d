"""Robust aggregation rules over the P vectors a parameter server receives, made by name.

Each rule is a small class: ``Rule(num_byzantine=f, **options)``, checked for its own
preconditions by ``check(num_inputs)``, called as ``rule(x)`` on an ``(n, d)`` tensor and
returning a ``(d,)`` estimate of the honest vectors' mean. Rules are pure torch, run on any
device and never modify or return their input. Each module of this package registers its rules
with ``@register_aggregator``; a new rule is one file (plus its config and tests).

Pre-aggregators (``@register_pre_aggregator``: nearest-neighbour mixing, bucketing, clipping)
map the n vectors to m vectors before any rule: ``make_aggregator("krum", f, pre_aggregators=["nnm"])``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Union

from lightning_draco._registry import Registry, import_submodules
from lightning_draco.aggregators.base import Aggregator, PreAggregated, PreAggregator

AGGREGATORS: Registry[type[Aggregator]] = Registry("an aggregator", "aggregator")
PRE_AGGREGATORS: Registry[type[PreAggregator]] = Registry("a pre-aggregator", "pre_aggregators")

#: What ``pre_aggregators=[...]`` accepts per entry: a name, ``{"name": ..., **options}``, or an instance.
PreAggregatorSpec = Union[str, Mapping[str, Any], PreAggregator]


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make ``cls`` available as ``DracoStrategy(aggregator=cls.name)``."""
    return AGGREGATORS.add(cls.name, cls)


def register_pre_aggregator(cls: type[PreAggregator]) -> type[PreAggregator]:
    """Class decorator: make ``cls`` available as ``make_aggregator(..., pre_aggregators=[cls.name])``."""
    return PRE_AGGREGATORS.add(cls.name, cls)


def make_pre_aggregator(spec: PreAggregatorSpec, num_byzantine: int) -> PreAggregator:
    """One pre-aggregator from its name, a dict with ``name`` and options, or an instance (kept as is)."""
    if isinstance(spec, PreAggregator):
        return spec
    if isinstance(spec, str):
        return PRE_AGGREGATORS.lookup(spec)(num_byzantine)
    if isinstance(spec, Mapping) and "name" in spec:
        options = {k: v for k, v in spec.items() if k != "name"}
        cls = PRE_AGGREGATORS.lookup(spec["name"])
        num_byzantine = options.pop("num_byzantine", num_byzantine)
        _check_options(cls, options)
        return cls(num_byzantine, **options)
    raise ValueError(
        "pre_aggregators entries must be a name, a dict with 'name' and options, or a PreAggregator"
        f" (got {spec!r})."
    )


def with_pre_aggregators(rule: Aggregator, pre_aggregators: Sequence[PreAggregatorSpec] = ()) -> Aggregator:
    """``rule`` preceded by ``pre_aggregators`` in order (``rule`` itself when there are none)."""
    if isinstance(pre_aggregators, (str, Mapping)):
        raise ValueError(f"pre_aggregators must be a list (got {pre_aggregators!r}).")
    pre = [make_pre_aggregator(spec, rule.num_byzantine) for spec in pre_aggregators]
    return PreAggregated(pre, rule) if pre else rule


def make_aggregator(
    name: str, num_byzantine: int, pre_aggregators: Sequence[PreAggregatorSpec] = (), **options
) -> Aggregator:
    """The rule called ``name`` tolerating ``num_byzantine`` inputs, after ``pre_aggregators`` if any,
    or a ``ValueError`` listing the rules."""
    cls = AGGREGATORS.lookup(name)
    _check_options(cls, options)
    return with_pre_aggregators(cls(num_byzantine, **options), pre_aggregators or ())


def _check_options(cls: type, options: Mapping[str, Any]) -> None:
    """Refuse an option the rule does not take, naming the ones it does."""
    params = inspect.signature(cls.__init__).parameters
    own = [k for k in params if k not in ("self", "num_byzantine")]
    unknown = [k for k in options if k not in own]
    if unknown:
        raise ValueError(
            f"{cls.kind} {cls.name!r} has no option {', '.join(map(repr, unknown))}: its options are"
            f" {', '.join(own) if own else 'none'}."
        )


import_submodules(__name__, __path__, skip=("base",))
