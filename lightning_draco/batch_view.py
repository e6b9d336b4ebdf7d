"""A plain batch for the hooks around a training step.

Lightning hands one object, the one ``batch_to_device`` returns, to ``on_train_batch_start``,
to ``training_step`` and to ``on_train_batch_end`` (module and callbacks alike). Under DRACO that
object is a ``PartitionBatch``, which ``DracoStrategy.training_step`` needs whole; code written for
plain batches (``x, y = batch``, ``batch["image"]``) breaks on it. While ``fit`` runs, the hooks
of the LightningModule and of every callback are wrapped so that they receive the batch of the
rank's first partition instead; the whole ``PartitionBatch`` stays reachable as
``trainer.strategy.partition_batch``.

``on_before_batch_transfer`` (of the LightningModule or the LightningDataModule) also gets the
object the loader yields, before ``batch_to_device``. Run once on the ``PartitionBatch``, it would
see no batch it was written for, and the randomness it draws (augmentation) would come from the
rank's own stream, not the partition's, so the holders of a partition would train on different
data. While ``fit`` runs it lets a ``PartitionBatch`` through unchanged; the strategy runs it on each
partition's batch, under that partition's seed, with the other transfer hooks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import lightning.pytorch as pl

from lightning_draco.data import PartitionBatch

__all__ = ["BATCH_HOOKS", "PER_PARTITION_HOOKS", "BatchHookView", "plain_batch"]

BATCH_HOOKS = ("on_train_batch_start", "on_train_batch_end")
#: Hooks the strategy runs on each partition's batch itself; given a ``PartitionBatch`` they return it as it is.
PER_PARTITION_HOOKS = ("on_before_batch_transfer",)
_ABSENT = object()


def plain_batch(batch: Any) -> Any:
    """The first partition's batch of a ``PartitionBatch``; anything else unchanged."""
    return batch.batches[0] if isinstance(batch, PartitionBatch) else batch


def _with_plain_batch(hook: Callable) -> Callable:
    # functools.wraps keeps ``__wrapped__``: Lightning's is_overridden looks through it.
    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(plain_batch(a) for a in args)
        if "batch" in kwargs:
            kwargs["batch"] = plain_batch(kwargs["batch"])
        return hook(*args, **kwargs)

    return wrapper


def _per_partition(hook: Callable) -> Callable:
    @functools.wraps(hook)
    def wrapper(batch: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(batch, PartitionBatch):
            return batch  # the strategy calls the hook again with each partition's batch
        return hook(batch, *args, **kwargs)

    return wrapper


class BatchHookView:
    """Installs and removes the wrappers on one trainer's LightningModule, LightningDataModule and callbacks."""

    def __init__(self) -> None:
        self._installed: list[tuple[Any, str, Callable, Any]] = []

    def install(self, trainer: "pl.Trainer") -> None:
        self.uninstall()
        for owner in [trainer.lightning_module, *trainer.callbacks]:
            for name in BATCH_HOOKS:
                self._wrap(owner, name, _with_plain_batch)
        datamodule = getattr(trainer, "datamodule", None)
        for owner in [trainer.lightning_module] + ([datamodule] if datamodule is not None else []):
            for name in PER_PARTITION_HOOKS:
                self._wrap(owner, name, _per_partition)

    def _wrap(self, owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
        hook = getattr(owner, name, None)
        if not callable(hook):
            return
        wrapper = wrap(hook)
        own = getattr(owner, "__dict__", {}).get(name, _ABSENT)  # a hook the user set on the instance
        try:
            setattr(owner, name, wrapper)
        except AttributeError:  # a callback with __slots__ and no __dict__: it gets the PartitionBatch
            return
        self._installed.append((owner, name, wrapper, own))

    def uninstall(self) -> None:
        for owner, name, wrapper, own in reversed(self._installed):
            if vars(owner).get(name) is not wrapper:
                continue  # replaced since: leave it
            if own is _ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._installed = []
