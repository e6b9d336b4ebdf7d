"""Named entries of one kind (codes, aggregators, attacks), each package filling its own by decorator."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A ``dict`` of name -> entry, where a name is registered once and a failed lookup lists the names.

    Args:
        kind: how an entry is called in messages, with its article (``"a code"``).
        parameter: the argument that names an entry (``"code"``), for lookup errors.
        alternatives: what else that argument accepts, appended to the list of names.
    """

    def __init__(self, kind: str, parameter: str, alternatives: str = ""):
        super().__init__()
        self.kind, self.parameter, self.alternatives = kind, parameter, alternatives

    def add(self, name: str, entry: T) -> T:
        if name in self and self[name] is not entry:
            raise ValueError(f"{self.kind} named {name!r} is already registered ({self[name].__name__}).")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            known = ", ".join(sorted(self))
            raise ValueError(f"{self.parameter} must be one of {known}{self.alternatives} (got {name!r}).") from None


def import_submodules(package: str, path: Iterable[str], skip: tuple[str, ...] = ()) -> None:
    """Import every module of ``package`` (its entries register themselves), but those in ``skip``."""
    for module in pkgutil.iter_modules(path):
        if module.name not in skip:
            importlib.import_module(f"{package}.{module.name}")
