"""Train with DRACO from a Hydra config: ``python examples/train.py code=crc attack=alie``.

Launch it as it is (Lightning starts ``trainer.devices`` local processes), under ``torchrun``, or
under ``srun`` (``examples/slurm/train.sbatch``); ``-m`` sweeps run each job as its own launch.

Every run writes ``summary.json`` into its run directory: the resolved config, the world size,
validation accuracy per epoch, who was caught, steps, skipped steps, reactive mode's escalations
(steps and groups recomputed and voted; 0 in full mode), wall seconds (from the launch) and training seconds
(the fit loop alone: compare defences on these), and
``param_sha256`` (SHA-256 of the floating-point ``state_dict`` entries, in order, as float32
little-endian bytes), so two runs can be compared for identity from the shell.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Optional

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

EXAMPLES = str(Path(__file__).resolve().parent)
sys.path.insert(0, EXAMPLES)
# Processes started from here (submitit's tasks unpickling this app) import the example modules too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (EXAMPLES, os.environ.get("PYTHONPATH")) if p)

from models import Classifier, use_tf32  # noqa: E402

from lightning_draco import Adversary, DracoStrategy, IncompatibleCheckpointError  # noqa: E402


def draco_run_id() -> str:
    """The job's id where a launcher gives one (every rank and every restart agree), else the start time."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"slurm-{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    if "SLURM_JOB_ID" in os.environ and SLURMEnvironment.detect():
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun-{os.environ['TORCHELASTIC_RUN_ID']}"
    return datetime.now().strftime("%Y-%m-%d/%H-%M-%S")


def unshared_run_id(run_dir: Path) -> Optional[str]:
    """Why ``run_dir`` cannot be this job's own (None: it can).

    torchrun without ``--rdzv-id`` and without ``--standalone`` (a static rendezvous at ``--master-addr``/
    ``--master-port``) gives every job the run id ``none``: every such job would find the directory
    ``outputs/torchrun-none`` and, with ``resume=auto``, continue the previous job's checkpoint.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID") == "none" and run_dir.name == "torchrun-none":
        return (
            "torchrun gave this job no id of its own (its default --rdzv-id=none), so every such job would share the"
            f" run directory {run_dir} and resume=auto would continue an earlier job's checkpoint there: pass"
            " --rdzv-id=<a name for this job> to torchrun, or hydra.run.dir=<a directory for this job>."
        )
    return None


# Cached: Lightning's launcher reads hydra.run.dir again later, and must see the same directory.
OmegaConf.register_new_resolver("draco_run_id", draco_run_id, use_cache=True, replace=True)


def param_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in module.state_dict().values():
        if value.is_floating_point():
            digest.update(value.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


# What one experiment is: a run directory's checkpoint is resumed only under the same values of these
# (the library itself checks only the world size, the code, s and r). max_steps, max_epochs, loggers,
# timeouts and the like may change between a run and its resume.
EXPERIMENT_KEYS = ("seed", "code", "attack", "aggregator", "model", "data", "optimizer", "decode", "overlap",
                   "trainer.precision", "trainer.accumulate_grad_batches", "trainer.devices", "trainer.num_nodes")
# Another world size is refused by the library itself, in its own sentence, once the ranks have started (``world_of``);
# the same world may be spelled differently (devices=6, or devices=3 on num_nodes=2).
WORLD_KEYS = ("trainer.devices", "trainer.num_nodes")
# What a run does about the liars it catches, and how it loads data: a resume may change them (a run stopped by
# max_faulty_steps goes on under a higher limit).
NOT_EXPERIMENT = ("data.num_workers", "code.max_faulty_steps", "code.on_decode_failure", "code.quarantine_after")


def experiment(cfg: DictConfig) -> dict[str, Any]:
    """The resolved values of EXPERIMENT_KEYS, flattened to dotted keys (``aggregator.name``: ``'krum'``)."""
    flat: dict[str, Any] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, dict):
            for name, item in value.items():
                walk(f"{key}.{name}", item)
        elif key not in NOT_EXPERIMENT:
            flat[key] = value

    for key in EXPERIMENT_KEYS:
        node = OmegaConf.select(cfg, key, default=None)
        walk(key, OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node)
    return flat


def world_of(values: dict[str, Any]) -> Optional[int]:
    """The world size ``experiment`` values give, where they spell it as numbers (not ``devices=auto``)."""
    devices, nodes = values.get("trainer.devices"), values.get("trainer.num_nodes", 1)
    return devices * nodes if isinstance(devices, int) and isinstance(nodes, int) else None


def saved_experiment(checkpoint: str) -> Optional[dict[str, Any]]:
    """The experiment a checkpoint of this app was trained under (None: unreadable, or written before it was kept)."""
    try:
        try:
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError:  # not a zip archive: mmap needs one
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception:
        return None
    state = (saved.get("callbacks") or {}).get(RunRecord.__qualname__) if isinstance(saved, dict) else None
    return state.get("experiment") if isinstance(state, dict) else None


def model_values(module: torch.nn.Module) -> torch.Tensor:
    """The floating-point ``state_dict`` entries that ``param_sha256`` hashes (parameters and buffers), as one
    float64 vector: exact for float64 and every narrower dtype, where ``param_sha256``'s float32 is not."""
    values = [value.detach().cpu().to(torch.float64).flatten()
              for value in module.state_dict().values() if value.is_floating_point()]
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def compared_to_clean(values: torch.Tensor, clean: torch.Tensor) -> dict[str, Any]:
    """``identical_to_clean`` (bit for bit, in the model's own dtype) and ``relative_distance_to_clean``.

    Not from ``param_sha256``: it hashes float32 values, and a float64 model 4e-17 away from the clean one
    hashes the same.
    """
    if values.shape != clean.shape:
        return {"identical_to_clean": False, "relative_distance_to_clean": float("nan")}
    return {
        "identical_to_clean": torch.equal(values.view(torch.int64), clean.view(torch.int64)),
        "relative_distance_to_clean": float((values - clean).norm() / clean.norm().clamp_min(1e-300)),
    }


class RunRecord(Callback):
    """Validation accuracy per epoch, the step of the last validation, the step the fit started from
    (> 0 after a resume), and, in checkpoints, the experiment (``experiment(cfg)``) they belong to."""

    def __init__(self, experiment: Optional[dict[str, Any]] = None) -> None:
        self.val_acc: list[float] = []
        self.validated_at: Optional[int] = None
        # None until training starts: a fit resumed at its end (max_steps already reached) trains nothing,
        # and Lightning then calls no on_train_start.
        self.start_step: Optional[int] = None
        self.experiment = experiment
        self.train_seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.start_step = trainer.global_step
        self._started: Optional[float] = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        # The fit loop only: wall_seconds also counts starting the ranks, the rendezvous and the sanity check,
        # which on a few short steps can be most of it and vary from run to run.
        started = getattr(self, "_started", None)
        self.train_seconds = time.perf_counter() - started if started is not None else 0.0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.validated_at = trainer.global_step
            if trainer.state.fn == "fit":
                self.val_acc.append(float(trainer.callback_metrics["val_acc"]))

    def state_dict(self) -> dict:
        return {"val_acc": list(self.val_acc), "experiment": self.experiment}

    def load_state_dict(self, state_dict: dict) -> None:
        self.val_acc = list(state_dict["val_acc"])


def started_at(record: RunRecord, trainer: L.Trainer) -> int:
    """The step a fit started from; a fit resumed at its end trains nothing and calls no on_train_start, so
    it started where it ended."""
    return trainer.global_step if record.start_step is None else record.start_step


def build_strategy(cfg: DictConfig, with_adversary: bool = True, num_classes: Optional[int] = None) -> DracoStrategy:
    """The strategy ``cfg`` asks for; ``num_classes`` (the data set's) fills an attack's ``num_classes: null``."""
    code, attack, aggregator = cfg.code, cfg.attack, cfg.aggregator
    if not aggregator.name and aggregator.options:
        raise ValueError(
            f"aggregator.options ({', '.join(aggregator.options)}) need a rule: set aggregator=<name> (there is none)."
        )
    adversary = None
    if with_adversary and attack.name != "none":
        ranks = attack.ranks if isinstance(attack.ranks, str) else list(attack.ranks)
        options = OmegaConf.to_container(attack.options, resolve=True)
        if "num_classes" in options and options["num_classes"] is None:
            options["num_classes"] = num_classes
        adversary = Adversary(ranks=ranks, attack=attack.name, seed=attack.seed, count=attack.get("count"), **options)
    return DracoStrategy(
        aggregator=aggregator.name,
        aggregator_options=(
            {"num_byzantine": aggregator.num_byzantine, **aggregator.options} if aggregator.name else None
        ),
        aggregate_over=aggregator.over,
        pre_aggregators=OmegaConf.to_container(aggregator.pre) if aggregator.get("pre") else None,
        code=code.name,
        num_adversaries=code.num_adversaries,
        redundancy=code.redundancy,
        ps_rank=code.ps_rank,
        adversary=adversary,
        tolerance=code.tolerance,
        on_decode_failure=code.on_decode_failure,
        max_faulty_steps=code.max_faulty_steps,
        projection_secret=code.projection_secret,
        redundancy_mode=code.get("redundancy_mode", "full"),
        quarantine_after=code.get("quarantine_after"),
        seed=cfg.seed,
        timeout=timedelta(seconds=cfg.timeout_s),
        startup_timeout=cfg.get("startup_timeout_s"),
        decode=cfg.get("decode", "ps"),
        overlap=bool(cfg.get("overlap", False)),
        bucket_cap_mb=code.bucket_cap_mb,
        **{key: value for key, value in (cfg.get("ddp") or {}).items() if value is not None},
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    for name in cfg.loggers:
        if name == "csv":
            loggers.append(CSVLogger(run_dir, name="logs"))
        elif name == "tensorboard":
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                loggers.append(TensorBoardLogger(run_dir, name="tensorboard"))
        else:
            raise ValueError(f"loggers: unknown logger {name!r}; the choices are csv and tensorboard.")
    return loggers


def resume_path(cfg: DictConfig, run_dir: Path) -> Optional[str]:
    """The newest checkpoint in this run's directory: SLURM's requeue checkpoint or last.ckpt."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        raise ValueError(f"resume must be 'auto' or 'never' (got {cfg.resume!r}).")
    found = glob.glob(str(run_dir / "hpc_ckpt_*.ckpt")) + glob.glob(str(run_dir / "checkpoints" / "last.ckpt"))
    if not found:
        return None
    newest = max(found, key=os.path.getmtime)
    saved, now = saved_experiment(newest), experiment(cfg)
    # Another world size is left to the library, which refuses it in its own sentence once the ranks start.
    if saved is not None and world_of(saved) in (None, world_of(now)):
        # A key only one side has is a version's difference, not the user's.
        changed = [key for key in sorted(saved.keys() & now.keys()) if saved[key] != now[key] and key not in WORLD_KEYS]
        if changed:
            # Resumed, it would report the other experiment's model under this one's name.
            differences = "; ".join(f"{key}={saved.get(key)!r} there, {now.get(key)!r} now" for key in changed[:4])
            more = f" (and {len(changed) - 4} more)" if len(changed) > 4 else ""
            raise ValueError(
                f"resume=auto would continue {newest}, a checkpoint of another experiment: {differences}{more}."
                " A run directory is resumed only under the same seed, code, attack, aggregator, model, data,"
                " optimizer and precision; set resume=never to start afresh there, or use another run directory"
                " (hydra.run.dir=...)."
            )
    return newest


def fit(cfg: DictConfig, run_dir: Path, with_adversary: bool = True, comparison: bool = False) -> dict[str, Any]:
    """One training run; returns what goes into summary.json (the same on every rank).

    ``comparison``: the adversary-free run of ``compare_clean``, which keeps no checkpoints or logs.
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    try:
        data = instantiate(cfg.data)
        strategy = build_strategy(cfg, with_adversary, num_classes=data.num_classes)
        net = instantiate(cfg.model, input_shape=data.input_shape, num_classes=data.num_classes)
        model = Classifier(net, data.num_classes, **cfg.optimizer)
        record = RunRecord(experiment(cfg))
        options = OmegaConf.to_container(cfg.trainer, resolve=True)
        callbacks: list[Callback] = [record]
        if comparison:
            options.update(enable_checkpointing=False, logger=False)
        else:
            callbacks.append(ModelCheckpoint(
                dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0, enable_version_counter=False,
                every_n_train_steps=cfg.checkpoint.every_n_train_steps,
            ))
            options.setdefault("logger", build_loggers(cfg, run_dir))
        trainer = L.Trainer(strategy=strategy, default_root_dir=str(run_dir), callbacks=callbacks, **options)
        ckpt_path = None if comparison else resume_path(cfg, run_dir)
    except (ValueError, FileNotFoundError, InstantiationException) as error:
        # A broken rule, refused before any process starts, in the library's own sentence.
        sys.exit(f"configuration error: {error.__cause__ if isinstance(error, InstantiationException) else error}")
    start = time.perf_counter()
    try:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    except IncompatibleCheckpointError as error:  # every rank refuses the same checkpoint
        sys.exit(f"configuration error: {error} (resume=never starts afresh; or use another run directory)")
    except ValueError as error:
        if torch.distributed.is_initialized():
            raise
        # Refused by the strategy before any process started (the model's gradient dtype, say).
        sys.exit(f"configuration error: {error}")
    start_step = started_at(record, trainer)
    result = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "val_acc_per_epoch": record.val_acc,
        "final_val_acc": record.val_acc[-1] if record.val_acc else None,
        "faulty_counts": {str(k): v for k, v in sorted(strategy.faulty_counts.items())},
        # With hosts, and kept across a requeue onto other nodes (where faulty_counts drops the node that lied).
        "caught": strategy.ledger.caught(),
        "quarantined": sorted(strategy.quarantined),
        "optimizer_steps": trainer.global_step,
        "skipped_steps": strategy.skipped_steps,
        "escalations": {k: v for k, v in strategy.escalation_stats.items() if k in ("steps", "groups")},
        "resumed_from_step": start_step,
        "resumed_from": ckpt_path,
        "wall_seconds": round(time.perf_counter() - start, 3),
        "train_seconds": round(record.train_seconds, 3),
        "param_sha256": param_sha256(model),
        "_values": model_values(model),
    }
    # Also after a fit resumed at its end, which validated nothing: its final accuracy is still the final model's.
    stopped_between = record.validated_at != trainer.global_step and trainer.global_step > 0
    if stopped_between and trainer.limit_val_batches:
        # The run stopped between validations (max_steps inside an epoch, or max_faulty_steps): the final
        # accuracy is the final model's, as param_sha256 is. Validating sets the strategy up anew, so it
        # comes after the strategy's counts are read.
        with warnings.catch_warnings():
            # Validation inside fit shards the data the same way; Lightning warns of it only here.
            warnings.filterwarnings("ignore", message="Using `DistributedSampler` with the dataloaders")
            validated = trainer.validate(model, data, verbose=False)
        if validated and "val_acc" in validated[0]:
            result["final_val_acc"] = float(validated[0]["val_acc"])
    return result


def train(cfg: DictConfig) -> float:
    torch.set_num_threads(cfg.threads_per_rank)
    if cfg.get("tf32") is not None:  # None keeps PyTorch's defaults: cuDNN convolutions in TF32, matmuls not
        use_tf32(bool(cfg.tf32))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = fit(cfg, run_dir)
    values = result.pop("_values")
    if cfg.compare_clean:
        clean = fit(cfg, run_dir / "clean", with_adversary=False, comparison=True)
        result["clean_param_sha256"] = clean["param_sha256"]
        result.update(compared_to_clean(values, clean.pop("_values")))
    if result.pop("rank") == 0:
        summary = {"config": OmegaConf.to_container(cfg, resolve=True), **result}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(report(cfg, summary, run_dir))
    if torch.distributed.is_initialized():
        # Leave the process group together. Left to interpreter exit, its threads can abort a rank
        # during shutdown ("terminate called without an active exception"), and srun then fails the job.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result["final_val_acc"] or 0.0


def caught_line(row: dict) -> str:
    """One caught rank of the summary, with the host it lied on (the node to check for a hardware fault)."""
    where = f" on host {row['host']}" + (" before a resume" if row["before_resume"] else "")
    return f"rank {row['rank']}{where} at {row['times_caught']} steps"


def report(cfg: DictConfig, summary: dict, run_dir: Path) -> str:
    caught = ", ".join(caught_line(row) for row in summary["caught"]) if "caught" in summary else ", ".join(
        f"rank {r} at {n} steps" for r, n in summary["faulty_counts"].items())
    # Without a code no vote takes place: plain averaging and robust rules name no one, liars or not.
    caught = caught or ("nobody" if cfg.code.name != "none" else "no one can be (code=none names no liar)")
    liars = "no adversary" if cfg.attack.name == "none" else f"attack {cfg.attack.name!r} on ranks {cfg.attack.ranks}"
    accuracy = "n/a (no validation yet)" if summary["final_val_acc"] is None else f"{summary['final_val_acc']:.3f}"
    if cfg.aggregator.name is None:
        defence = f"code={cfg.code.name} s={cfg.code.num_adversaries}"
    else:
        pre = "".join(f"{p if isinstance(p, str) else p['name']} + " for p in (cfg.aggregator.get("pre") or []))
        over = "each bucket" if cfg.aggregator.over == "bucket" else "the whole step"
        defence = f"code={cfg.code.name}, aggregator {pre}{cfg.aggregator.name} (f={cfg.aggregator.num_byzantine}, over {over})"
    lines = [
        "",
        f"DRACO {defence} on {summary['world_size']} ranks, {liars}.",
        f"  caught: {caught}; skipped steps: {summary['skipped_steps']}"
        + (f"; quarantined: ranks {summary['quarantined']}" if summary.get("quarantined") else ""),
        f"  final validation accuracy {accuracy} after {summary['optimizer_steps']} steps"
        f" ({summary['wall_seconds']:.1f} s"
        + (f", of which {summary['train_seconds']:.1f} s training)" if "train_seconds" in summary else ")")
        + (f"; resumed at step {summary['resumed_from_step']}" if summary.get("resumed_from_step") else ""),
    ]
    if "identical_to_clean" in summary:
        if summary["identical_to_clean"]:
            verdict = "IDENTICAL to"
        else:
            verdict = f"DIFFERENT (relative distance {summary['relative_distance_to_clean']:.1e}) from"
        same_hash = ", the clean run's too: it hashes float32 values" if (
            not summary["identical_to_clean"] and summary.get("clean_param_sha256") == summary["param_sha256"]) else ""
        lines.append(
            f"  model {verdict} the adversary-free run (param_sha256 {summary['param_sha256'][:16]}...{same_hash})"
        )
    lines.append(f"  summary: {run_dir / 'summary.json'}")
    return "\n".join(lines)


def sweep_command(hydra_cfg: DictConfig) -> list[str]:
    """The single run of one sweep job: its overrides, and where its configs come from.

    The config directories go along (``--config-path``, ``--config-dir``, ``hydra.searchpath``): without them
    the job composed its config from ``conf/`` alone, and an option found only in the user's directory
    (``model=tiny`` from ``--config-dir``) failed in the sweep although the same single run worked.
    """
    run_dir = Path(hydra_cfg.runtime.output_dir)
    sources = hydra_cfg.runtime.get("config_sources") or []
    paths = [f"--config-path={source.path}" for source in sources
             if source.provider == "main" and source.schema == "file"]
    dirs = [f"--config-dir={source.path}" for source in sources
            if source.provider == "command-line" and source.schema == "file"]
    searchpath = [o for o in hydra_cfg.overrides.get("hydra") or [] if o.lstrip("+~").startswith("hydra.searchpath")]
    return [
        sys.executable, str(Path(__file__).resolve()), *paths[:1], *dirs, f"--config-name={hydra_cfg.job.config_name}",
        *hydra_cfg.overrides.task, *searchpath, f"hydra.run.dir={run_dir}", "hydra.output_subdir=null",
    ]


def sweep_job(cfg: DictConfig) -> float:
    """One job of a ``-m`` sweep, launched on its own so Lightning's launcher starts its ranks.

    Lightning's launcher restarts the script for each local rank and cannot do that from inside a
    Hydra sweep; a fresh single run with this job's overrides, in this job's directory, can.
    """
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    done = subprocess.run(sweep_command(hydra_cfg), cwd=hydra.utils.get_original_cwd())
    if done.returncode != 0:
        raise RuntimeError(
            f"sweep job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)}) exited with {done.returncode}"
        )
    return json.loads((run_dir / "summary.json").read_text())["final_val_acc"] or 0.0


def launched_externally() -> bool:
    return TorchElasticEnvironment.detect() or SLURMEnvironment.detect()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        sys.exit(f"configuration error: missing mandatory value: {', '.join(missing)} (set it: {missing[0]}=...)")
    if HydraConfig.get().mode == RunMode.MULTIRUN and not launched_externally():
        return sweep_job(cfg)
    problem = unshared_run_id(Path(HydraConfig.get().runtime.output_dir))
    if problem:
        sys.exit(f"configuration error: {problem}")
    return train(cfg)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    main()
