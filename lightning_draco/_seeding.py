"""Deterministic seeds derived from tuples of integers, and scoped RNG state."""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from typing import Iterator, Optional

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part: the same parts give the same seed on every process."""
    payload = struct.pack(f"<{len(parts)}q", *(int(p) & 0x7FFF_FFFF_FFFF_FFFF for p in parts))
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little") >> 1


def generator(*parts: int, device: Optional[torch.device] = None) -> torch.Generator:
    """A torch generator seeded from ``parts``, on ``device`` (CPU when None)."""
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(derive_seed(*parts))
    return gen


@contextlib.contextmanager
def seeded_rng(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Run the block with torch's, Python's and NumPy's global RNGs seeded to ``seed``; restore them after.

    Replicas that compute the same partition draw the same dropout masks and augmentations
    inside this block, whatever their own RNG streams did before.

    Torch's CPU generator is seeded, and on CUDA ``device``'s own (without ``device``, the current
    CUDA device's where CUDA is in use): the generators the block forks and restores.
    ``torch.manual_seed`` would also queue a seed for every accelerator not yet initialised (CUDA on
    a CPU run, XPU, MTIA), each with a formatted stack trace of the caller, which costs milliseconds
    under Lightning's deep stack and runs several times per partition per step.
    """
    if device is None and torch.cuda.is_initialized():
        # A loading block on a GPU rank: a dataset or collate_fn may draw on the current device.
        device = torch.device("cuda", torch.cuda.current_device())
    cuda = device is not None and device.type == "cuda"
    other = device is not None and device.type not in ("cpu", "cuda", "meta")
    py_state = random.getstate()
    try:
        import numpy

        np_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with the dependencies
        numpy, np_state = None, None
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            # fork_rng read this device's state, so CUDA is initialised and the seed applies at once.
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif other:  # another accelerator: every device seeded, as torch.manual_seed does
            torch.manual_seed(seed)
        random.seed(seed)
        if numpy is not None:
            numpy.random.seed(seed % (2**32))
        try:
            yield
        finally:
            random.setstate(py_state)
            if numpy is not None:
                numpy.random.set_state(np_state)
