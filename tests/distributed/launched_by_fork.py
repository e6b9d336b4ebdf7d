"""Fits whose ranks Lightning's multiprocessing launcher starts (``start_method``), read in the main process.

Usage: python launched_by_fork.py OUT.json START_METHOD

The main process writes what its own Trainer and strategy report after each fit: the ranks' results
must have come back to it, as they do to a notebook.
"""

from __future__ import annotations

import json
import sys
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_draco import Adversary, DracoStrategy

STEPS = 4


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(start_method: str, world: int, **strategy) -> dict:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8 * world * STEPS, 4, generator=gen), torch.randint(0, 2, (8 * world * STEPS,), generator=gen))
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=DracoStrategy(start_method=start_method, **strategy),
                        max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    model = Net()
    trainer.fit(model, DataLoader(data, batch_size=8))
    s = trainer.strategy
    return {"launcher": type(s.launcher).__name__, "faulty_counts": {str(k): v for k, v in s.faulty_counts.items()}, "first_caught": s.ledger.first_caught,
            "steps_decoded": s.ledger.steps, "skipped": s.skipped_steps, "hook_calls": s.hook_calls,
            "exchange_bytes": s.exchange_bytes, "escalations": s.escalation_stats, "quarantined": sorted(s.quarantined),
            "weights_trained": bool((model.net[0].weight != Net().net[0].weight).any())}


def main() -> None:
    warnings.filterwarnings("ignore")
    out, start_method = sys.argv[1], sys.argv[2]
    results = {
        "full": fit(start_method, 3, adversary=Adversary(ranks=[1], attack="reverse")),
        # Groups of two that detect, a recomputed and voted group, and a liar quarantined after its first catch.
        "reactive": fit(start_method, 4, redundancy_mode="reactive", quarantine_after=0,
                        adversary=Adversary(ranks=[3], attack="reverse")),
    }
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
