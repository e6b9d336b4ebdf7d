"""No code: every worker computes its own partition, the server adds what it receives (plain averaging)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_draco.codes import register_code
from lightning_draco.codes.base import Code, DecodeResult, accumulation_dtype


@register_code
class Uncoded(Code):
    """Plain data parallelism through the DRACO exchange: the baseline every comparison needs.

    Worker ``i`` computes partition ``i`` only and the decode is the plain sum, so one liar
    moves the result anywhere. ``num_adversaries`` is accepted (robust aggregators read it)
    but buys no protection here.
    """

    name = "none"
    shardable = True
    supports_aggregation = True

    @classmethod
    def default_redundancy(cls, num_adversaries: int) -> int:
        return 1

    @classmethod
    def check(cls, num_adversaries: int, redundancy: int, num_workers: Optional[int] = None) -> None:
        super().check(num_adversaries, redundancy, num_workers)
        if redundancy != 1:
            raise ValueError(
                f"code='none' gives each worker one partition: redundancy must be 1 (got redundancy={redundancy})."
            )

    def partitions(self, worker: int) -> list[int]:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}) (got {worker}).")
        return [worker]

    @property
    def encoding_matrix(self) -> Tensor:
        return torch.eye(self.num_workers, dtype=torch.float64)

    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        self._check_received(received)
        return DecodeResult(received.sum(dim=0, dtype=accumulation_dtype(received.dtype)), [])

    def parts(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> tuple[Tensor, list[int]]:
        """The received rows themselves: a robust aggregator replaces the plain sum."""
        self._check_received(received)
        return received, []
