"""Robust aggregation rules over the P vectors a parameter server receives, made by name.

Each rule is a small class: ``Rule(num_byzantine=f, **options)``, checked for its own
preconditions by ``check(num_inputs)``, called as ``rule(x)`` on an ``(n, d)`` tensor and
returning a ``(d,)`` estimate of the honest vectors' mean. Rules are pure torch, run on any
device and never modify or return their input. Each module of this package registers its rules
with ``@register_aggregator``; a new rule is one file (plus its config and tests).
"""

from __future__ import annotations

import importlib
import pkgutil

from lightning_draco.aggregators.base import Aggregator

AGGREGATORS: dict[str, type[Aggregator]] = {}


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make ``cls`` available as ``DracoStrategy(aggregator=cls.name)``."""
    if cls.name in AGGREGATORS and AGGREGATORS[cls.name] is not cls:
        raise ValueError(f"an aggregator named {cls.name!r} is already registered.")
    AGGREGATORS[cls.name] = cls
    return cls


def make_aggregator(name: str, num_byzantine: int, **options) -> Aggregator:
    """The rule called ``name`` tolerating ``num_byzantine`` inputs, or a ``ValueError`` listing the rules."""
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        known = ", ".join(sorted(AGGREGATORS))
        raise ValueError(f"aggregator must be one of {known} (got {name!r}).") from None
    return cls(num_byzantine, **options)


for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["AGGREGATORS", "Aggregator", "make_aggregator", "register_aggregator"]
