"""A three-rank gloo world where rank 2 fails the exchange: it stalls past the collective timeout
(``stall``) or its process ends before sending (``exit``). Ranks 0 and 1 run the parameter-server
exchange as it is (``plain``), with simulated omniscient liars (``omniscient``: rank 1 lies with ALIE,
learning the honest mean in collectives of its own first) or on a communication thread (``overlap``).

Started by tests/exchange/test_hooks.py as
``python failing_world.py <out-dir> <stall|exit> <timeout-s> <plain|omniscient|overlap>``, which forks
ranks 1 and 2 after its imports (``tests/forked_ranks.py``); ranks 0 and 1 each write what the exchange
raised to ``<out-dir>/rank<r>.pt``, and the process ends with rank 1, ending a stalled rank 2.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from concurrent.futures import ThreadPoolExecutor

from lightning_draco import Adversary
from lightning_draco.codes import FractionalRepetitionCode
from lightning_draco.exchange import ExchangeSetup, ExchangeState, adversarial, overlapped, ps_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from forked_ranks import fork_ranks  # noqa: E402
from hook_world import Bucket  # noqa: E402


def main(out: str, mode: str, timeout: float, wrapper: str) -> None:
    rank, children = fork_ranks(3)
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=timedelta(seconds=timeout))
    dist.barrier()  # every rank connected before rank 2 fails
    if rank == 2:
        if mode == "exit":
            os._exit(1)
        time.sleep(timeout + 20)  # alive, its sockets open, answering nothing
        os._exit(0)
    code = FractionalRepetitionCode(3, 1)
    state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0, timeout=timeout))
    state.begin_step(0)
    hook = {
        "plain": ps_hook,
        "omniscient": adversarial(ps_hook, Adversary(ranks=[1], attack="alie")),
        "overlap": overlapped(ps_hook, ThreadPoolExecutor(1)),
    }[wrapper]
    start = time.monotonic()
    try:
        hook(state, Bucket(torch.ones(8))).wait()
        raised = None
    except Exception as error:  # noqa: BLE001 - what the exchange raised, whatever it is, goes to the test
        raised = error
    seen = {
        "type": type(raised).__name__,
        "message": str(raised),
        "cause": type(raised.__cause__).__name__ if raised is not None else None,
        "seconds": time.monotonic() - start,
        "communication": state.stats.seconds["communication"],
        "recorded": state.failed is raised,
    }
    torch.save(seen, os.path.join(out, f"rank{rank}.pt"))
    status = 0
    if children:  # rank 0: once rank 1 has written what it saw, rank 2 is of no more use
        worker, failing = children
        status = os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1])
        os.kill(failing, signal.SIGKILL)
        os.waitpid(failing, 0)
    sys.stdout.flush()
    os._exit(status)  # not destroy_process_group: a peer is gone or stalled


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4])
