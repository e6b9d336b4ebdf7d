"""The example networks and the LightningModule that trains them.

Each network takes ``input_shape`` (C, H, W or a flat size) and ``num_classes`` from the data
module, so any model config composes with any data config. All of them carry BatchNorm, so the
runs exercise DRACO's per-step broadcast of the PS's running statistics.
"""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class MLP(nn.Sequential):
    """flatten -> hidden -> BatchNorm -> ReLU -> Dropout -> (hidden -> ReLU) ... -> classes.

    ``hidden``: the hidden layers' widths, or one width for two hidden layers of it.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int | Sequence[int] = 64,
                 dropout: float = 0.1):
        widths = [hidden, hidden] if isinstance(hidden, int) else [int(n) for n in hidden]
        layers: list[nn.Module] = [
            nn.Flatten(), nn.Linear(math.prod(input_shape), widths[0]), nn.BatchNorm1d(widths[0]), nn.ReLU(),
            nn.Dropout(dropout),
        ]
        for width_in, width in zip(widths, widths[1:]):
            layers += [nn.Linear(width_in, width), nn.ReLU()]
        super().__init__(*layers, nn.Linear(widths[-1], num_classes))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, BatchNorm, ReLU, 2x2 max-pool), then a linear classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: int = 16, dropout: float = 0.1):
        super().__init__()
        self.shape = _image_shape(input_shape)
        in_channels, height, width = self.shape
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(channels, 2 * channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * channels),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout),
            nn.Linear(2 * channels * math.ceil(height / 4) * math.ceil(width / 4), num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.reshape(-1, *self.shape)))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and an identity (or 1x1-projected) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images: a 3x3 stem without max-pool, four stages of two blocks each.

    ``width=64`` is the standard network (11.2M parameters for 10 classes); smaller widths keep
    the same depth for CPU runs.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        in_channels, height, width_px = _image_shape(input_shape)
        self.shape = (in_channels, height, width_px)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**stage
            stages += [BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels, 1)]
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x.reshape(-1, *self.shape)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class Classifier(L.LightningModule):
    """Cross-entropy training of ``net`` with SGD + momentum; logs training loss and validation accuracy.

    The one classifier of this repository: the app, ``benchmarks/compare.py`` and the distributed
    tests all train their networks through it.
    """

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 0.05, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.net = net
        # Counts correct predictions over the epoch on every rank and sums them across ranks.
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def _image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in input_shape)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise ValueError(f"this model needs image data, input_shape (C, H, W) or (H, W); got input_shape={shape}.")
    return shape


def use_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, on or off (PyTorch's defaults: matmuls off, convolutions on).

    Here rather than in the app: submitit pickles the app's functions by value, and cuDNN's
    backend module cannot be pickled.
    """
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
