"""The interface of a robust aggregation rule."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor


class Aggregator(ABC):
    """A rule mapping ``n`` received vectors, up to ``num_byzantine`` of them arbitrary, to one vector.

    Subclasses set ``name``, extend ``check`` with their preconditions on ``n`` and implement
    ``aggregate``. ``state_dict``/``load_state_dict`` carry the state of stateful rules.
    """

    name: ClassVar[str]

    def __init__(self, num_byzantine: int):
        if not isinstance(num_byzantine, int) or isinstance(num_byzantine, bool) or num_byzantine < 0:
            raise ValueError(f"aggregator {self.name!r}: num_byzantine must be an integer >= 0 (got {num_byzantine!r}).")
        self.num_byzantine = num_byzantine

    def check(self, num_inputs: int) -> None:
        """Raise ``ValueError`` if the rule is undefined for ``num_inputs`` vectors with this ``num_byzantine``."""
        if num_inputs < 1:
            raise ValueError(f"aggregator {self.name!r} needs at least one input vector (got {num_inputs}).")

    def __call__(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 2:
            raise ValueError(f"aggregator {self.name!r} takes an (n, d) tensor (got shape {tuple(inputs.shape)}).")
        self.check(inputs.shape[0])
        return self.aggregate(inputs)

    @abstractmethod
    def aggregate(self, inputs: Tensor) -> Tensor:
        """The rule itself, on an ``(n, d)`` tensor whose ``n`` passed ``check``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def _require(self, condition: bool, rule: str, num_inputs: int) -> None:
        if not condition:
            raise ValueError(
                f"aggregator {self.name!r} needs {rule} (got n={num_inputs}, num_byzantine={self.num_byzantine})."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_byzantine={self.num_byzantine})"
