"""Lightning's launchers, with what DRACO adds around a launch.

- Before any process starts, the strategy refuses what every rank would refuse in ``setup``
  (``DracoStrategy.refuse_unsupported_fit``): a user sees one error in the process they ran,
  instead of a failure on every rank once all of them have started.
- Spawned and forked ranks (``start_method="spawn"`` or ``"fork"``): Lightning's multiprocessing
  launcher hands the main process only rank 0's weights, trainer state and logged metrics.
  DRACO's own results (who was caught and when, skipped steps, reactive mode's escalations and
  quarantine, the exchange's traffic) live in the strategy, so without this a notebook would read
  ``faulty_counts == {}`` after a run that caught a liar at every step. The ledger is the same on
  every rank; the traffic is rank 0's, as the logged metrics are.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

#: The key of DRACO's results among the multiprocessing launcher's extra results.
RESULTS = "draco_results"


class _RefusesBeforeLaunch:
    """Runs ``DracoStrategy.refuse_unsupported_fit`` before the launcher it is mixed into starts a process."""

    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        if trainer is not None:
            trainer.strategy.refuse_unsupported_fit(trainer, launching=True)
        return super().launch(function, *args, trainer=trainer, **kwargs)  # type: ignore[misc]


class CheckedSubprocessScriptLauncher(_RefusesBeforeLaunch, _SubprocessScriptLauncher):
    """Lightning's script launcher (and the path of torchrun's and SLURM's ranks), checking the fit first."""


class ResultCarryingLauncher(_RefusesBeforeLaunch, _MultiProcessingLauncher):
    """The multiprocessing launcher, checking the fit first and carrying the strategy's results from rank 0
    to the main process."""

    @override
    def get_extra_results(self, trainer: "pl.Trainer") -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        extra[RESULTS] = trainer.strategy.results()
        return extra

    @override
    def update_main_process_results(self, trainer: "pl.Trainer", extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        trainer.strategy.load_results(extra[RESULTS])
