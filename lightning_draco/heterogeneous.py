"""Heterogeneous partitions: each partition gets a class mix drawn from a Dirichlet distribution.

Robust rules assume the honest gradients are close; with skewed class mixes they are not, and the
rules lose accuracy even without an attack, while DRACO's decode (an exact sum) does not care.
``DirichletSampler`` is a ``DistributedSampler``, so Lightning keeps it and DRACO copies it per
partition as it does the default one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = ["DirichletSampler", "dirichlet_shards"]


def dirichlet_shards(labels: Sequence[int], num_partitions: int, alpha: float, seed: int = 0,
                     min_size: int = 1, max_tries: int = 100) -> list[list[int]]:
    """Split sample indices into ``num_partitions`` shards with Dirichlet(alpha) class mixes.

    1. For each class c, shuffle its indices and draw proportions q_c ~ Dirichlet(alpha, ..., alpha)
       over the partitions (one draw per class, from ``seed``).
    2. Cut class c's indices at the cumulative proportions: partition p gets about q_c[p] of them.
    3. If a shard holds fewer than ``min_size`` samples, draw again (the usual rejection rule),
       up to ``max_tries`` times.

    Small alpha (0.1) gives each partition a few dominant classes; large alpha approaches IID.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (got {alpha!r}): the Dirichlet concentration of each class's split.")
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1 (got {num_partitions!r}).")
    import numpy

    y = torch.as_tensor(list(labels))
    gen = torch.Generator().manual_seed(int(seed))
    rng = numpy.random.default_rng(int(seed))
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_partitions)]
        for c in torch.unique(y).tolist():
            members = (y == c).nonzero().flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            # torch's Dirichlet sampler takes no generator; numpy's seeded one does.
            shares = torch.from_numpy(rng.dirichlet([float(alpha)] * num_partitions))
            cuts = (torch.cumsum(shares, 0) * len(members)).round().long().tolist()
            start = 0
            for p, end in enumerate(cuts):
                shards[p].extend(members[start:end].tolist())
                start = end
        if min(len(s) for s in shards) >= min_size:
            return shards
    raise ValueError(
        f"no Dirichlet split with alpha={alpha} gave every one of {num_partitions} partitions {min_size} samples"
        f" in {max_tries} draws: raise alpha or lower min_size."
    )


class DirichletSampler(DistributedSampler):
    """A ``DistributedSampler`` whose replica ``rank`` draws only from its Dirichlet shard.

    Every shard yields the same number of indices per epoch (``ceil(N / num_replicas)``, its own
    indices reshuffled each epoch and repeated as needed), so all partitions give the same number
    of batches and the ranks stay in step.

    Args:
        dataset: the training set.
        labels: the class of each sample of ``dataset``.
        num_replicas: ``P``, the world size (one partition per rank).
        alpha: the Dirichlet concentration (0.1: strongly skewed, 1.0: moderately, 100: near IID).
        seed: seeds the split and the per-epoch shuffles.
    """

    def __init__(self, dataset: Dataset, labels: Sequence[int], num_replicas: int, alpha: float, rank: int = 0,
                 seed: int = 0, min_size: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.alpha = alpha
        self.shards = dirichlet_shards(labels, num_replicas, alpha, seed, min_size)

    def __iter__(self) -> Iterator[int]:
        shard = torch.tensor(self.shards[self.rank])
        gen = torch.Generator().manual_seed(self.seed + self.epoch * 1_000_003 + self.rank)
        repeats = -(-self.num_samples // len(shard))
        order = torch.cat([shard[torch.randperm(len(shard), generator=gen)] for _ in range(repeats)])
        return iter(order[: self.num_samples].tolist())
