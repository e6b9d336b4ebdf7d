"""What DRACO adds to a checkpoint, and the parameter server's own state, which no worker may read.

Every rank's checkpoint carries the conditions a resume must match (world size, code, ``s``,
``r``: the partitions must mean the same data) and the ledger of who was caught. The PS's own
state (its projection secret, the decoder's state, a stateful rule's state) goes into rank 0's
checkpoint when the PS is rank 0, and otherwise into ``<checkpoint>.ps``, written by the PS.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem

from lightning_draco.codes import Code

__all__ = [
    "CHECKPOINT_KEY",
    "IncompatibleCheckpointError",
    "check_resumable",
    "inside_an_epoch",
    "ps_sidecar",
    "ps_state",
    "start_the_next_epoch",
    "read_ps_state",
    "restore_ps_state",
    "rewind_to_step_start",
    "write_then_rename",
]

CHECKPOINT_KEY = "draco"

_log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
    """A checkpoint written under another world size, code, ``s`` or ``r``: its partitions mean other data."""


def check_resumable(saved: dict[str, Any], conditions: dict[str, Any]) -> None:
    """Refuse a checkpoint whose conditions differ from this run's."""
    for key, value in conditions.items():
        if saved.get(key) != value:
            raise IncompatibleCheckpointError(
                f"the checkpoint was written with {key}={saved.get(key)!r} but this run has {key}={value!r};"
                " DRACO resumes only under the same world size, code, num_adversaries and redundancy."
            )


def _fit_loop(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The state of Lightning's fit loop in ``checkpoint`` (empty where it has none)."""
    return (checkpoint.get("loops") or {}).get("fit_loop") or {}


def inside_an_epoch(checkpoint: dict[str, Any]) -> bool:
    """Whether Lightning wrote ``checkpoint`` after some of an epoch's batches and before its end."""
    progress = _fit_loop(checkpoint).get("epoch_loop.batch_progress") or {}
    return bool(progress.get("current", {}).get("processed")) and not progress.get("is_last_batch", False)


def rewind_to_step_start(checkpoint: dict[str, Any]) -> None:
    """Move Lightning's batch count in ``checkpoint`` back to the start of the step it was taken in.

    A checkpoint taken between the micro-batches of one step (``accumulate_grad_batches > 1``, a
    validation inside the epoch) holds no gradient of the step's earlier micro-batches, and the training
    loader resumes at the step's first batch (``DracoDataLoader.state_dict``). Lightning counts the
    batches it has run, so it would resume later in the epoch than the loader: each later step would take
    its micro-batches one window off and the epoch would end before its last batches. Counting from the
    step's start puts both at the same batch; it is written as Lightning writes a checkpoint at the end of
    the batch before (the last of a step), so Lightning's restart counts that step once, not twice.

    A checkpoint written at an epoch's end (``on_train_epoch_end``, where ``ModelCheckpoint`` saves by
    default) is first moved to the next epoch's start (``_start_the_next_epoch``).
    """
    fit = _fit_loop(checkpoint)
    _start_the_next_epoch(fit)
    loaders = (fit.get("state_dict") or {}).get("combined_loader") or []
    positions = [s for s in loaders if isinstance(s, dict) and set(s) == {"epoch", "steps_trained"}]
    progress = fit.get("epoch_loop.batch_progress")
    epochs = fit.get("epoch_progress")
    if len(positions) != 1 or progress is None or epochs is None:
        return
    # The loader's epoch is the one the checkpoint was taken in (started, not yet completed).
    if positions[0]["epoch"] != epochs["current"]["completed"]:
        return
    behind = progress["current"]["processed"] - positions[0]["steps_trained"]
    if behind <= 0:
        return
    # There, ``completed`` lags by the batch at hand and the step is counted; the restart completes that
    # batch, counts its step again (undone here) and goes on from the step's first batch.
    for counts in (progress["current"], progress["total"]):
        counts["completed"] = counts["processed"] - behind - 1
        for key in ("ready", "started", "processed"):
            counts[key] -= behind
    stepped = fit.get("epoch_loop.state_dict") or {}
    if "_batches_that_stepped" in stepped:
        stepped["_batches_that_stepped"] -= 1


def start_the_next_epoch(checkpoint: dict[str, Any]) -> None:
    """``_start_the_next_epoch`` on a checkpoint's fit loop (also a checkpoint written without DRACO)."""
    _start_the_next_epoch(_fit_loop(checkpoint))


def _start_the_next_epoch(fit: dict[str, Any]) -> None:
    """Move Lightning's counts in a checkpoint written at an epoch's end, or after ``fit`` returned, to where
    the uninterrupted fit goes on: the next epoch's start, or the batch a fit cut inside an epoch stopped at.

    Lightning restarts from such checkpoints wrongly in a fit limited by ``max_steps``:

    - written at the epoch's end (``on_train_epoch_end``, where ``ModelCheckpoint`` saves by default:
      after the last batch, before the epoch counts as completed), or after a fit that stopped at an
      epoch's last batch (``trainer.save_checkpoint`` once ``fit`` returned), it restarts "on the epoch's
      end": it runs one more batch in the finished epoch (the first of the next epoch's order, the loaders'
      epoch being already advanced), then counts the epoch processed again, so every later epoch draws the
      order of the one after it;
    - written after a fit that ``max_steps`` cut inside an epoch, which Lightning then counts as
      completed, it goes on at the same batch of the *next* epoch.

    Either way the resumed model is not the uninterrupted one. Here the first kind is counted as the next
    epoch's start (the finished epoch completed, no batch of the next one), the second as an epoch still
    open at its batch, which Lightning resumes as it does a checkpoint written inside an epoch (tested with
    an epoch-interval learning-rate scheduler, with and without a validation at the epoch's end, and with
    gradient accumulation). With a validation at the epoch's end, Lightning's restart still counts one
    empty loop iteration: the model and data are the uninterrupted fit's, and the logger's step count is one
    ahead of it.
    """
    progress, epochs = fit.get("epoch_loop.batch_progress"), fit.get("epoch_progress")
    kinds = ("total", "current")
    if progress is None or epochs is None or any(kind not in epochs for kind in kinds):
        return
    # At the epoch's end: processed, not yet completed (a checkpoint inside the last batch has processed
    # lagging, and Lightning resumes it right).
    at_the_end = all(epochs[k]["processed"] == epochs[k]["completed"] + 1 for k in kinds)
    # After fit returned: every count equal (one written in ``on_train_epoch_start`` has processed lagging).
    after_fit = all(
        epochs[k]["ready"] == epochs[k]["started"] == epochs[k]["processed"] == epochs[k]["completed"] for k in kinds
    )
    if progress.get("is_last_batch") and (at_the_end or after_fit):
        for kind in kinds:
            epochs[kind]["completed"] = epochs[kind]["processed"]
        for key in progress["current"]:
            progress["current"][key] = 0
        progress["is_last_batch"] = False
    elif after_fit and progress["current"].get("ready", 0) > 0 and epochs["current"]["completed"] > 0:
        for kind in kinds:  # the epoch max_steps cut is open again, as in a checkpoint written inside it
            epochs[kind]["processed"] -= 1
            epochs[kind]["completed"] -= 1


def ps_state(secret: int, code: Code, global_step: Optional[int] = None) -> dict[str, Any]:
    """The PS's state: its secret, the decoder's state, and the rule's (centred clipping's anchor), at the
    optimizer step ``global_step`` (a sidecar is written apart from the checkpoint it belongs to)."""
    rule = getattr(code, "aggregator", None)
    return {
        "global_step": global_step,
        "projection_secret": secret,
        "aggregator": rule.state_dict() if rule is not None else {},
        "decoder": code.state_dict(),
    }


def read_ps_state(saved: dict[str, Any], checkpoint_path: Any, global_step: Optional[int] = None) -> dict[str, Any]:
    """The PS's state from the checkpoint's DRACO entry, or from the sidecar the PS wrote beside it.

    The sidecar is looked for beside the path given and beside the file it links to: Lightning's
    ``save_last="link"`` makes ``last.ckpt`` a link to a checkpoint whose sidecar has the target's name.
    Where there is none, or the one there was written at another step than the checkpoint's
    ``global_step`` (a process killed between the two writes, a file copied from another save), the PS
    resumes without its state, and says so: a stateful rule (centred clipping's anchor) then trains
    another model than the uninterrupted run.
    """
    if "projection_secret" in saved:
        return saved
    path = os.fspath(checkpoint_path)
    candidates = [ps_sidecar(path)] if "://" in path else [ps_sidecar(path), ps_sidecar(os.path.realpath(path))]
    for sidecar in candidates:
        filesystem = get_filesystem(sidecar)
        if filesystem.exists(sidecar):
            with filesystem.open(sidecar, "rb") as f:
                # Onto the CPU, as Lightning loads rank 0's checkpoint: the GPU the PS saved from may not be here.
                state = torch.load(f, weights_only=True, map_location="cpu")
            written_at = state.get("global_step")  # None: written before sidecars recorded their step
            if global_step is None or written_at is None or written_at == global_step:
                return state
            _log.warning(
                f"DRACO: {sidecar}, the parameter server's state, was written at step {written_at}, but {path} at"
                f" step {global_step}: the PS resumes with a fresh secret and its rule's and decoder's state reset,"
                " so a stateful rule (centred clipping) does not continue the interrupted run exactly."
            )
            return saved
    _log.warning(
        f"DRACO: {ps_sidecar(path)}, the parameter server's state written beside {path}, is missing: the PS"
        " resumes with a fresh secret and its rule's and decoder's state reset, so a stateful rule (centred"
        " clipping) does not continue the interrupted run exactly. Copy the .ps file with the checkpoint."
    )
    return saved


def restore_ps_state(state: dict[str, Any], code: Code) -> Optional[int]:
    """Load the rule's and decoder's state into ``code``; return the saved secret (``None``: none saved)."""
    rule = getattr(code, "aggregator", None)
    if rule is not None and state.get("aggregator"):
        rule.load_state_dict(state["aggregator"])
    code.load_state_dict(state.get("decoder") or {})
    secret = state.get("projection_secret")
    return None if secret is None else int(secret)


def write_then_rename(path: Any, write: Callable[[str], None]) -> None:
    """``write`` to ``<path>.partial``, then rename: a rank killed while saving leaves the previous file whole."""
    partial = os.fspath(path) + ".partial"
    write(partial)
    os.replace(partial, path)


def ps_sidecar(checkpoint_path: Any) -> str:
    return os.fspath(checkpoint_path) + ".ps"
