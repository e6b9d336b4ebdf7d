"""Dirichlet partitions: a split of the data, skewed as alpha says, in equal-length epochs per rank."""

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import TensorDataset

from lightning_draco.heterogeneous import DirichletSampler, dirichlet_shards


def labels(n=1200, classes=10, seed=0):
    return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 8), st.sampled_from([0.05, 0.5, 1.0, 10.0]), st.integers(0, 100))
def test_shards_split_every_index_exactly_once(partitions, alpha, seed):
    y = labels(300, 5, seed)
    shards = dirichlet_shards(y, partitions, alpha, seed)
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(300)) and len(shards) == partitions


def dominant_share(y, shards):
    shares = []
    for shard in shards:
        counts = torch.bincount(torch.tensor([y[i] for i in shard]), minlength=10)
        shares.append(float(counts.max()) / len(shard))
    return sum(shares) / len(shares)


def test_small_alpha_skews_the_class_mix_and_large_alpha_does_not():
    y = labels()
    skew = {a: dominant_share(y, dirichlet_shards(y, 6, a, seed=1, min_size=16)) for a in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.16 and skew[0.1] > 0.5  # 10 classes: IID gives about 0.1 each


def test_sampler_gives_every_rank_the_same_number_of_indices_from_its_shard_only():
    y = labels()
    data = TensorDataset(torch.zeros(len(y), 1), torch.tensor(y))
    sampler = DirichletSampler(data, y, num_replicas=6, alpha=0.1, seed=3, min_size=16)
    seen = []
    for rank in range(6):
        copied = copy.copy(sampler)  # what DRACO does per partition
        copied.rank = rank
        indices = list(copied)
        assert len(indices) == sampler.num_samples == 200
        assert set(indices) <= set(sampler.shards[rank])
        seen.append(indices)
    sampler.set_epoch(1)
    assert list(sampler) != seen[0], "reshuffled each epoch"
    again = DirichletSampler(data, y, num_replicas=6, alpha=0.1, seed=3, min_size=16)
    assert again.shards == sampler.shards, "the split follows from the seed"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(alpha=0.0), r"alpha must be > 0 \(got 0.0\)"),
        (dict(num_partitions=0), r"num_partitions must be an integer >= 1"),
        (dict(min_size=10_000), r"no Dirichlet split with alpha=1.0 gave every one of 6 partitions 10000 samples"),
    ],
)
def test_impossible_splits_are_refused_with_the_parameter(kwargs, message):
    args = dict(labels=labels(), num_partitions=6, alpha=1.0, min_size=1) | kwargs
    with pytest.raises(ValueError, match=message):
        dirichlet_shards(**args)


def test_the_example_data_modules_take_the_partition_option():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from datamodules import DigitsData

    data = DigitsData(batch_size=8, partition="dirichlet", alpha=0.3)
    data.setup()
    data.trainer = SimpleNamespace(world_size=6, global_rank=2)
    loader = data.train_dataloader()
    assert isinstance(loader.sampler, DirichletSampler) and loader.sampler.rank == 2 and loader.sampler.num_replicas == 6
    with pytest.raises(ValueError, match=r"data.partition must be 'iid' or 'dirichlet' \(got 'skewed'\)"):
        DigitsData(partition="skewed")
