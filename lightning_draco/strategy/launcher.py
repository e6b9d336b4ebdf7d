"""Spawned and forked ranks (``start_method="spawn"`` or ``"fork"``): what the run saw, back in the main process.

Lightning's multiprocessing launcher runs the fit in child processes and hands the main process only
rank 0's weights, trainer state and logged metrics. DRACO's own results (who was caught and when,
skipped steps, reactive mode's escalations and quarantine, the exchange's traffic) live in the
strategy, so without this a notebook that launches by spawn or fork would read ``faulty_counts == {}``
after a run that caught a liar at every step. The ledger is the same on every rank; the traffic is
rank 0's, as the logged metrics are.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from typing_extensions import override

#: The key of DRACO's results among the launcher's extra results.
RESULTS = "draco_results"


class ResultCarryingLauncher(_MultiProcessingLauncher):
    """The multiprocessing launcher, carrying ``DracoStrategy``'s results from rank 0 to the main process."""

    @override
    def get_extra_results(self, trainer: "pl.Trainer") -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        extra[RESULTS] = trainer.strategy.results()
        return extra

    @override
    def update_main_process_results(self, trainer: "pl.Trainer", extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        trainer.strategy.load_results(extra[RESULTS])
