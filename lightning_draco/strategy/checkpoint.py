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
    """
    fit = _fit_loop(checkpoint)
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


def ps_state(secret: int, code: Code) -> dict[str, Any]:
    """The PS's state: its secret, the decoder's state, and the rule's (centred clipping's anchor)."""
    rule = getattr(code, "aggregator", None)
    return {
        "projection_secret": secret,
        "aggregator": rule.state_dict() if rule is not None else {},
        "decoder": code.state_dict(),
    }


def read_ps_state(saved: dict[str, Any], checkpoint_path: Any) -> dict[str, Any]:
    """The PS's state from the checkpoint's DRACO entry, or from the sidecar the PS wrote beside it.

    The sidecar is looked for beside the path given and beside the file it links to: Lightning's
    ``save_last="link"`` makes ``last.ckpt`` a link to a checkpoint whose sidecar has the target's name.
    Where there is none, the PS resumes without its state, and says so: a stateful rule (centred
    clipping's anchor) then trains another model than the uninterrupted run.
    """
    if "projection_secret" in saved:
        return saved
    path = os.fspath(checkpoint_path)
    candidates = [ps_sidecar(path)] if "://" in path else [ps_sidecar(path), ps_sidecar(os.path.realpath(path))]
    for sidecar in candidates:
        filesystem = get_filesystem(sidecar)
        if filesystem.exists(sidecar):
            with filesystem.open(sidecar, "rb") as f:
                return torch.load(f, weights_only=True)
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
