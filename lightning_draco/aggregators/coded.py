"""A code with a robust aggregator on top: plain robust aggregation (code "none"), or DETOX (code "frc").

It lives with the aggregators: codes know nothing of aggregation rules, the composition knows both.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_draco.aggregators.base import Aggregator
from lightning_draco.codes.base import Code, DecodeResult


class AggregatedCode(Code):
    """Decodes with ``code.parts`` and replaces their sum by ``k x aggregator(parts)``.

    With ``Uncoded`` the parts are the ``P`` received vectors (median, Krum, ... over workers);
    with ``FractionalRepetitionCode`` they are the ``P / r`` verified group sums: DETOX
    (Rajput et al., NeurIPS 2019), a vote inside groups, then a robust rule across them.
    """

    name = "aggregated"

    def __init__(self, code: Code, aggregator: Aggregator):
        if not code.supports_aggregation:
            raise ValueError(f"code={code.name!r} cannot be combined with an aggregator (use 'none' or 'frc').")
        self.inner = code
        self.aggregator = aggregator
        self.num_workers, self.num_adversaries, self.redundancy = code.num_workers, code.num_adversaries, code.redundancy
        parts = code.num_workers // code.redundancy
        try:
            aggregator.check(parts)
        except ValueError as err:
            if parts == code.num_workers:
                raise
            # n is not the world size here, which the rule's own sentence would leave the reader to assume.
            raise ValueError(
                f"{err} With code={code.name!r} the rule runs over the {parts} group sums (n = P / r ="
                f" {code.num_workers} / {code.redundancy}: DETOX), not over the {code.num_workers} ranks: use more"
                " ranks, a smaller r, or code='none' to aggregate over the ranks."
            ) from None

    def partitions(self, worker: int) -> list[int]:
        return self.inner.partitions(worker)

    @property
    def encoding_matrix(self) -> Tensor:
        return self.inner.encoding_matrix

    def check_wire_dtype(self, dtype: torch.dtype) -> None:
        self.inner.check_wire_dtype(dtype)

    def state_dict(self) -> dict:
        """The inner code's decoder state (the rule's own state is ``aggregator.state_dict()``)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        parts, faulty = self.inner.parts(received, generator=generator)
        # The PS's generator also reaches the rule: bucketing draws its buckets from it.
        return DecodeResult(self.aggregator(parts, generator=generator) * parts.shape[0], faulty)

    def __repr__(self) -> str:
        return f"AggregatedCode({self.inner!r}, {self.aggregator!r})"
