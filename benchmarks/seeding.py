"""Host cost of one per-partition RNG scope (``seeded_rng``), against seeding through ``torch.manual_seed``.

    python benchmarks/seeding.py [--repeats 9] [--blocks 300] [--depths 5 80]

A rank enters the scope several times per partition per step (loading, moving to the device, the
forward), deep inside Lightning's loop. ``torch.manual_seed`` seeds every accelerator; one that is
not initialised (CUDA on a CPU rank; XPU and MTIA on a CUDA rank) queues the seed with the caller's
formatted stack trace, whose cost grows with the depth of the stack. ``seeded_rng`` seeds only the
generators it forks. Reports, per stack depth, the median microseconds per scope of each way and
their ratio, in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import numpy
import torch

from lightning_draco._seeding import seeded_rng


@contextlib.contextmanager
def through_manual_seed(seed: int):
    """The scope as it was written before: every device seeded by ``torch.manual_seed``."""
    state, np_state = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        numpy.random.seed(seed % (2**32))
        try:
            yield
        finally:
            random.setstate(state)
            numpy.random.set_state(np_state)


def at_depth(depth: int, work):
    return at_depth(depth - 1, work) if depth else work()


def per_scope(scope, blocks: int) -> float:
    start = time.perf_counter()
    for seed in range(blocks):
        with scope(seed):
            pass
    return (time.perf_counter() - start) / blocks * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--blocks", type=int, default=300)
    parser.add_argument("--depths", type=int, nargs="+", default=[5, 80])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CUDA initialised: {torch.cuda.is_initialized()}")
    print("| stack depth | seeded_rng (us) | torch.manual_seed (us) | ratio |")
    print("|---|---|---|---|")
    for depth in args.depths:
        ours = statistics.median(at_depth(depth, lambda: per_scope(seeded_rng, args.blocks)) for _ in range(args.repeats))
        old = statistics.median(
            at_depth(depth, lambda: per_scope(through_manual_seed, args.blocks)) for _ in range(args.repeats)
        )
        print(f"| {depth} | {ours:.0f} | {old:.0f} | {old / ours:.1f}x |")


if __name__ == "__main__":
    main()
