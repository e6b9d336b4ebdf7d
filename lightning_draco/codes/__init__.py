"""Gradient codes, made by name.

Each module in this package defines one ``Code`` subclass and registers it with
``@register_code``; importing the package imports every module, so a new code is one new
file here (plus its config and tests) and nothing else changes.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning_draco._registry import Registry, import_submodules
from lightning_draco.codes.base import (
    Code,
    DecodeResult,
    DracoDecodeError,
    NonFiniteGradientError,
    accumulation_dtype,
)

CODES: Registry[type[Code]] = Registry("a code", "code")


def register_code(cls: type[Code]) -> type[Code]:
    """Class decorator: make ``cls`` available as ``DracoStrategy(code=cls.name)``."""
    return CODES.add(cls.name, cls)


def code_class(name: str) -> type[Code]:
    """The registered code called ``name``, or a ``ValueError`` listing the known ones."""
    return CODES.lookup(name)


def make_code(
    name: str, num_workers: int, num_adversaries: int, redundancy: Optional[int] = None, **options: Any
) -> Code:
    """Build the code called ``name`` for ``num_workers`` workers; ``options`` must be among the code's ``options``."""
    cls = code_class(name)
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        accepted = ", ".join(cls.options) or "none"
        raise ValueError(f"code={name!r} has no option {', '.join(unknown)} (its options: {accepted}).")
    return cls(num_workers, num_adversaries, redundancy, **options)


import_submodules(__name__, __path__, skip=("base",))

from lightning_draco.codes.crc import CyclicRepetitionCode  # noqa: E402
from lightning_draco.codes.frc import FractionalRepetitionCode  # noqa: E402
from lightning_draco.codes.uncoded import Uncoded  # noqa: E402

__all__ = [
    "CODES",
    "Code",
    "CyclicRepetitionCode",
    "DecodeResult",
    "DracoDecodeError",
    "FractionalRepetitionCode",
    "NonFiniteGradientError",
    "Uncoded",
    "accumulation_dtype",
    "code_class",
    "make_code",
    "register_code",
]
