"""Three forked gloo ranks compute what the simulated omniscient liars learn; rank 0 prints it as JSON.

Usage: python knowledge_world.py DTYPE (each rank's honest vector is 100 + N(0, 1) noise, rounded to DTYPE)
"""

import contextlib
import importlib
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from forked_ranks import fork_ranks  # noqa: E402

from lightning_draco import Adversary  # noqa: E402

adversarial = importlib.import_module("lightning_draco.exchange.adversarial")


def main() -> None:
    dtype = getattr(torch, sys.argv[1])
    rank, _ = fork_ranks(3)
    dist.init_process_group("gloo", rank=rank, world_size=3)
    every = (100 + torch.randn(3, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).to(dtype)
    state = SimpleNamespace(setup=SimpleNamespace(world_size=3, process_group=None))
    adversarial.collectives.timed = lambda *args, **kwargs: contextlib.nullcontext()  # no exchange state here
    learnt = adversarial._learn_honest(state, Adversary(ranks=[1], attack="alie"), every[rank])
    if rank == 0:
        exact = every.double()
        print(json.dumps({
            "mean_error": float((learnt["honest_mean"].double() - exact.mean(0)).abs().max()),
            "std_error": float((learnt["honest_std"].double() - exact.std(0, unbiased=False)).abs().max()),
            "spread": float(exact.std(0, unbiased=False).mean()),
        }))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
