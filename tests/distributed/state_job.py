"""A multi-rank job for the tests of state that must survive a resume, and of reactive mode's precision.

Usage: python state_job.py OUT.jsonl SCENARIO [SCENARIO ...]

Each scenario is one of two kinds, on the digits classifier of ``digits_job.py`` (six ranks, one fork
of the ranks per job, as there):

- ``resume=True``: an uninterrupted fit of ``steps`` steps, a fit stopped after ``stop`` steps that
  checkpoints (every step, or at each epoch's end), and a fresh strategy resuming the stopped fit
  from its last checkpoint to ``steps``. Rank 0 records the three models' digests and who each
  full-length fit caught.
- otherwise: one fit of ``steps`` steps; rank 0 records the model's digest, who was caught, the
  escalations, the loss scale and any error every rank raised.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from digits_job import classifier, digits, main, param_digest, strategy_for  # noqa: E402
from scenarios import RESUMED, Scenario  # noqa: E402

from lightning_draco import DracoDecodeError, NonFiniteGradientError  # noqa: E402


@dataclass(frozen=True)
class StateScenario(Scenario):
    """A digits-job scenario (read by ``digits_job``'s ``classifier`` and ``strategy_for``) with what this job adds:
    the stopped fit's length, its checkpoints, and the GradScaler's first scale."""

    steps: int = RESUMED
    #: resume: the interrupted fit's steps (16 batches make an epoch on six ranks)
    stop: int = RESUMED // 2
    #: resume: "steps" (a checkpoint after every step) or "epochs" (one at each epoch's end)
    checkpoint: str = "steps"
    #: precision "16-mixed": the GradScaler's first scale (2**19 overflows this classifier's first steps)
    init_scale: float = 2.0**16


def lie_from_step_12(honest, *, step):
    """A liar that turns only after the resume (the interrupted fits stop at step 10)."""
    return -100 * honest if step >= 12 else honest.clone()


def lie_on_steps_2_and_13(honest, *, step):
    """A liar that lies only now and then (a fit stopped at step 10 resumes between the two)."""
    return -100 * honest if step in (2, 13) else honest.clone()


REACTIVE = dict(redundancy_mode="reactive")
CLIP = dict(code="none", aggregator="centered_clipping", num_adversaries=1, aggregator_options={"tau": 0.5})
#: A PS on rank 3: its state goes to the ``.ps`` sidecar, not into rank 0's checkpoint.
PS3 = dict(ps_rank=3)
LIAR_5 = dict(ranks=[5], seed=5)

SCENARIOS: dict[str, StateScenario] = {
    # Centred clipping's anchor across a resume: under accumulation, at an epoch's end, behind a pre-aggregator,
    # against a liar that searches its factor against the rule.
    "clip_acc2_ps3": StateScenario(resume=True, strategy=dict(CLIP, **PS3), liars=LIAR_5, accumulate=2, stop=5),
    "clip_epoch_end_ps3": StateScenario(resume=True, strategy=dict(CLIP, **PS3), liars=LIAR_5, stop=16,
                                        checkpoint="epochs"),
    "clip_nnm_optimal_ps0": StateScenario(resume=True, liars=dict(ranks=[5], attack="optimal_alie", grid=4, refine=2),
                                          strategy=dict(CLIP, pre_aggregators=["nnm"])),
    # Bucketing draws from the PS's secret: fixed, so that the uninterrupted fit draws what the stopped one did.
    "bucketing_clip_ps3": StateScenario(resume=True, liars=LIAR_5, strategy=dict(
        CLIP, pre_aggregators=[{"name": "bucketing"}], projection_secret=11, **PS3)),
    # A liar whose lie is random (drawn per DDP bucket from the adversary's seed), which the rule lets through in part.
    "clip_gaussian_ps3": StateScenario(resume=True, strategy=dict(CLIP, **PS3),
                                       liars=dict(ranks=[5], attack="gaussian")),
    # Reactive mode across a resume: a liar that starts lying after it, one that lies now and then.
    "reactive_liar_after_resume_ps3": StateScenario(resume=True, strategy=dict(REACTIVE, **PS3),
                                                    liars=dict(ranks=[4], attack=lie_from_step_12)),
    "reactive_sometimes_epoch_end": StateScenario(resume=True, strategy=REACTIVE, stop=16, checkpoint="epochs",
                                                  liars=dict(ranks=[1], attack=lie_on_steps_2_and_13)),
    # Honest replicas that differ (non-deterministic kernels): the noise floor the votes learned resumes with the PS.
    "reactive_noise_resume_ps3": StateScenario(resume=True, module="kernel_noise", strategy=dict(REACTIVE, **PS3)),
    "reactive_bf16_resume": StateScenario(resume=True, precision="bf16-mixed", strategy=REACTIVE,
                                          liars=dict(ranks=[4], attack=lie_on_steps_2_and_13)),
    # float16 with a GradScaler whose first scale overflows: the scaler skips those steps and nobody is named.
    "reactive_fp16_overflow": StateScenario(steps=8, precision="16-mixed", init_scale=2.0**19, strategy=REACTIVE),
    "reactive_fp16_overflow_liar": StateScenario(steps=8, precision="16-mixed", init_scale=2.0**19,
                                                 strategy=REACTIVE, liars=dict(ranks=[4])),
    # The same with honest replicas that differ: the first step only (in float16 later steps' replicas of the
    # gradient of a bias before BatchNorm, rounding noise alone, differ by more than any radius).
    "reactive_fp16_overflow_noise": StateScenario(steps=1, precision="16-mixed", init_scale=2.0**19,
                                                  strategy=REACTIVE, module="kernel_noise"),
    "reactive_fp16_overflow_noise_liar": StateScenario(steps=1, precision="16-mixed", init_scale=2.0**19,
                                                       strategy=REACTIVE, module="kernel_noise", liars=dict(ranks=[4])),
    "reactive_fp16_resume": StateScenario(resume=True, precision="16-mixed", init_scale=2.0**19, strategy=REACTIVE,
                                          liars=dict(ranks=[4])),
}


def trainer_for(scenario: StateScenario, steps: int, callbacks: list) -> L.Trainer:
    precision: dict[str, Any] = {"precision": scenario.precision}
    if scenario.precision == "16-mixed":  # on the CPU Lightning would turn "16-mixed" into bf16: the plugin itself
        scaler = torch.amp.GradScaler("cpu", init_scale=scenario.init_scale, growth_interval=1000)
        precision = {"plugins": [L.pytorch.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)]}
    return L.Trainer(
        accelerator="cpu", devices=scenario.world, strategy=strategy_for(scenario), max_steps=steps, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(callbacks),
        num_sanity_val_steps=0, accumulate_grad_batches=scenario.accumulate, callbacks=callbacks, **precision,
    )


def fitted(scenario: StateScenario, steps: int, callbacks: list, ckpt_path: Optional[str] = None) -> dict:
    """One fit from the same seed; what it trained, caught and raised."""
    L.seed_everything(1234, verbose=False)
    trainer = trainer_for(scenario, steps, callbacks)
    model = classifier(scenario)
    out: dict[str, Any] = {}
    try:
        trainer.fit(model, DataLoader(digits()[0], batch_size=16, shuffle=True), ckpt_path=ckpt_path)
    except DracoDecodeError as err:
        out["error"] = {"type": "DracoDecodeError", "step": err.step, "suspects": err.suspects, "message": str(err)}
    except (ValueError, NonFiniteGradientError) as err:  # raised on every rank alike: the job goes on
        out["error"] = {"type": type(err).__name__, "message": str(err)}
    strategy = trainer.strategy
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    out.update(
        sha=param_digest(model),
        global_step=trainer.global_step,
        faulty_counts={str(k): v for k, v in getattr(strategy, "faulty_counts", {}).items()},
        skipped=getattr(strategy, "skipped_steps", None),
        escalations=getattr(strategy, "escalation_stats", None),
        scale=None if scaler is None else float(scaler.get_scale()),
    )
    return out


def checkpoints(folder: str, how: str) -> list:
    if how == "epochs":
        return [L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_epochs=1,
                                                    save_on_train_epoch_end=True)]
    return [L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1)]


def run(name: str, scenario: StateScenario) -> dict:
    if not scenario.resume:
        return {"name": name, **fitted(scenario, scenario.steps, [])}
    folder = os.path.join(os.getcwd(), name)
    for earlier in (folder, folder + "_resumed"):  # a rerun in the same folder: Lightning would number new files
        shutil.rmtree(earlier, ignore_errors=True)
    uninterrupted = fitted(scenario, scenario.steps, [])
    stopped = fitted(scenario, scenario.stop, checkpoints(folder, scenario.checkpoint))
    resumed = fitted(scenario, scenario.steps, checkpoints(folder + "_resumed", scenario.checkpoint),
                     ckpt_path=os.path.join(folder, "last.ckpt"))
    return {"name": name, "uninterrupted": uninterrupted, "stopped": stopped, "resumed": resumed}


if __name__ == "__main__":
    main(SCENARIOS, run)
