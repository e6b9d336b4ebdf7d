"""Robust aggregation rules over the P vectors a parameter server receives, made by name.

Each rule is a small class: ``Rule(num_byzantine=f, **options)``, checked for its own
preconditions by ``check(num_inputs)``, called as ``rule(x)`` on an ``(n, d)`` tensor and
returning a ``(d,)`` estimate of the honest vectors' mean. Rules are pure torch, run on any
device and never modify or return their input. Each module of this package registers its rules
with ``@register_aggregator``; a new rule is one file (plus its config and tests).
"""

from __future__ import annotations

from lightning_draco._registry import Registry, import_submodules
from lightning_draco.aggregators.base import Aggregator

AGGREGATORS: Registry[type[Aggregator]] = Registry("an aggregator", "aggregator")


def register_aggregator(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make ``cls`` available as ``DracoStrategy(aggregator=cls.name)``."""
    return AGGREGATORS.add(cls.name, cls)


def make_aggregator(name: str, num_byzantine: int, **options) -> Aggregator:
    """The rule called ``name`` tolerating ``num_byzantine`` inputs, or a ``ValueError`` listing the rules."""
    return AGGREGATORS.lookup(name)(num_byzantine, **options)


import_submodules(__name__, __path__, skip=("base",))
