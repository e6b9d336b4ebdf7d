"""Redundant data assignment: each rank loads the batches of every partition its code gives it.

Partition ``j`` of step ``t`` is exactly the batch that plain DDP's rank ``j`` gets at step
``t``: the same ``DistributedSampler`` (same dataset, seed, epoch, shuffle, drop_last, batch
size) with ``rank = j``. A rank holding partitions ``[3, 4, 5]`` iterates three such loaders
side by side and yields one ``PartitionBatch`` per step.
"""

from __future__ import annotations

import copy
import itertools
import random
from typing import Any, Iterator, NamedTuple

import numpy
import torch
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, Sampler

from lightning_draco._compat import update_dataloader, wrapped_sampler
from lightning_draco._seeding import derive_seed, seeded_rng

__all__ = ["DracoDataLoader", "PartitionBatch", "partition_seed", "transfer_seed"]

# Salts keep the seeds of data loading, device transfer, the forward pass and a user's sampler apart.
_LOAD, _TRANSFER, _FORWARD, _ORDER = 0x10AD, 0x7A45, 0xF0D, 0x0DE7


def partition_seed(seed: int, epoch: int, index: int, partition: int) -> int:
    """The seed of partition ``partition``'s forward pass at batch ``index`` of ``epoch``: the same on every replica."""
    return derive_seed(_FORWARD, seed, epoch, index, partition)


def transfer_seed(seed: int, epoch: int, index: int, partition: int) -> int:
    """The seed of the batch-transfer hooks (e.g. augmentation on the device) for that partition and batch."""
    return derive_seed(_TRANSFER, seed, epoch, index, partition)


class PartitionBatch(NamedTuple):
    """One step's data on one rank: the batch of each partition it holds, in code order."""

    batches: list
    partitions: list[int]
    epoch: int
    index: int


class _EpochFanout:
    """Stands where Lightning looks for ``loader.sampler``: ``set_epoch`` reaches every partition's sampler."""

    def __init__(self, samplers: list[DistributedSampler]):
        self.samplers = samplers

    def set_epoch(self, epoch: int) -> None:
        for sampler in self.samplers:
            sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.samplers[0].epoch

    def __len__(self) -> int:
        return len(self.samplers[0])


class _EpochOrder:
    """A user's own sampler, drawn once per epoch for every partition.

    Lightning wraps such a sampler in a ``DistributedSampler`` whose every iteration draws it again.
    One wrapper per partition would draw it once per partition, each under that partition's seed,
    and the partitions would then slice different orders: some samples twice in an epoch, others
    never. Here every partition's sampler reads one order, drawn under a seed of the run and the
    epoch that every rank shares, so the partitions split it as DDP's ranks split theirs.
    """

    def __init__(self, sampler: Any, seed: int):
        # The name Lightning's wrapper reads to forward set_epoch to the user's sampler.
        self._sampler = sampler
        self.seed = seed
        self.epoch: int | None = None
        self.indices: list[Any] = []

    def draw(self, epoch: int) -> None:
        if epoch != self.epoch:
            with seeded_rng(derive_seed(_ORDER, self.seed, epoch)):
                self.indices = list(self._sampler)
            self.epoch = epoch

    def reset(self) -> None:
        """Called by Lightning's wrapper at each iteration: the order stays the epoch's (``draw``)."""

    def __getitem__(self, index: int) -> Any:
        return self.indices[index]

    def __len__(self) -> int:
        return len(self._sampler)


_RANDOM_STATES = (torch.Generator, random.Random, numpy.random.Generator, numpy.random.RandomState)


def _copied(sampler: DistributedSampler) -> DistributedSampler:
    """A copy of ``sampler`` that draws on its own: its generator and other state copied, its dataset shared.

    A shallow copy would share a generator the sampler made for itself, and drawing from the copy would
    move the sampler's own. A sampler that cannot be deep-copied (one holding a lock or a file handle) is
    copied shallowly, with copies of the random generators among its attributes.
    """
    try:
        return copy.deepcopy(sampler, memo={id(sampler.dataset): sampler.dataset})
    except Exception:  # noqa: BLE001 - any failure to deep-copy: shallowly, then the generators
        copied = copy.copy(sampler)
        for name, value in list(vars(copied).items()):
            if isinstance(value, _RANDOM_STATES):
                setattr(copied, name, copy.deepcopy(value))
        return copied


class _SharedDraw:
    """A ``DistributedSampler`` subclass of the user's, drawn for each partition as DDP's rank of that
    partition would draw it.

    A subclass may shuffle in ``__iter__`` with torch's global random stream, or with a generator of its
    own that each draw moves on (by an amount that may depend on ``rank``). DDP's rank ``j``, seeded like
    the others, draws its sampler once per epoch. Iterated once per partition, each time under that
    partition's seed and from wherever the previous partition left a shared generator, the partitions
    would slice different permutations: samples repeated or left out within an epoch, and holders of a
    partition (holding it in different orders) loading different batches. Here each partition has a copy
    of its own, made from the sampler as this loader began and given ``rank`` = the partition, drawn
    once per epoch from the loader's first epoch on, under a seed of the run and the epoch: the same on
    every holder, and DDP's order where the sampler draws only from a generator of its own.
    """

    def __init__(self, sampler: DistributedSampler, seed: int):
        self.sampler = sampler
        self.seed = seed
        self._initial = _copied(sampler)  # as this loader began
        self._first_epoch: int | None = None
        # Partition -> (the next epoch its copy draws, the copy).
        self._copies: dict[int, tuple[int, DistributedSampler]] = {}
        # (partition, epoch) -> the indices drawn, for the latest epoch drawn.
        self._drawn: dict[tuple[int, int], list[Any]] = {}

    def indices(self, partition: int, epoch: int) -> list[Any]:
        """Partition ``partition``'s indices in ``epoch``."""
        drawn = self._drawn.get((partition, epoch))
        if drawn is not None:
            return drawn
        if self._first_epoch is None:
            self._first_epoch = epoch
        following, sampler = self._copies.get(partition, (None, None))
        if sampler is None or following > epoch:  # a partition first seen now, or an epoch drawn again
            sampler = _copied(self._initial)
            sampler.rank = partition
            following = min(self._first_epoch, epoch)
        for skipped in range(following, epoch):  # epochs its DDP rank drew and this loader did not need
            self._draw(sampler, skipped)
        drawn = self._draw(sampler, epoch)
        self._copies[partition] = (epoch + 1, sampler)
        self._drawn = {key: value for key, value in self._drawn.items() if key[1] >= epoch}
        self._drawn[(partition, epoch)] = drawn
        return drawn

    def _draw(self, sampler: DistributedSampler, epoch: int) -> list[Any]:
        sampler.set_epoch(epoch)
        with seeded_rng(derive_seed(_ORDER, self.seed, epoch)):
            # As many as the sampler says it yields (one that never ends yields what a loader's epoch takes).
            return list(itertools.islice(iter(sampler), len(sampler)))


class _PartitionOfDraw(Sampler):
    """Partition ``partition``'s sampler over a ``_SharedDraw``: what its loader iterates."""

    def __init__(self, draw: _SharedDraw, partition: int):
        self.draw = draw
        self.partition = partition
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        return iter(self.draw.indices(self.partition, self.epoch))

    def __len__(self) -> int:
        return len(self.draw.sampler)


def _warn_if_rank_is_ignored(sampler: DistributedSampler, num_partitions: int) -> None:
    """Warn when a ``DistributedSampler`` subclass yields the same indices whatever its ``rank``.

    Each partition's loader iterates a copy of the sampler with ``rank`` set to the partition. A
    subclass that fixes its indices in ``__init__`` (from the process's rank) gives every partition
    of a rank that rank's indices, so the holders of a partition load different data and the first
    step fails with ``InconsistentDataError``. Only a warning: a sampler that means every replica to
    see the same indices trains (every partition on the same data). Partitions of a sound sampler
    differ from their first index on, so a prefix is compared: a sampler that never ends, or a large
    data set, costs no more than a few draws. A sampler this cannot draw from is left to the step's
    own check.
    """
    try:
        # With fewer samples than partitions, padding repeats indices across partitions.
        if num_partitions < 2 or len(sampler.dataset) < num_partitions:
            return
        drawn = []
        # Copies, not the partition loaders' own samplers: one that counts what it yielded (to resume) keeps its
        # count, and one with a generator of its own keeps the generator where the first epoch draws from it.
        for rank in (0, 1):
            copied = _copied(sampler)
            copied.rank = rank
            drawn.append(list(itertools.islice(iter(copied), 64)))
    except Exception:  # advisory only: the first step's digests catch what this could not look at
        return
    if drawn[0] == drawn[1]:
        rank_zero_warn(
            f"the training sampler {type(sampler).__name__} yields the same indices for partitions 0 and 1:"
            " DracoStrategy iterates a copy of it per partition with `rank` set to the partition, and this one"
            " ignores that `rank`. If it computes its indices from the process's rank in __init__, the ranks"
            " that hold a partition will load different data (InconsistentDataError at the first step): compute"
            " them in __iter__ from self.rank, self.num_replicas and self.epoch."
        )


class DracoDataLoader:
    """Iterates the batches of several partitions in lockstep; resumable inside an epoch.

    ``state_dict`` records the epoch and how many of its steps were trained (the strategy calls
    ``note_trained`` after each optimizer step), so Lightning's checkpoints carry the position
    and a resumed run goes on from the next batch, loading exactly what the uninterrupted run
    would have: the batches before it are drawn and dropped, keeping every per-batch seed and
    any loader-worker randomness where it was. (A sampler of the user's whose order comes from a
    generator of its own starts afresh in the resumed process, as under DDP: the resumed epoch's
    order is then the one its initial state draws.)

    Args:
        dataloader: the training loader as Lightning prepared it for this rank, with a
            ``DistributedSampler`` over ``num_partitions`` replicas.
        partitions: the partitions this rank computes.
        num_partitions: ``P``, the world size.
        seed: mixed into the seeds of data loading (worker seeds, in-dataset randomness), so
            replicas of a partition load identical batches.
    """

    def __init__(self, dataloader: DataLoader, partitions: list[int], num_partitions: int, seed: int):
        sampler = dataloader.sampler
        if isinstance(dataloader.dataset, IterableDataset):
            raise ValueError(
                f"DracoStrategy needs a map-style training dataset (got the IterableDataset"
                f" {type(dataloader.dataset).__name__}): the holders of a partition each load its batch, which"
                " they find by index through a DistributedSampler. Give the DataLoader a Dataset with __getitem__"
                " and __len__."
            )
        batch_sampler = dataloader.batch_sampler
        if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
            raise ValueError(
                f"DracoStrategy needs the training DataLoader to batch with batch_size (got the batch_sampler"
                f" {type(batch_sampler).__name__}): each partition's holders draw its batches through a"
                " DistributedSampler over the partitions, which a batch sampler of your own would not split. Pass"
                " batch_size (and a sampler, if any) instead."
            )
        if not isinstance(sampler, DistributedSampler):
            raise ValueError(
                "DracoStrategy needs the training DataLoader to draw from a DistributedSampler (got"
                f" {type(sampler).__name__}): keep Trainer(use_distributed_sampler=True), or give the loader"
                f" DistributedSampler(num_replicas={num_partitions})."
            )
        if sampler.num_replicas != num_partitions:
            raise ValueError(
                f"the training DistributedSampler has num_replicas={sampler.num_replicas}; DRACO needs one replica"
                f" per partition: num_replicas={num_partitions}."
            )

        self.partitions = list(partitions)
        self.seed = seed
        self.source = dataloader
        user_sampler = wrapped_sampler(sampler)
        self._order = None if user_sampler is None else _EpochOrder(user_sampler, seed)
        self._draw: _SharedDraw | None = None
        if user_sampler is None and type(sampler) is not DistributedSampler:
            _warn_if_rank_is_ignored(sampler, num_partitions)
            self._draw = _SharedDraw(sampler, seed)
        if self._order is not None:
            sampler = copy.copy(sampler)
            sampler.dataset = self._order
        samplers: list[Any] = []
        loaders = []
        for partition in self.partitions:
            if self._draw is not None:
                partition_sampler: Any = _PartitionOfDraw(self._draw, partition)
            else:
                partition_sampler = copy.copy(sampler)
                partition_sampler.rank = partition
            samplers.append(partition_sampler)
            loader = update_dataloader(dataloader, partition_sampler, mode=RunningStage.TRAINING)
            # Worker seeds are drawn from the loader's generator where it has one: shared by the partition loaders
            # of a rank, it would give a partition's holders, which hold their partitions in different orders
            # (the cyclic code), different worker seeds. Without it they come from the partition's seed (__iter__).
            loader.generator = None
            loaders.append(loader)
        self.loaders = loaders
        self.sampler = _EpochFanout(samplers)
        self._template = sampler
        self._replay_indices: dict[tuple[int, int], list[int]] = {}
        self.batch_size = dataloader.batch_size
        self.dataset = dataloader.dataset
        self._trained = (0, 0)  # (epoch, steps of it trained)
        self._resume_at: tuple[int, int] | None = None

    def replay(self, partition: int, epoch: int, index: int) -> Any:
        """Batch ``index`` of ``epoch`` for ``partition`` (any partition, held here or not), loaded by index.

        What the partition's loader yields at that step when the data pipeline's randomness is the
        per-batch seed's (the dataset and ``collate_fn`` run here, in this process): the sampler's
        indices for the epoch, sliced by the batch size, then ``dataset[i]`` and the loader's
        ``collate_fn`` under the seed this loader draws that batch with. Randomness drawn inside loader
        workers cannot be replayed: ``check_replay`` compares a held batch with its replay.
        """
        if self.batch_size is None:
            raise ValueError(
                "redundancy_mode='reactive' replays a partition's batch by index and needs the training DataLoader's"
                " batch_size (got a DataLoader with batch_size=None, e.g. a custom batch_sampler)."
            )
        key = (partition, epoch)
        indices = self._replay_indices.get(key)
        if indices is None and self._draw is not None:
            indices = self._draw.indices(partition, epoch)
        elif indices is None:
            if self._order is not None:
                self._order.draw(epoch)
            sampler = copy.copy(self._template)
            sampler.rank = partition
            sampler.set_epoch(epoch)
            indices = list(iter(sampler))
            # One epoch's indices per partition: drop other epochs' as the run moves on.
            self._replay_indices = {k: v for k, v in self._replay_indices.items() if k[1] == epoch}
            self._replay_indices[key] = indices
        chosen = indices[index * self.batch_size : (index + 1) * self.batch_size]
        collate = self.source.collate_fn
        with seeded_rng(derive_seed(_LOAD, self.seed, epoch, index, partition)):
            return collate([self.dataset[i] for i in chosen])

    def shutdown_workers(self) -> None:
        """End the partition loaders' persistent workers (``persistent_workers=True``), as Lightning ends a
        plain loader's when its stage ends: it finds them through the loader's iterator, which this has not."""
        for loader in self.loaders:
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            loader._iterator = None

    def note_trained(self, batch: PartitionBatch) -> None:
        """Record that the step of ``batch`` is done (its optimizer step taken or skipped)."""
        self._trained = (batch.epoch, batch.index + 1)

    def state_dict(self) -> dict[str, Any]:
        epoch, steps = self._trained
        # The same on every rank (rank 0 writes it, all ranks read it): the partitions follow from the code.
        return {"epoch": epoch, "steps_trained": steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_at = (int(state_dict["epoch"]), int(state_dict["steps_trained"]))
        self._trained = self._resume_at

    def __len__(self) -> int:
        return len(self.loaders[0])

    # What callbacks read off ``trainer.train_dataloader``, as the user's loader set it. Not ``worker_init_fn``:
    # Lightning would attach its rank-seeded one where it finds that attribute unset, and the holders of a
    # partition would then seed their workers apart.
    num_workers = property(lambda self: self.source.num_workers)
    collate_fn = property(lambda self: self.source.collate_fn)
    drop_last = property(lambda self: self.source.drop_last)
    pin_memory = property(lambda self: self.source.pin_memory)
    persistent_workers = property(lambda self: self.source.persistent_workers)

    def __iter__(self) -> Iterator[PartitionBatch]:
        epoch = self.sampler.epoch
        if self._order is not None:
            self._order.draw(epoch)
        iterators = []
        for partition, loader in zip(self.partitions, self.loaders):
            # Worker seeds are drawn when the iterator starts: draw them from the partition's seed.
            with seeded_rng(derive_seed(_LOAD, self.seed, epoch, -1, partition)):
                iterators.append(iter(loader))
        skip = 0
        if self._resume_at is not None:
            if self._resume_at[0] == epoch:
                skip = self._resume_at[1]
            self._resume_at = None
        # A checkpoint taken before this epoch's first step ends is inside this epoch, not at the last one's end.
        self._trained = (epoch, skip)
        index = 0
        while True:
            batches: list[Any] = []
            for partition, iterator in zip(self.partitions, iterators):
                with seeded_rng(derive_seed(_LOAD, self.seed, epoch, index, partition)):
                    try:
                        batches.append(next(iterator))
                    except StopIteration:
                        return
            if index >= skip:
                yield PartitionBatch(batches, list(self.partitions), epoch, index)
            index += 1
