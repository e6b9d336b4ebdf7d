"""Stateful rules between steps: what a step with no finite input leaves for the next (one process)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_draco import DracoStrategy, NonFiniteGradientError
from lightning_draco.aggregators import make_aggregator

pytestmark = pytest.mark.usefixtures("no_process_group_left")


def test_centred_clipping_of_inputs_none_finite_is_nan_and_keeps_its_anchor():
    """Before: the result was the previous call's anchor, a finite vector that trained on as this step's gradient."""
    rule = make_aggregator("centered_clipping", 1, tau=1.0)
    first = rule(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
    anchor = rule.state_dict()["anchor"].clone()
    none_finite = torch.tensor([[math.nan] * 8, [math.inf] * 8, [-math.inf] * 8, [math.nan] * 8])
    assert bool(rule(none_finite).isnan().all())
    assert torch.equal(rule.state_dict()["anchor"], anchor) and torch.equal(anchor, first)


class Diverging(L.LightningModule):
    """Its loss is NaN from step 2 on: every rank's gradient is, nobody lied."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = self.layer(x).square().mean()
        return loss * math.nan if self.trainer.global_step >= 2 else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_diverged_model_under_centred_clipping_fails_its_step_instead_of_replaying_the_last_one():
    """Before: from step 2 on, every step applied step 1's result again, and the fit ended without an error."""
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        strategy=DracoStrategy(code="none", num_adversaries=0, aggregator="centered_clipping"),
    )
    data = TensorDataset(torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(NonFiniteGradientError, match="aggregator 'centered_clipping' returned a gradient with NaN"):
        trainer.fit(Diverging(), DataLoader(data, batch_size=2))
    assert trainer.global_step == 2
