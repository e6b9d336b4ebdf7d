"""A skipped step moves nothing: neither the optimizer nor the schedulers that step per batch."""

from __future__ import annotations

from typing import Any, Callable, Optional

from lightning_draco._compat import guard_lr_scheduler_step

__all__ = ["SkipGuard"]


class SkipGuard:
    """Holds whether the current optimizer step is skipped (``on_decode_failure="skip"``), and keeps
    per-step schedulers still at such a step.

    Args:
        steps_per_batch: whether a scheduler steps every batch (``interval="step"``); epoch
            schedulers are left alone, as a skipped batch does not skip an epoch.
    """

    def __init__(self, steps_per_batch: Callable[[Any], bool]):
        self.steps_per_batch = steps_per_batch
        #: Whether the current step's optimizer and per-step scheduler steps are skipped.
        self.skipping = False
        self._remove: Optional[Callable[[], None]] = None

    def install(self, module: Any) -> None:
        self.uninstall()
        self._remove = guard_lr_scheduler_step(module, lambda scheduler: self.skipping and self.steps_per_batch(scheduler))

    def uninstall(self) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None
