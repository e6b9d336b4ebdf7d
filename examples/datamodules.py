"""The example data modules: digits (embedded, the default), synthetic data, CIFAR-10 from a local folder.

Each exposes ``input_shape`` and ``num_classes`` for the model configs. Nothing is downloaded.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset


class _TensorData(L.LightningDataModule):
    """Shared loaders: shuffled training batches of ``batch_size`` (per partition), large validation batches.

    ``partition="dirichlet"`` gives each partition a class mix drawn from Dirichlet(``alpha``)
    (``lightning_draco.heterogeneous``); ``"iid"`` (default) is the usual uniform shuffle.
    """

    train: Dataset
    val: Dataset

    def __init__(self, batch_size: int, num_workers: int = 0, partition: str = "iid", alpha: float = 1.0, seed: int = 0):
        super().__init__()
        if partition not in ("iid", "dirichlet"):
            raise ValueError(f"data.partition must be 'iid' or 'dirichlet' (got {partition!r}).")
        if partition == "dirichlet" and not alpha > 0:
            raise ValueError(f"data.alpha must be > 0 for partition='dirichlet' (got {alpha!r}).")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.partition, self.alpha, self.partition_seed = partition, alpha, seed

    def train_dataloader(self) -> DataLoader:
        if self.partition == "dirichlet":
            from lightning_draco.heterogeneous import DirichletSampler

            labels = self.train.labels if hasattr(self.train, "labels") else self.train.tensors[1]
            world = self.trainer.world_size if self.trainer is not None else 1
            rank = self.trainer.global_rank if self.trainer is not None else 0  # plain DDP uses the sampler as given
            sampler = DirichletSampler(self.train, labels.tolist(), world, self.alpha, rank=rank,
                                       seed=self.partition_seed, min_size=self.batch_size)
            return DataLoader(self.train, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        # Each sample on exactly one rank. Left to Lightning, its DistributedSampler pads the split to a multiple
        # of the world size with repeated samples, and val_acc (summed over the ranks) then counts those twice:
        # 71/360 where the model gets 71 of digits' 359 right, and a different padding for each world size.
        sampler = None
        trainer = self.trainer
        # With fewer samples than ranks, a rank without any would log no val_acc and leave the others waiting.
        if trainer is not None and 1 < trainer.world_size <= len(self.val):
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(self.val, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                                   shuffle=False)
        return DataLoader(self.val, batch_size=256, sampler=sampler, num_workers=self.num_workers)


class DigitsData(_TensorData):
    """scikit-learn's 1797 real 8x8 digits, scaled to [0, 1], split by a fixed permutation."""

    input_shape = (1, 8, 8)
    num_classes = 10

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0,
                 partition: str = "iid", alpha: float = 1.0):
        super().__init__(batch_size, num_workers, partition, alpha, seed)
        self.val_fraction = val_fraction
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, *self.input_shape)
        y = torch.tensor(y, dtype=torch.long)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_val = int(len(y) * self.val_fraction)
        self.val = TensorDataset(x[order[:n_val]], y[order[:n_val]])
        self.train = TensorDataset(x[order[n_val:]], y[order[n_val:]])


class SyntheticData(_TensorData):
    """Gaussian classes of any shape and size: class ``k`` is a fixed random pattern plus noise.

    Learnable (accuracy means something), generated from ``seed`` on every rank alike, and as
    large as you ask, for speed and scale runs without a data set on disk. For image shapes
    (``(H, W)`` or ``(C, H, W)``) the patterns are smooth, as in real images: one random value
    per ``cell`` x ``cell`` block, bilinearly upsampled and rescaled to unit variance. With
    independent pixels (``cell=1``, what this data was before) there is no spatial structure for
    convolutions and pooling to use: the small CNN stays at chance at the app's learning rate
    (0.05) and learns only at a lower one (0.01).
    """

    def __init__(
        self,
        shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        train_size: int = 4096,
        val_size: int = 1024,
        noise: float = 2.0,
        cell: int = 4,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
        partition: str = "iid",
        alpha: float = 1.0,
    ):
        super().__init__(batch_size, num_workers, partition, alpha, seed)
        self.input_shape = tuple(int(n) for n in shape)
        self.num_classes = num_classes
        for name, value in (("train_size", train_size), ("val_size", val_size), ("num_classes", num_classes)):
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1 (got {value}).")
        if cell < 1:
            raise ValueError(f"data.cell must be >= 1 (got {cell}).")
        self.sizes = (train_size, val_size)
        self.noise = noise
        self.cell = cell
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        patterns = self._patterns(generator)
        splits = []
        for size in self.sizes:
            y = torch.randint(self.num_classes, (size,), generator=generator)
            x = patterns[y] + self.noise * torch.randn(size, *self.input_shape, generator=generator)
            splits.append(TensorDataset(x, y))
        self.train, self.val = splits

    def _patterns(self, generator: torch.Generator) -> torch.Tensor:
        shape = self.input_shape
        if len(shape) < 2 or self.cell == 1:
            return torch.randn(self.num_classes, *shape, generator=generator)
        height, width = shape[-2:]
        coarse = torch.randn(self.num_classes, math.prod(shape[:-2]), -(-height // self.cell), -(-width // self.cell),
                             generator=generator)
        smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        smooth = smooth / smooth.std().clamp_min(1e-6)
        return smooth.reshape(self.num_classes, *shape)


_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


class _Augmented(Dataset):
    """Random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip (torch's RNG)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = torch.nn.functional.pad(self.images[index], (4, 4, 4, 4))
        top, left = torch.randint(9, (2,)).tolist()
        image = image[:, top : top + 32, left : left + 32]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image, self.labels[index]


class CIFAR10Folder(_TensorData):
    """CIFAR-10 read from the python version of the data set in a local folder (never downloaded).

    ``root`` must contain ``cifar-10-batches-py/`` (or be it), with ``data_batch_1`` ..
    ``data_batch_5`` and ``test_batch``.
    """

    input_shape = (3, 32, 32)
    num_classes = 10
    _FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

    def __init__(self, root: str, batch_size: int = 32, augment: bool = True, num_workers: int = 0,
                 partition: str = "iid", alpha: float = 1.0, seed: int = 0):
        super().__init__(batch_size, num_workers, partition, alpha, seed)
        folder = Path(root).expanduser()
        if (folder / "cifar-10-batches-py").is_dir():
            folder = folder / "cifar-10-batches-py"
        missing = [name for name in self._FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"data.root={root!r} has no CIFAR-10 (missing {', '.join(missing)}): point data.root at a folder"
                " holding cifar-10-batches-py/ from the python version of the data set; nothing is downloaded."
            )
        self.folder = folder
        self.augment = augment

    def _read(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            with open(self.folder / name, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            images.append(torch.as_tensor(batch[b"data"]).reshape(-1, 3, 32, 32))
            labels.append(torch.as_tensor(batch[b"labels"]))
        x = (torch.cat(images).float() / 255.0 - _CIFAR_MEAN) / _CIFAR_STD
        return x, torch.cat(labels).long()

    def setup(self, stage: str | None = None) -> None:
        x, y = self._read(self._FILES[:5])
        self.train = _Augmented(x, y) if self.augment else TensorDataset(x, y)
        self.val = TensorDataset(*self._read(self._FILES[5:]))
