"""A one-machine gloo world forked from one process after its imports, for the multi-rank test scripts.

Each rank of a world started as its own process imports torch and Lightning again: about 11 s of
CPU each on a 2-core machine, more than most scenarios cost. A script that forks its ranks once its
imports are done skips that. The launchers users run (Lightning's popen launcher, torchrun, srun)
are tested through the app, in tests/launch. ``free_port`` serves the tests that start ranks themselves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import traceback
from typing import Callable, NoReturn


def free_port() -> int:
    """A loopback port free now (another process may take it before it is bound again, rarely)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fork_ranks(world: int) -> tuple[int, list[int]]:
    """Fork ranks 1..world-1 from this process: (this process's rank, the pids of the others in rank 0).

    Sets MASTER_ADDR, MASTER_PORT and WORLD_SIZE for ``init_process_group``. Call it before any
    thread pool or process group exists, so that each child is a clean copy of rank 0.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError("fork_ranks: CUDA is initialised in this process; its forked ranks could not use it")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
    parent, children = os.getpid(), []
    for rank in range(1, world):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _end_with(parent)
            return rank, []
        children.append(pid)
    return 0, children


def _end_with(parent: int) -> None:
    """Have the kernel end this rank when rank 0 ends (a test's timeout kills rank 0 only); Linux only."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:  # rank 0 ended before the call above
        os._exit(1)


def run_ranks(rank: int, children: list[int], body: Callable[[], None]) -> NoReturn:
    """Run ``body`` on this rank, then exit at once with its status; rank 0 first waits for the others.

    At once: a forked rank must not run rank 0's exit handlers again, and the interpreter's teardown
    of torch and Lightning takes seconds that no result needs.
    """
    status = 0
    try:
        body()
    except BaseException:
        traceback.print_exc()
        status = 1
        # As Lightning's launcher does when rank 0 fails: the other ranks would wait in a collective.
        for pid in children:
            os.kill(pid, signal.SIGKILL)
    failed = [r for r, pid in enumerate(children, 1) if os.waitpid(pid, 0)[1] != 0]
    if failed and not status:
        print(f"ranks {failed} failed", file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
