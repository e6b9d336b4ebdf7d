"""The app's validation accuracy is over the whole validation split, each sample once, whatever the world size.

Single process: the ranks' validation loaders are built one after another, as Lightning would prepare them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from torch.utils.data import DistributedSampler

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from datamodules import DigitsData, SyntheticData  # noqa: E402


def validated_indices(data, world: int) -> list[int]:
    """Every rank's validation indices, after Lightning's preparation: a loader whose sampler is not already a
    DistributedSampler gets one (padded to a multiple of the world size), as Trainer does for fit's validation."""
    indices = []
    for rank in range(world):
        data.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = data.val_dataloader()
        sampler = loader.sampler
        if not isinstance(sampler, DistributedSampler):
            sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=False)
        indices += list(sampler)
    return indices


@pytest.mark.parametrize("world", [3, 6, 7])
def test_every_validation_sample_counts_once(world):
    # Before: digits' 359 validation samples became 360 on 3 or 6 ranks and 364 on 7 (repeated samples), so
    # final_val_acc was 71/360 = 0.1972 for a model that gets 71/359 = 0.1978 right, and runs of different world
    # sizes (frc on 6 ranks, crc on 7) were scored on different sets.
    for data in (DigitsData(), SyntheticData(shape=[4], train_size=8, val_size=10)):
        data.setup("fit")
        indices = validated_indices(data, world)
        assert sorted(indices) == list(range(len(data.val)))
    # With fewer samples than ranks every rank must still validate something (a rank without a batch would log
    # no val_acc while the others wait for it): Lightning's padded sampler is kept there.
    tiny = SyntheticData(shape=[4], train_size=8, val_size=world - 1)
    tiny.setup("fit")
    for rank in range(world):
        tiny.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        assert not isinstance(tiny.val_dataloader().sampler, DistributedSampler)

