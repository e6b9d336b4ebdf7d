"""Overlap the exchange with the rest of the backward: one communication thread runs the hooks.

DDP calls a comm hook as soon as a bucket's gradients are ready and waits for the futures only
at the end of the backward. An exchange that finishes its collectives inside the hook stops the
backward meanwhile. ``overlapped(hook, thread)`` returns at once with a pending future and runs
``hook`` on ``thread``, a one-worker executor: the buckets' collectives run in the order DDP
launched them, one at a time, the same on every rank, while autograd computes the next buckets.
Async collectives chained with ``.then`` would be the other way, but on gloo they hang on one
process group and give wrong gradients on two; the thread runs the synchronous exchange as is.
"""

from concurrent.futures import Executor
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["overlapped"]


def overlapped(hook: Callable, thread: Executor) -> Callable:
    """``hook`` run on ``thread``; the returned future completes with the hook's own."""

    def overlapped_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        future: torch.futures.Future[Tensor] = torch.futures.Future()

        def exchange() -> None:
            try:
                inner = hook(state, bucket)
            except BaseException as error:  # noqa: BLE001 - handed to the backward, which re-raises it
                future.set_exception(error)
                return
            inner.add_done_callback(lambda done: _forward(done, future))

        thread.submit(exchange)
        return future

    return overlapped_hook


def _forward(done: torch.futures.Future, future: torch.futures.Future) -> None:
    try:
        future.set_result(done.value())
    except BaseException as error:  # noqa: BLE001
        future.set_exception(error)
