"""A multi-rank job for the distributed tests: runs named scenarios (``scenarios.py``) in one set of processes.

Usage: python digits_job.py OUT.jsonl SCENARIO [SCENARIO ...]

The job forks ranks 1..P-1 once, after its imports (``tests/forked_ranks.py``), and sets what
Lightning's popen launcher sets, so every fit finds its processes started, as the second fit of a
job under that launcher does. Every rank runs the same scenarios in the same order, each a short
fit on the digits data set with the examples' classifier. After each scenario rank 0 appends one
line to OUT.jsonl: a SHA-256 of the final parameters, the parameters themselves, validation
accuracy, the faulty counts, hook calls and any error every rank raised. A job that dies keeps the
lines of the scenarios it finished.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forked_ranks import fork_ranks, run_ranks  # noqa: E402
from models import MLP, Classifier  # noqa: E402
from scenarios import SCENARIOS, Scenario  # noqa: E402

import lightning_draco  # noqa: E402,F401  (registers "draco")
from lightning_draco import Adversary, DracoDecodeError, DracoStrategy, NonFiniteGradientError  # noqa: E402


class Scheduled(Classifier):
    """With a per-step StepLR (gamma 0.5): a skipped step must not move it."""

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Diverging(Classifier):
    """From step 3 on, every replica computes a NaN loss: the model diverged, nobody lied."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step >= 3 else loss


class Manual(Classifier):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.automatic_optimization = False


class KernelNoise(Classifier):
    """Honest ranks whose kernels round differently, as non-deterministic GPU kernels do: rank ``i``'s
    copy of every partition gradient is off by ``2e-5 (i + 1)`` (relative), far above float32's rounding."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) * (1 + 2e-5 * (self.global_rank + 1))


class Gathering(Classifier):
    """Gathers every rank's loss inside training_step (a cross-rank statistic, as contrastive losses gather)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + 0 * self.all_gather(loss.detach()).sum()


MODULES = {"plain": Classifier, "scheduled": Scheduled, "diverging": Diverging, "manual": Manual,
           "kernel_noise": KernelNoise, "gathering": Gathering}


def classifier(scenario: Scenario) -> Classifier:
    """The examples' MLP, 64 -> 32 -> 32 -> 16 -> 10: the network these tests' measurements were made on.

    Under bf16-mixed, the cyclic code's attacked and liar-free runs decode with different honest
    sets and differ by rounding (relative 4e-10 after one step here); training can amplify that.
    On this network it stays at 3e-8 after 24 steps; on the 64 -> 32 -> 32 -> 10 MLP it grew to
    6e-6 after 8 steps and 2e-3 after 24, beyond test_precision.py's 1e-5.
    """
    net = MLP((64,), 10, hidden=(32, 32, 16), dropout=scenario.dropout)
    return MODULES[scenario.module](net, 10, lr=0.05)


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    return TensorDataset(x[:1500], y[:1500]), (x[1500:], y[1500:])


def param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        if t.is_floating_point():
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def strategy_for(scenario: Scenario):
    if scenario.by_name == "ddp":
        return L.pytorch.strategies.DDPStrategy()
    if scenario.by_name:
        return scenario.by_name
    kw = dict(scenario.strategy)
    if scenario.liars is not None:
        kw["adversary"] = Adversary(**scenario.liars)
    kw.setdefault("bucket_cap_mb", 0.0005)  # several buckets even for this small model
    return DracoStrategy(**kw)


def resume(name: str, scenario: Scenario) -> dict:
    """An uninterrupted fit, then one stopped mid-epoch that a fresh strategy resumes from its last checkpoint."""
    folder = os.path.join(os.getcwd(), name)
    ps = scenario.strategy.get("ps_rank", 0)
    secrets, digests = [], []
    for attempt, steps in enumerate((scenario.steps, scenario.steps // 2, scenario.steps)):
        L.seed_everything(1234, verbose=False)
        strategy = strategy_for(scenario)
        trainer = L.Trainer(
            accelerator="cpu", devices=scenario.world, strategy=strategy, max_steps=steps, logger=False,
            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=attempt > 0,
            callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, save_last=True, every_n_train_steps=1)]
            if attempt else [],
        )
        model = classifier(scenario)
        trainer.fit(model, DataLoader(digits()[0], batch_size=16, shuffle=True),
                    ckpt_path=os.path.join(folder, "last.ckpt") if attempt == 2 else None)
        digests.append(param_digest(model))
        if attempt:
            # Only for the test: every rank learns the PS's secret after each fit.
            # The second strategy drew a fresh secret from OS entropy; loading the checkpoint restores the first.
            # (Private state: the strategy has no public property for the secret, and should not.)
            secrets.append(strategy._exchange.setup.secret if strategy.is_ps else None)
    carrier = [secrets]
    dist.broadcast_object_list(carrier, src=ps)
    ckpt = torch.load(os.path.join(folder, "last.ckpt"), weights_only=False)
    return {
        "name": name,
        "secrets": carrier[0],
        "in_checkpoint": "projection_secret" in ckpt["draco"],
        "sidecar": os.path.exists(os.path.join(folder, "last.ckpt.ps")),
        "ledger": ckpt["draco"]["ledger"],
        "world_size": ckpt["draco"]["world_size"],
        "global_step": trainer.global_step,
        "faulty_counts": {str(k): v for k, v in strategy.faulty_counts.items()},
        "sha_uninterrupted": digests[0],
        "sha_resumed": digests[2],
        "steps_per_epoch": len(trainer.train_dataloader),
        "escalations": strategy.escalation_stats,
        "quarantined": sorted(strategy.quarantined),
    }


def run(name: str, scenario: Scenario) -> dict:
    if scenario.resume:
        return resume(name, scenario)
    L.seed_everything(1234, verbose=False)
    strategy = strategy_for(scenario)
    logger = CSVLogger(os.getcwd(), name=name, version=0) if scenario.csv_logger else False
    model = classifier(scenario)
    train, (vx, vy) = digits()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=scenario.world,
        strategy=strategy,
        precision=scenario.precision,
        accumulate_grad_batches=scenario.accumulate,
        max_steps=scenario.steps,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[L.pytorch.callbacks.GradientAccumulationScheduler(scenario.accumulation_schedule)]
        if scenario.accumulation_schedule else None,
    )
    out = {"name": name}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, DataLoader(train, batch_size=16, shuffle=True))
        out["warned"] = sorted({str(w.message)[:300] for w in caught})
    except DracoDecodeError as err:
        out["error"] = {"type": "DracoDecodeError", "step": err.step, "bucket": err.bucket, "suspects": err.suspects,
                        "message": str(err)}
    except (ValueError, NonFiniteGradientError) as err:  # raised on every rank alike: the job goes on
        out["error"] = {"type": type(err).__name__, "message": str(err)}
    strategy = trainer.strategy
    model.eval()
    with torch.no_grad():
        acc = float((model(vx).argmax(1) == vy).float().mean())
    out.update(
        sha=param_digest(model),
        params=[p.detach().double().flatten().tolist() for p in model.parameters()],
        running=[b.detach().double().flatten().tolist() for n, b in model.named_buffers() if "running" in n],
        finite=all(bool(torch.isfinite(p).all()) for p in model.parameters()),
        accuracy=acc,
        global_step=trainer.global_step,
        lr=[g["lr"] for g in trainer.optimizers[0].param_groups] if trainer.optimizers else None,
    )
    if isinstance(strategy, DracoStrategy):
        out.update(
            faulty_counts={str(k): v for k, v in strategy.faulty_counts.items()},
            skipped=strategy.skipped_steps,
            hook_calls=strategy.hook_calls,
            steps_decoded=strategy.ledger.steps,
            exchange_bytes=strategy.exchange_bytes,
            numel=sum(p.numel() for p in model.parameters() if p.requires_grad),
            escalations=strategy.escalation_stats,
            quarantined=sorted(strategy.quarantined),
        )
    if logger and trainer.global_rank == 0:
        with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
            rows = list(csv.DictReader(f))
        out["logged"] = {
            "columns": sorted(rows[0].keys()) if rows else [],
            "caught": [float(r["draco/caught"]) for r in rows if r.get("draco/caught")],
            "rank_5": [float(r["draco/times_caught/rank_5"]) for r in rows if r.get("draco/times_caught/rank_5")],
        }
    # Every rank reports what it saw, so tests can check that all ranks agree. A fit refused before its
    # processes start (the first of a job) made no process group: the report needs one.
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["LOCAL_RANK"]), world_size=scenario.world)
    gathered = [None] * dist.get_world_size()
    keys = ("error", "sha", "hook_calls", "skipped", "faulty_counts", "exchange_bytes", "escalations")
    dist.all_gather_object(gathered, {k: out.get(k) for k in keys})
    out["ranks"] = gathered
    return out


def run_scenarios(path: str, names: list[str], rank: int, scenarios: dict, run_one: Callable[[str, Any], dict]) -> None:
    for name in names:
        if rank == 0:
            print(f"scenario {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        result = run_one(name, scenarios[name])
        result["seconds"] = round(time.perf_counter() - started, 3)
        if rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(result) + "\n")


def main(scenarios: Optional[dict] = None, run_one: Optional[Callable[[str, Any], dict]] = None) -> None:
    """Fork the ranks of one world and run the scenarios named on the command line (by default this job's own;
    ``state_job.py`` passes its scenarios and its ``run``)."""
    scenarios, run_one = scenarios or SCENARIOS, run_one or run
    warnings.filterwarnings("ignore")
    path, names = sys.argv[1], sys.argv[2:]
    worlds = {scenarios[name].world for name in names}
    if len(worlds) != 1:
        raise SystemExit(f"one job runs on one world size; these scenarios ask for {sorted(worlds)}")
    rank, children = fork_ranks(worlds.pop())
    # What Lightning's popen launcher sets: every fit then finds its processes started.
    os.environ.update(NODE_RANK="0", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run_ranks(rank, children, lambda: run_scenarios(path, names, rank, scenarios, run_one))


if __name__ == "__main__":
    main()
