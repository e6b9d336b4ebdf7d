"""Replicas of a partition must compute on the same data.

DRACO's vote compares the gradients of the ranks that hold a partition. If those ranks loaded
different data (a split drawn at random in each process, an unseeded synthetic data set), no
two of them ever agree and every step fails as if every rank lied. Two safeguards:

- before the first step, every rank digests the first batch of each partition it holds and
  the digests are compared across the holders (``check_first_batch``);
- a decode that fails because no ``s + 1`` members of a group agree gets a hint that this looks
  like more than ``s`` liars in the group or, where no liar is expected, inconsistent data or
  non-determinism (``explain_decode_failure``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Optional

import numpy
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco.codes import DracoDecodeError
from lightning_draco.data import PartitionBatch

__all__ = ["InconsistentDataError", "batch_digest", "check_first_batch", "compare_digests", "explain_decode_failure"]


class InconsistentDataError(ValueError):
    """Ranks that hold the same partition loaded different data: their gradients can never agree."""


def batch_digest(batch: Any) -> str:
    """SHA-256 of a batch's contents: tensors by dtype, shape and bytes, nested in lists, tuples and dicts."""
    digest = hashlib.sha256()
    _feed(digest, batch)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        tensor = tensor.cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"M{len(value)}".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (str, bytes, int, float, bool, complex)) or value is None:
        digest.update(repr(value).encode())
    elif isinstance(value, numpy.ndarray):
        digest.update(f"A{value.dtype}{value.shape}".encode())
        digest.update(numpy.ascontiguousarray(value).tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A batch of the user's own collate_fn: its fields are the data.
        digest.update(f"D{type(value).__qualname__}".encode())
        for field in dataclasses.fields(value):
            if field.compare:  # a field left out of equality is no part of the data (a per-process handle, say)
                _feed(digest, field.name)
                _feed(digest, getattr(value, field.name, None))
    else:
        # Other objects' repr may hold a memory address, which differs between processes
        # holding equal data: only their type takes part.
        digest.update(f"O{type(value).__qualname__}".encode())


def check_first_batch(batch: PartitionBatch, world_size: int, group: Optional[dist.ProcessGroup] = None) -> None:
    """Gather every rank's digests of its partitions' batches; raise on every rank if holders disagree."""
    mine = {partition: batch_digest(part) for partition, part in zip(batch.partitions, batch.batches)}
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    compare_digests(gathered)


def compare_digests(digests: list[dict[int, str]]) -> None:
    """``digests[rank]`` maps each partition that rank holds to its digest; raise if any partition's holders differ."""
    holders: dict[int, dict[str, list[int]]] = {}
    for rank, by_partition in enumerate(digests):
        for partition, digest in by_partition.items():
            holders.setdefault(int(partition), {}).setdefault(digest, []).append(rank)
    mismatches = [
        f"partition {partition} ({_describe(sorted(by_digest.values()))})"
        for partition, by_digest in sorted(holders.items())
        if len(by_digest) > 1
    ]
    if mismatches:
        raise InconsistentDataError(
            f"the first training batch differs between the ranks that hold the same partition: {'; '.join(mismatches)}."
            " DRACO needs every rank that holds a partition to load the same data. The usual cause is data drawn"
            " at random in each process: seed the split (e.g. random_split(..., generator=torch.Generator()"
            ".manual_seed(0))) and call lightning.seed_everything(...) before building the data. Another is a"
            " DistributedSampler subclass that fixes its indices in __init__: DRACO sets `rank` on a copy of it"
            " per partition, so it must compute them in __iter__. With loader workers (num_workers > 0), a"
            " worker_init_fn that seeds from the process's rank (Lightning's pl_worker_init_function) is a third:"
            " leave it unset, DRACO seeds each partition's workers alike on every holder."
        )


def _describe(groups: list[list[int]]) -> str:
    """``[[0, 1], [2]]`` -> "ranks [0, 1] loaded one batch, rank [2] another"."""
    words = []
    for i, ranks in enumerate(sorted(groups, key=lambda ranks: (-len(ranks), ranks))):
        what = "one batch" if i == 0 else "another"
        words.append(f"{'rank' if len(ranks) == 1 else 'ranks'} {ranks} loaded {what}")
    return ", ".join(words)


# FractionalRepetitionCode's reason when no value is shared by s+1 members of a group (bit for bit,
# or within tolerance). tests/test_consistency.py runs the real decoder, so a change of wording fails there.
_NO_MAJORITY = "no value is"

_HINT = (
    " No s+1 members of the group agree with each other: either more than s of them lied, or, where no liar is"
    " expected, that looks like inconsistent data or non-determinism. Check that every rank loads the same"
    " data for a partition (seed the split, call"
    " seed_everything before building the data) and that the forward does not depend on the rank or on"
    " randomness outside the per-partition seed."
)


def explain_decode_failure(error: DracoDecodeError) -> DracoDecodeError:
    """``error`` with the hint above when no class of ``s + 1`` agreeing members was found; else ``error``."""
    if _NO_MAJORITY not in error.reason or _HINT in str(error):
        return error
    hinted = DracoDecodeError(f"{error}{_HINT}", error.suspects, error.step, error.bucket)
    hinted.reason = error.reason
    return hinted
