"""A LightningCLI app for the CLI test: ``python cli_app.py fit --config CONFIG``, one process per rank.

Lightning's popen launcher re-runs it with the same arguments for the other ranks. Rank 0
writes the strategy's settings and faulty counts after ``fit`` to ``$DRACO_CLI_OUT``.
"""

import json
import os

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_draco  # noqa: F401  (registers the names)


class Net(L.LightningModule):
    def __init__(self, hidden: int = 8, lr: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Data(L.LightningDataModule):
    def __init__(self, size: int = 96, batch_size: int = 8):
        super().__init__()
        self.size, self.batch_size = size, batch_size

    def train_dataloader(self):
        x = torch.randn(self.size, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=self.batch_size, shuffle=True)


def main() -> None:
    torch.set_num_threads(1)
    cli = LightningCLI(Net, Data, save_config_callback=None)
    strategy = cli.trainer.strategy
    if cli.trainer.global_rank == 0:
        with open(os.environ["DRACO_CLI_OUT"], "w") as f:
            json.dump(
                {
                    "strategy": type(strategy).__name__,
                    "code": strategy.config.code,
                    "adversary_ranks": strategy.adversary.ranks if strategy.adversary else None,
                    "faulty_counts": {str(k): v for k, v in strategy.faulty_counts.items()},
                    "global_step": cli.trainer.global_step,
                    "hook_calls": strategy.hook_calls,
                },
                f,
            )


if __name__ == "__main__":
    main()
