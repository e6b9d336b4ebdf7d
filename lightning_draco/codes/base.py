"""The interface every gradient code implements, and what a decode returns.

A code fixes three things for ``P`` workers and ``P`` data partitions:

* which partitions each worker computes gradients for (``partitions``),
* how a worker combines them into the one vector it sends (``encoding_matrix``),
* how the parameter server turns the ``P`` received vectors back into the exact sum
  of all partition gradients while naming the workers that lied (``decode``).

Everything here is pure torch on tensors: no process groups, no Lightning.
"""

from __future__ import annotations

import math
import os
import threading
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor

__all__ = [
    "Code", "DecodeResult", "DracoDecodeError", "NonFiniteGradientError", "accumulation_dtype", "each_block",
    "horner_order",
]


class DracoDecodeError(RuntimeError):
    """The received vectors do not determine the gradient sum: more workers lied than the code tolerates.

    Attributes:
        suspects: sorted worker indices that the decoder could not clear.
        step: the optimizer step of the failed decode, when raised during training.
        bucket: the position of the gradient bucket within that step, when raised during training.
    """

    def __init__(self, message: str, suspects: list[int], step: Optional[int] = None, bucket: Optional[int] = None):
        super().__init__(message)
        self.reason = message
        self.suspects = sorted(suspects)
        self.step = step
        self.bucket = bucket

    def at(self, step: int, bucket: int) -> "DracoDecodeError":
        """The same failure, placed at a training step and bucket (for the message every rank raises)."""
        located = DracoDecodeError(
            f"DRACO decode failed at step {step}, bucket {bucket}: {self.reason}", self.suspects, step, bucket
        )
        located.reason = self.reason
        return located

    def __reduce__(self):  # picklable across processes with its message and fields
        return (DracoDecodeError, (str(self), self.suspects, self.step, self.bucket), {"reason": self.reason})


class NonFiniteGradientError(FloatingPointError):
    """The honest workers agree on a gradient that contains NaN or Inf: the model diverged, nobody lied."""


@dataclass
class DecodeResult:
    """What the parameter server learns from one decode.

    Attributes:
        total: ``(d,)`` sum of the gradients of all ``P`` partitions, as if nobody had lied.
        faulty: sorted indices of the workers whose vectors were found wrong.
    """

    total: Tensor
    faulty: list[int] = field(default_factory=list)


# The decode threads, and how many: made on first use, grown when more threads are asked for.
_POOL: Optional[tuple[ThreadPoolExecutor, int]] = None
_POOL_LOCK = threading.Lock()


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it makes its own pool if it decodes."""
    global _POOL, _POOL_LOCK
    _POOL, _POOL_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def each_block(work: Callable[[int], None], count: int, device: torch.device) -> None:
    """``work(0) .. work(count - 1)``; on the CPU, in contiguous runs spread over ``torch.get_num_threads()``
    threads (at most 8). Each call must write only its own block's outputs, so that the results are the
    same bits in any order. The cyclic code's per-block products of a few rows use one core each
    (measured), and its passes would otherwise run at that one core's speed. With one thread (torchrun
    sets ``OMP_NUM_THREADS=1`` unless told otherwise) the blocks run in turn."""
    threads = min(torch.get_num_threads(), count, 8) if device.type == "cpu" else 1
    if threads <= 1:
        for i in range(count):
            work(i)
        return
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] < threads:
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            _POOL = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="draco-decode"), threads)
        pool = _POOL[0]
    bounds = [count * k // threads for k in range(threads + 1)]

    def run(k: int) -> None:
        with torch.no_grad():
            for i in range(bounds[k], bounds[k + 1]):
                work(i)

    for future in [pool.submit(run, k) for k in range(threads)]:
        future.result()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums of half-precision vectors are accumulated in float32; other dtypes in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def horner_order(held: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """The order a coded row's ``(partition, weight)`` pairs are summed in by Horner's rule (the coded step's, and
    ``Code.encode``'s): increasing ``|weight|``, ties in their given order (the repetition code's equal weights keep
    theirs), so each rescaling of the running sum, ``w_before / w_next``, is at most 1 in size: none scales the sum up
    (in float16, rescalings up to 2.9 overflowed rows whose partition gradients fit the dtype)."""
    return sorted(held, key=lambda pair: abs(pair[1]))


class Code(ABC):
    """A gradient code for ``num_workers`` workers tolerating ``num_adversaries`` Byzantine ones.

    Subclasses set ``name`` (the string ``DracoStrategy(code=...)`` accepts), check their
    parameters in ``check`` and implement ``partitions``, ``encoding_matrix`` and ``decode``.
    """

    name: ClassVar[str]
    #: Whether ``parts`` exists, so that a robust aggregator can be put on top of the code.
    supports_aggregation: ClassVar[bool] = False
    #: Whether any rank may decode any contiguous piece of the received vectors on its own and get
    #: bitwise the piece of the whole decode: no secret, column by column (``decode="sharded"``).
    shardable: ClassVar[bool] = False
    #: Keyword options the constructor accepts beyond ``(num_workers, num_adversaries, redundancy)``,
    #: such as ``"tolerance"``: what ``make_code`` may pass on.
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, num_workers: int, num_adversaries: int, redundancy: Optional[int] = None):
        redundancy = self.default_redundancy(num_adversaries) if redundancy is None else redundancy
        self.check(num_adversaries, redundancy, num_workers)
        self.num_workers = int(num_workers)
        self.num_adversaries = int(num_adversaries)
        self.redundancy = int(redundancy)

    # -- parameters -------------------------------------------------------------------------
    @classmethod
    def default_redundancy(cls, num_adversaries: int) -> int:
        """The smallest redundancy that tolerates ``num_adversaries`` liars: 2s+1."""
        return 2 * num_adversaries + 1

    @classmethod
    def check(cls, num_adversaries: int, redundancy: int, num_workers: Optional[int] = None) -> None:
        """Raise ``ValueError`` naming the parameter and the rule it breaks.

        Called without ``num_workers`` before the world size is known, and with it once it is.
        """
        if not isinstance(num_adversaries, int) or isinstance(num_adversaries, bool) or num_adversaries < 0:
            raise ValueError(f"num_adversaries must be an integer >= 0 (got {num_adversaries!r}).")
        if not isinstance(redundancy, int) or isinstance(redundancy, bool) or redundancy < 1:
            raise ValueError(f"redundancy must be an integer >= 1 (got {redundancy!r}).")
        if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"num_workers must be an integer >= 1 (got {num_workers!r}).")

    # -- the code ---------------------------------------------------------------------------
    @abstractmethod
    def partitions(self, worker: int) -> list[int]:
        """The partitions whose gradients ``worker`` computes, in the order it computes them."""

    @property
    @abstractmethod
    def encoding_matrix(self) -> Tensor:
        """``(num_workers, num_partitions)`` float64: row ``i`` weights the partition gradients worker ``i`` sends."""

    @abstractmethod
    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        """Recover the sum of all partition gradients from ``received`` (``(num_workers, d)``).

        ``generator`` is the parameter server's secret randomness for codes that project the
        received vectors; codes that need none ignore it. Raises ``DracoDecodeError`` when the
        vectors reveal more liars than the code tolerates.
        """

    def encode(
        self, gradients: Tensor, dtype: Optional[torch.dtype] = None, *, noise: float = 0.0,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Every worker's coded vector from the partition gradients (``(P, d)``), as training forms it.

        Each row is ``sum_j W[i, j] g_j`` computed in ``dtype`` (default: the gradients') the way the
        strategy's coded step does: Horner's rule over the worker's non-zero weights, so rounding is
        what a real run's rows carry. For tests and benchmarks of a code.

        ``noise``: rows as non-deterministic kernels give them instead. Every holder of partition ``j``
        computes its own copy of ``g_j``, off by ``noise`` (relative to ``||g_j||``, in a random direction
        drawn from ``generator``); the weighted copies are summed in float64, then cast to ``dtype``.
        """
        dtype = dtype or gradients.dtype
        if noise:
            p, d = gradients.shape
            exact = gradients.to(torch.float64)
            rows = torch.zeros(p, d, dtype=torch.float64, device=gradients.device)
            for worker in range(self.num_workers):
                for j in self.partitions(worker):
                    spread = noise * exact[j].norm() / math.sqrt(d)
                    copy = exact[j] + spread * torch.randn(d, dtype=torch.float64, generator=generator)
                    rows[worker] += self.encoding_matrix[worker, j] * copy
            return rows.to(dtype)
        grads = gradients.to(dtype)
        rows = []
        for worker in range(self.num_workers):
            held = horner_order(
                [(j, w) for w, j in zip(self.coefficients(worker), self.partitions(worker)) if w != 0.0]
            )
            row = grads[held[0][0]].clone()
            for (_, before), (partition, weight) in zip(held, held[1:]):
                row.mul_(before / weight).add_(grads[partition])
            rows.append(row.mul_(held[-1][1]) if held[-1][1] != 1.0 else row)
        return torch.stack(rows)

    def parts(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> tuple[Tensor, list[int]]:
        """``k`` vectors whose sum is the total, and the faulty workers: the input of a robust aggregator."""
        raise ValueError(f"code={self.name!r} cannot be combined with an aggregator.")

    def state_dict(self) -> dict:
        """What the decoder carries from one decode to the next (kept by the PS with its checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s output."""

    def check_wire_dtype(self, dtype: torch.dtype) -> None:
        """Raise ``ValueError`` if gradients of ``dtype`` cannot be decoded accurately by this code."""

    # -- shared helpers ---------------------------------------------------------------------
    @property
    def num_partitions(self) -> int:
        return self.num_workers

    def coefficients(self, worker: int) -> list[float]:
        """The weights of ``worker``'s partitions, in the order of ``partitions(worker)``."""
        row = self.encoding_matrix[worker]
        return [float(row[p]) for p in self.partitions(worker)]

    def _check_received(self, received: Tensor) -> None:
        if received.dim() != 2 or received.shape[0] != self.num_workers:
            raise ValueError(
                f"received must have shape (num_workers={self.num_workers}, d); got {tuple(received.shape)}."
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_workers={self.num_workers}, num_adversaries={self.num_adversaries},"
            f" redundancy={self.redundancy})"
        )
