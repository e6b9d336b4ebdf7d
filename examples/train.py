"""Train with DRACO from a Hydra config: ``python examples/train.py code=frc attack=reverse``.

Every run writes ``summary.json`` into its run directory: the resolved config, the world size,
validation accuracy per epoch, who was caught, steps, skipped steps, wall seconds and
``param_sha256`` (SHA-256 of the floating-point ``state_dict`` entries, in order, as float32
little-endian bytes), so two runs can be compared for identity from the shell.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

from digits import DigitsData, DigitsMLP  # noqa: E402

from lightning_draco import Adversary, DracoStrategy  # noqa: E402


def param_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in module.state_dict().values():
        if value.is_floating_point():
            digest.update(value.detach().cpu().to(torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return digest.hexdigest()


class EpochAccuracy(Callback):
    def __init__(self) -> None:
        self.val_acc: list[float] = []

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and "val_acc" in trainer.callback_metrics:
            self.val_acc.append(float(trainer.callback_metrics["val_acc"]))


def build_strategy(cfg: DictConfig) -> DracoStrategy:
    code, attack = cfg.code, cfg.attack
    adversary = None
    if attack.name != "none":
        ranks = attack.ranks if isinstance(attack.ranks, str) else list(attack.ranks)
        adversary = Adversary(ranks=ranks, attack=attack.name, seed=attack.seed, **attack.options)
    aggregator = cfg.aggregator
    return DracoStrategy(
        aggregator=aggregator.name,
        aggregator_options={"num_byzantine": aggregator.num_byzantine, **aggregator.options},
        aggregate_over=aggregator.over,
        code=code.name,
        num_adversaries=code.num_adversaries,
        redundancy=code.redundancy,
        ps_rank=code.ps_rank,
        adversary=adversary,
        tolerance=code.tolerance,
        on_decode_failure=code.on_decode_failure,
        max_faulty_steps=code.max_faulty_steps,
        seed=cfg.seed,
        bucket_cap_mb=code.bucket_cap_mb,
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    torch.set_num_threads(cfg.threads_per_rank)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    strategy = build_strategy(cfg)  # refuses bad settings before any process starts
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    accuracy = EpochAccuracy()
    trainer = L.Trainer(
        strategy=strategy,
        default_root_dir=str(run_dir),
        callbacks=[accuracy],
        **OmegaConf.to_container(cfg.trainer, resolve=True),
    )
    model = DigitsMLP(cfg.model.hidden, cfg.model.dropout, cfg.optimizer.lr, cfg.optimizer.momentum)
    data = DigitsData(cfg.data.batch_size, cfg.data.val_fraction, seed=cfg.seed)
    start = time.perf_counter()
    trainer.fit(model, data)
    wall = time.perf_counter() - start
    if trainer.global_rank == 0:
        summary = {
            "config": OmegaConf.to_container(cfg, resolve=True),
            "world_size": trainer.world_size,
            "val_acc_per_epoch": accuracy.val_acc,
            "final_val_acc": accuracy.val_acc[-1] if accuracy.val_acc else None,
            "faulty_counts": {str(k): v for k, v in strategy.faulty_counts.items()},
            "optimizer_steps": trainer.global_step,
            "skipped_steps": strategy.skipped_steps,
            "wall_seconds": round(wall, 3),
            "param_sha256": param_sha256(model),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        caught = ", ".join(f"rank {r}: {n} steps" for r, n in summary["faulty_counts"].items()) or "nobody"
        print(
            f"\nDRACO ({cfg.code.name}, s={cfg.code.num_adversaries}) on {trainer.world_size} ranks, attack"
            f" {cfg.attack.name!r} on ranks {cfg.attack.ranks}: caught {caught}; final validation accuracy"
            f" {summary['final_val_acc']:.3f}; {summary['optimizer_steps']} steps in {wall:.1f} s."
            f"\nSummary: {run_dir / 'summary.json'}"
        )
    return accuracy.val_acc[-1] if accuracy.val_acc else 0.0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    main()
