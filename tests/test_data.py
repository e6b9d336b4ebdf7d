"""DracoDataLoader on its own: the batches of each held partition, and resuming inside an epoch."""

import itertools
import threading
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_draco.data import DracoDataLoader


def loader(partitions, seed=7):
    data = TensorDataset(torch.arange(60).float(), torch.arange(60))
    sampler = DistributedSampler(data, num_replicas=3, rank=0, shuffle=True, seed=1)
    return DracoDataLoader(DataLoader(data, batch_size=4, sampler=sampler), partitions, 3, seed)


def labels(batches):
    return [[b[1].tolist() for b in step.batches] for step in batches]


def test_each_partition_gets_what_plain_ddp_rank_would():
    draco = loader([1, 2])
    draco.sampler.set_epoch(3)
    for partition, got in zip([1, 2], zip(*labels(list(draco)))):
        sampler = DistributedSampler(draco.dataset, num_replicas=3, rank=partition, shuffle=True, seed=1)
        sampler.set_epoch(3)
        plain = [b[1].tolist() for b in DataLoader(draco.dataset, batch_size=4, sampler=sampler)]
        assert list(got) == plain


def test_a_resumed_loader_goes_on_from_the_next_untrained_step():
    full = loader([0, 1, 2])
    full.sampler.set_epoch(2)
    steps = list(full)
    for step in steps[:3]:
        full.note_trained(step)
    state = full.state_dict()
    assert state == {"epoch": 2, "steps_trained": 3}

    resumed = loader([0, 1, 2])
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = list(resumed)
    assert [s.index for s in rest] == [s.index for s in steps[3:]]
    assert labels(rest) == labels(steps[3:])
    # The position applies once: the next epoch starts from its first batch.
    resumed.sampler.set_epoch(3)
    assert next(iter(resumed)).index == 0


def test_a_position_saved_at_the_end_of_an_epoch_starts_the_next_one_whole():
    resumed = loader([0, 1, 2])
    resumed.load_state_dict({"epoch": 4, "steps_trained": 5})
    resumed.sampler.set_epoch(5)  # Lightning moved on to the next epoch
    assert len(list(resumed)) == len(resumed) == 5


class _NoisyData(torch.utils.data.Dataset):
    """Each item draws from the global RNG, as random augmentation in ``__getitem__`` does."""

    def __len__(self):
        return 60

    def __getitem__(self, i):
        return torch.tensor(float(i)) + torch.rand(()), i


def test_any_partitions_batch_is_replayed_by_index_as_its_holders_load_it():
    # Reactive mode: a helper loads another group's batch by index, randomness in the dataset included.
    held = DracoDataLoader(DataLoader(_NoisyData(), batch_size=4, sampler=DistributedSampler(
        _NoisyData(), num_replicas=3, rank=0, shuffle=True, seed=1)), [1, 2], 3, seed=7)
    other = DracoDataLoader(DataLoader(_NoisyData(), batch_size=4, sampler=DistributedSampler(
        _NoisyData(), num_replicas=3, rank=0, shuffle=True, seed=1)), [0], 3, seed=7)
    held.sampler.set_epoch(2)
    torch.manual_seed(99)  # the helper's own RNG state does not matter
    for step in held:
        for partition, batch in zip(step.partitions, step.batches):
            replayed = other.replay(partition, step.epoch, step.index)
            assert torch.equal(replayed[0], batch[0]) and torch.equal(replayed[1], batch[1])


class _Shuffled(torch.utils.data.Sampler):
    """A user's own shuffling sampler: a fresh permutation from torch's global RNG at each iteration."""

    def __init__(self, n):
        self.n = n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())

    def __len__(self):
        return self.n


def _user_sampler_loader(partitions, epoch=0):
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    data = TensorDataset(torch.arange(60).float(), torch.arange(60))
    # What Lightning makes of DataLoader(sampler=_Shuffled(60)) on rank 0 of three.
    sampler = DistributedSamplerWrapper(_Shuffled(60), num_replicas=3, rank=0, shuffle=False)
    draco = DracoDataLoader(DataLoader(data, batch_size=4, sampler=sampler), partitions, 3, seed=7)
    draco.sampler.set_epoch(epoch)
    return draco


def test_a_users_shuffling_sampler_is_split_whole_across_the_partitions_of_every_rank():
    """Every partition slices one order of the user's sampler per epoch: the epoch covers the data set once,
    and a partition's batches are the same on every rank that holds it."""
    for epoch in (0, 1):
        every_rank = [labels(list(_user_sampler_loader(held, epoch))) for held in ([0, 1, 2], [2, 0], [1])]
        by_partition = {}
        for held, steps in zip(([0, 1, 2], [2, 0], [1]), every_rank):
            for position, partition in enumerate(held):
                batches = [step[position] for step in steps]
                assert by_partition.setdefault(partition, batches) == batches, f"partition {partition} differs"
        seen = sorted(i for batches in by_partition.values() for batch in batches for i in batch)
        assert seen == list(range(60)), "each sample once per epoch"
    first, second = (labels(list(_user_sampler_loader([0], epoch))) for epoch in (0, 1))
    assert first != second, "a new order each epoch"


def test_a_users_shuffling_sampler_is_replayed_as_its_holders_load_it():
    draco = _user_sampler_loader([0, 1, 2], epoch=1)
    steps = list(draco)
    for step in (0, 3):
        for partition in range(3):
            assert draco.replay(partition, 1, step)[1].tolist() == steps[step].batches[partition][1].tolist()


class _Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(torch.arange(10).float())


def test_an_iterable_dataset_is_refused_naming_what_to_give_instead():
    with pytest.raises(ValueError, match=r"needs a map-style training dataset \(got the IterableDataset _Stream\)"):
        DracoDataLoader(DataLoader(_Stream(), batch_size=2), [0], 3, seed=7)


class _Buckets(torch.utils.data.BatchSampler):
    """A batch sampler of the user's own (say, grouping samples by length)."""


def test_a_batch_sampler_of_the_users_own_is_refused_naming_it():
    dataset = torch.utils.data.TensorDataset(torch.arange(12.0))
    loader = DataLoader(dataset, batch_sampler=_Buckets(DistributedSampler(dataset, 3, 0), 2, False))
    with pytest.raises(ValueError, match=r"batch with batch_size \(got the batch_sampler _Buckets\)"):
        DracoDataLoader(loader, [0], 3, seed=7)


class _IndicesFixedAtInit(DistributedSampler):
    """Picks its indices once, from the rank it was made with: copies with another ``rank`` yield them too."""

    def __init__(self, dataset, num_replicas, rank):
        super().__init__(dataset, num_replicas, rank, shuffle=False)
        self.indices = list(range(len(dataset)))[rank::num_replicas]

    def __iter__(self):
        return iter(self.indices)


class _EveryThird(DistributedSampler):
    """A subclass that reads ``rank`` where it should, in ``__iter__``."""

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def test_a_sampler_that_fixes_its_indices_at_init_is_named_in_a_warning_and_a_sound_one_is_not(monkeypatch):
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 0)  # the warning is rank 0's; another test may have set a rank
    dataset = TensorDataset(torch.arange(12.0))
    with pytest.warns(UserWarning, match=r"_IndicesFixedAtInit yields the same indices for partitions 0 and 1"):
        draco = DracoDataLoader(DataLoader(dataset, batch_size=2, sampler=_IndicesFixedAtInit(dataset, 3, 1)),
                                [0, 1], 3, seed=7)
    # What it warns of: rank 1's copies for partitions 0 and 1 both load rank 1's indices.
    first = next(iter(draco))
    assert first.batches[0][0].tolist() == first.batches[1][0].tolist() == [1.0, 4.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draco = DracoDataLoader(DataLoader(dataset, batch_size=2, sampler=_EveryThird(dataset, 3, 1)), [0, 1], 3, 7)
    assert [b[0].tolist() for b in next(iter(draco)).batches] == [[0.0, 3.0], [1.0, 4.0]]


class _GlobalRngShuffle(DistributedSampler):
    """Shuffles in ``__iter__`` with torch's global RNG: DDP's ranks, seeded alike, slice one permutation."""

    def __iter__(self):
        order = torch.randperm(len(self.dataset)).tolist()
        return iter(order[self.rank : self.total_size : self.num_replicas])


class _OwnGeneratorShuffle(DistributedSampler):
    """Shuffles with a generator made in ``__init__``, which each epoch's draw moves on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gen = torch.Generator().manual_seed(11)

    def __iter__(self):
        order = torch.randperm(len(self.dataset), generator=self.gen).tolist()
        return iter(order[self.rank : self.total_size : self.num_replicas])


class _RankDependentDraws(_OwnGeneratorShuffle):
    """Moves its generator on by an amount that depends on ``rank`` (per-rank buckets, say)."""

    def __iter__(self):
        order = super().__iter__()
        torch.rand(self.rank, generator=self.gen)
        return order


class _HoldingALock(_OwnGeneratorShuffle):
    """Holds what cannot be deep-copied (a lock, a file handle) besides its generator."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = threading.Lock()


class _NeverEnding(_OwnGeneratorShuffle):
    """Yields its slice of a fresh permutation again and again: its length is what an epoch takes."""

    def __iter__(self):
        while True:
            yield from super().__iter__()


@pytest.mark.parametrize("sampler_class", [_GlobalRngShuffle, _OwnGeneratorShuffle, _RankDependentDraws, _HoldingALock,
                                           _NeverEnding])
def test_a_distributed_sampler_subclass_that_shuffles_is_drawn_per_partition_as_ddp_draws_it(sampler_class):
    """Each partition's loader used to draw its own permutation (under its own seed, or from where the previous
    partition left the shared generator): samples repeated and left out within an epoch, and under the cyclic
    code the holders of a partition, holding it in another order, loaded different batches. Now each partition
    draws as DDP's rank of that partition draws: with a generator of the sampler's own, exactly DDP's order."""
    data = TensorDataset(torch.arange(60).float(), torch.arange(60))
    epochs = (0, 1, 2)

    def rank(held):
        draco = DracoDataLoader(DataLoader(data, batch_size=4, sampler=sampler_class(data, 3, held[0], shuffle=False)),
                                held, 3, seed=7)
        out = []
        for epoch in epochs:
            draco.sampler.set_epoch(epoch)
            steps = labels(list(draco))
            out.append({p: [i for step in steps for i in step[position]] for position, p in enumerate(held)})
        return out, draco

    reference, draco = rank([0, 1, 2])
    for held in ([2, 0], [1]):
        assert rank(held)[0] == [{p: by_partition[p] for p in held} for by_partition in reference]
    if sampler_class is _GlobalRngShuffle:  # DDP's order comes from each rank's global RNG: each sample once
        for by_partition in reference:
            assert sorted(i for indices in by_partition.values() for i in indices) == list(range(60))
    else:
        for partition in range(3):
            ddp = sampler_class(data, 3, partition, shuffle=False)
            ddp_epochs = []
            for epoch in epochs:
                ddp.set_epoch(epoch)
                ddp_epochs.append(list(itertools.islice(iter(ddp), len(ddp))))
            assert [by_partition[partition] for by_partition in reference] == ddp_epochs
    assert reference[0] != reference[1], "a new order each epoch"
    # A helper replays any partition of the current epoch as its holders loaded it, also one this rank never drew.
    helper = DracoDataLoader(DataLoader(data, batch_size=4, sampler=sampler_class(data, 3, 0, shuffle=False)),
                             [0], 3, seed=7)
    for epoch in epochs:
        helper.sampler.set_epoch(epoch)
        list(helper)
    assert helper.replay(2, 2, 1)[1].tolist() == reference[2][2][4:8]
    assert draco.replay(1, 2, 0)[1].tolist() == reference[2][1][:4]


class _AugmentedInWorkers(torch.utils.data.Dataset):
    def __len__(self):
        return 24

    def __getitem__(self, i):
        return torch.tensor(float(i)) + torch.rand(())


def test_a_loader_generator_does_not_set_the_worker_seeds_of_a_partitions_holders_apart():
    """Worker seeds come from the loader's generator where it has one; shared by a rank's partition loaders,
    it seeded a partition's workers by the order the rank holds it in (the cyclic code's orders differ)."""
    data = _AugmentedInWorkers()

    def batches(held):
        sampler = DistributedSampler(data, 3, held[0], shuffle=True, seed=1)
        loader = DataLoader(data, batch_size=4, sampler=sampler, num_workers=1,
                            generator=torch.Generator().manual_seed(5))
        draco = DracoDataLoader(loader, held, 3, seed=7)
        return {partition: batch for partition, batch in zip(held, next(iter(draco)).batches)}

    one, other = batches([0, 1]), batches([1, 0])
    assert all(torch.equal(one[p], other[p]) for p in (0, 1))


def test_persistent_loader_workers_end_with_the_loader():
    import multiprocessing

    data = TensorDataset(torch.arange(24).float())
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 3, 0), num_workers=1,
                        persistent_workers=True)
    draco = DracoDataLoader(loader, [0, 1], 3, seed=7)
    list(draco)
    assert len(multiprocessing.active_children()) >= 2
    draco.shutdown_workers()
    assert multiprocessing.active_children() == []


def test_the_loader_settings_callbacks_read_are_the_users():
    data = TensorDataset(torch.arange(24).float())
    collate = torch.utils.data.default_collate
    loader = DataLoader(data, batch_size=4, sampler=DistributedSampler(data, 3, 0), num_workers=0, collate_fn=collate,
                        drop_last=True, pin_memory=False)
    draco = DracoDataLoader(loader, [0, 1], 3, seed=7)
    assert (draco.num_workers, draco.collate_fn, draco.drop_last, draco.pin_memory, draco.persistent_workers) == (
        0, collate, True, False, False)
    assert not hasattr(draco, "worker_init_fn")  # Lightning would set its rank-seeded one where it finds it unset
