"""The collectives of the exchanges, timed and counted into ``ExchangeStats``.

A collective that fails (a rank stalled past the collective timeout, or a peer's process ended)
raises ``CollectiveFailedError`` and says so at once on this rank's log, in one line: the launchers
kill the other ranks as soon as one of them exits, often before the rank that timed out first has
printed its traceback, so the line is what tells the job's log why it failed.

Bytes are the logical payload between ranks, what a rank's own share does not cross: a gather
of ``b`` bytes per rank counts ``b`` sent on each sender and ``(P - 1) b`` received at the root;
a broadcast the reverse; an all-to-all the chunks addressed to other ranks; an all-gather
``(P - 1) b`` each way; a small all-reduce its vector once each way. These are the figures the
traffic formulas in the README predict.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco._errors import one_line
from lightning_draco.exchange.state import ExchangeState

__all__ = [
    "CollectiveFailedError", "all_gather", "all_reduce_sum", "broadcast", "broadcast_object", "count", "gather", "recv",
    "send", "timed",
]

_log = logging.getLogger(__name__)


class CollectiveFailedError(RuntimeError):
    """A collective of the gradient exchange failed on this rank: some rank stopped answering within
    the collective timeout, a peer's process ended, or the backend refused the call. The message names
    this rank, the collective, how long it waited and the timeout; the backend's own error is the
    ``__cause__``."""


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class timed:
    """Context manager: adds the wall time of the block to ``stats.seconds["communication"]``; a
    backend error inside it becomes ``CollectiveFailedError`` (logged at once, see the module)."""

    __slots__ = ("state", "collective", "start")

    def __init__(self, state: ExchangeState, collective: str):
        self.state = state
        #: What the block runs, as the failure message names it ("gather", "broadcast", ...).
        self.collective = collective

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], traceback: Any) -> None:
        waited = time.perf_counter() - self.start
        self.state.stats.seconds["communication"] += waited
        if _from_backend(error):
            message = failure_message(self.state.setup.rank, self.collective, waited, self.state.setup.timeout, error)
            _log.error(message)
            self.state.failed = CollectiveFailedError(message)
            raise self.state.failed from error


def _from_backend(error: Optional[BaseException]) -> bool:
    """A process group's error: its own types, or the plain RuntimeError gloo raises. Not the RuntimeError
    subclasses of other causes (out of memory, NotImplementedError, RecursionError), nor our own."""
    return isinstance(error, dist.DistError) or type(error) is RuntimeError


# gloo's words, lower-cased, for a stalled peer and for a peer whose process ended.
_TIMEOUT_WORDS = ("timed out", "timeout")
_PEER_WORDS = ("closed by peer", "reset by peer", "connection closed", "broken pipe", "connection refused", "pair closure")


def _seconds(value: float) -> str:
    return f"{value:g}" if value < 1e5 else f"{value:.0f}"


def failure_message(rank: int, collective: str, waited: float, timeout: Optional[float], error: BaseException) -> str:
    """One line: which rank's collective failed, after how long, and what that means for the job."""
    reason = one_line(error) or type(error).__name__
    words = reason.lower()
    limit = f"the collective timeout ({_seconds(timeout)} s)" if timeout is not None else "the collective timeout"
    if any(w in words for w in _TIMEOUT_WORDS):
        what = f"got no answer within {limit}: a rank stalled or stopped answering; the job fails instead of hanging"
    elif any(w in words for w in _PEER_WORDS):
        what = (f"broke after {waited:.1f} s: another rank's process ended or closed the connection (it failed,"
                f" was killed, or reached {limit} first); the job fails instead of hanging")
    else:  # the backend refused the call itself (sizes, ranks): nothing says a peer is gone
        what = f"failed after {waited:.1f} s"
    return f"rank {rank}: the gradient exchange's {collective} {what} ({reason})"


def gather(state: ExchangeState, tensor: Tensor, received: Optional[Tensor], dst: int) -> None:
    """Every rank's ``tensor`` into the rows of ``received`` on ``dst`` (``None`` elsewhere)."""
    setup, stats = state.setup, state.stats
    with timed(state, "gather"):
        dist.gather(tensor, list(received.unbind(0)) if setup.rank == dst else None, dst=dst, group=setup.process_group)
    if setup.rank == dst:
        stats.received += (setup.world_size - 1) * _nbytes(tensor)
    else:
        stats.sent += _nbytes(tensor)


def broadcast(state: ExchangeState, tensor: Tensor, src: int) -> None:
    """``tensor`` from ``src`` to every rank, in place."""
    setup, stats = state.setup, state.stats
    with timed(state, "broadcast"):
        dist.broadcast(tensor, src=src, group=setup.process_group)
    if setup.rank == src:
        stats.sent += (setup.world_size - 1) * _nbytes(tensor)
    else:
        stats.received += _nbytes(tensor)


def broadcast_object(state: ExchangeState, obj: Any, src: int) -> Any:
    """A picklable object from ``src`` (rare: a failed decode's error); its bytes are not counted."""
    carrier = [obj]
    with timed(state, "broadcast"):
        dist.broadcast_object_list(carrier, src=src, group=state.setup.process_group)
    return carrier[0]


def count(state: ExchangeState, sent: int, received: int, like: Tensor) -> None:
    """Add ``sent`` and ``received`` values of ``like``'s dtype to the byte counts."""
    state.stats.sent += sent * like.element_size()
    state.stats.received += received * like.element_size()


def all_reduce_sum(state: ExchangeState, tensor: Tensor) -> None:
    """The element-wise sum over ranks, in place; counted as the vector sent and received once."""
    with timed(state, "all-reduce"):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=state.setup.process_group)
    state.stats.sent += _nbytes(tensor)
    state.stats.received += _nbytes(tensor)


def all_gather(state: ExchangeState, outputs: list[Tensor], tensor: Tensor) -> None:
    """Every rank's ``tensor`` into ``outputs`` (by rank)."""
    setup, stats = state.setup, state.stats
    with timed(state, "all-gather"):
        dist.all_gather(outputs, tensor, group=setup.process_group)
    stats.sent += (setup.world_size - 1) * _nbytes(tensor)
    stats.received += sum(_nbytes(t) for j, t in enumerate(outputs) if j != setup.rank)


def _through_host(state: ExchangeState, tensor: Tensor) -> bool:
    # Gloo's point-to-point ops hand the tensor's pointer to its socket as host memory, so a CUDA
    # tensor fails there ("writev: Bad address", seen with ranks sharing a GPU over gloo); its
    # collectives stage CUDA tensors through the host themselves.
    return tensor.device.type != "cpu" and dist.get_backend(state.setup.process_group) == "gloo"


def send(state: ExchangeState, tensor: Tensor, dst: int) -> None:
    """``tensor`` to rank ``dst`` (blocking; outside comm hooks, where gloo's point-to-point works)."""
    with timed(state, "send"):
        dist.send(tensor.cpu() if _through_host(state, tensor) else tensor, dst=dst, group=state.setup.process_group)
    state.stats.sent += _nbytes(tensor)


def recv(state: ExchangeState, tensor: Tensor, src: int) -> None:
    """Into ``tensor`` from rank ``src`` (blocking)."""
    staged = torch.empty_like(tensor, device="cpu") if _through_host(state, tensor) else tensor
    with timed(state, "receive"):
        dist.recv(staged, src=src, group=state.setup.process_group)
    if staged is not tensor:
        tensor.copy_(staged)
    state.stats.received += _nbytes(tensor)
