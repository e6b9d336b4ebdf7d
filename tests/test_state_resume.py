"""A fit stopped and resumed from its checkpoint trains bitwise the model of the uninterrupted fit (one process).

One rank (``code="none"``, the PS on rank 0) runs the strategy's whole checkpoint path: the loader's position,
Lightning's loop counts as the strategy rewrites them, and the PS's state (centred clipping's anchor).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_draco import DracoStrategy

pytestmark = pytest.mark.usefixtures("no_process_group_left")

#: Eight samples in batches of two: four batches an epoch.
BATCHES_PER_EPOCH = 4


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.layer(x) - x.sum(1, keepdim=True)).square().mean()

    def validation_step(self, batch, batch_idx):
        (x,) = batch
        self.log("val_loss", (self.layer(x) - x.sum(1, keepdim=True)).square().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        # Stepped after each epoch's end, where an epoch-end checkpoint is written.
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def dataset() -> TensorDataset:
    return TensorDataset(torch.randn(2 * BATCHES_PER_EPOCH, 3, generator=torch.Generator().manual_seed(0)))


def fit(limit: dict, rule: str | None, accumulate: int, validate: bool, folder=None, save: str = "",
        ckpt_path=None, strategy=None, shuffle=True) -> Tensor:
    """The trained weights of one fit; ``save``: "epochs" (a checkpoint at each epoch's end, after its
    validation if ``validate``), "steps" (after every step) or "after..." (``trainer.save_checkpoint`` once
    ``fit`` returned)."""
    torch.manual_seed(0)
    callbacks = []
    if save == "epochs":
        callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_epochs=1,
                                                         save_on_train_epoch_end=True)]
    elif save == "steps":
        callbacks = [L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1)]
    options = {"aggregator": rule, "aggregator_options": {"tau": 0.05}} if rule else {}
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=strategy or DracoStrategy(code="none", num_adversaries=0, **options),
        accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=bool(callbacks), callbacks=callbacks, num_sanity_val_steps=0, **limit,
    )
    model = Net()
    validation = DataLoader(dataset(), batch_size=4) if validate else None
    trainer.fit(model, DataLoader(dataset(), batch_size=2, shuffle=shuffle), validation, ckpt_path=ckpt_path)
    if save.startswith("after"):
        trainer.save_checkpoint(folder / "last.ckpt")
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("rule", [None, "centered_clipping"])
@pytest.mark.parametrize("accumulate", [1, 2, 3])
@pytest.mark.parametrize("save, by, validate", [
    ("epochs", "max_steps", False), ("epochs", "max_steps", True), ("epochs", "max_epochs", False),
    ("epochs", "max_epochs", True),
    ("steps", "max_steps", False),
    ("after", "max_steps", False), ("after", "max_steps", True), ("after", "max_epochs", False),
    ("after_inside", "max_steps", False), ("after_inside", "max_steps", True),
])
def test_a_fit_resumed_at_an_epochs_end_or_inside_one_trains_the_uninterrupted_model(tmp_path, rule, accumulate,
                                                                                    save, by, validate):
    """Before: a fit limited by ``max_steps`` and resumed from the checkpoint ``ModelCheckpoint`` writes at an
    epoch's end, or from one saved after ``fit`` returned at an epoch's end, ran one more batch in the finished
    epoch and then drew each later epoch's order one epoch ahead; saved after a fit cut inside an epoch, it went
    on in the next epoch: another model (with or without a stateful rule)."""
    steps_per_epoch = math.ceil(BATCHES_PER_EPOCH / accumulate)  # Lightning steps at an epoch's last batch
    if by == "max_steps":
        total, stop = {"max_steps": 3 * steps_per_epoch}, {"max_steps": steps_per_epoch}
        if save in ("steps", "after_inside"):  # inside the second epoch
            stop = {"max_steps": steps_per_epoch + 1}
    else:
        total, stop = {"max_epochs": 3}, {"max_epochs": 1}
    uninterrupted = fit(total, rule, accumulate, validate)
    fit(stop, rule, accumulate, validate, tmp_path / "stopped", save)
    resumed = fit(total, rule, accumulate, validate, tmp_path / "resumed", save,
                  ckpt_path=tmp_path / "stopped" / "last.ckpt")
    assert torch.equal(resumed, uninterrupted), (resumed, uninterrupted)


@pytest.mark.parametrize("save", ["epochs", "after"])
def test_a_checkpoint_written_without_draco_at_an_epochs_end_resumes_under_draco_as_the_uninterrupted_fit(
        tmp_path, save):
    """A DDP run's epoch-end checkpoint (one rank, batches in order: the batches of DRACO's single partition)
    carries the same loop counts, which Lightning restarted with one batch too many."""
    steps = {"max_steps": 3 * BATCHES_PER_EPOCH}
    uninterrupted = fit(steps, None, 1, False, shuffle=False)
    fit({"max_steps": BATCHES_PER_EPOCH}, None, 1, False, tmp_path / "plain", save, strategy=DDPStrategy(), shuffle=False)
    resumed = fit(steps, None, 1, False, tmp_path / "resumed", save, ckpt_path=tmp_path / "plain" / "last.ckpt",
                  shuffle=False)
    assert torch.equal(resumed, uninterrupted), (resumed, uninterrupted)
