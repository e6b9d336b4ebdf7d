"""DRACO against robust aggregation, the paper's comparison at laptop scale.

    python benchmarks/compare.py                        # both data sets, all methods and attacks
    python benchmarks/compare.py --datasets digits --steps 40
    python benchmarks/compare.py --partition dirichlet --alpha 0.1 --attacks none alie optimal_alie --out docs/alpha0.1

Six CPU ranks (Lightning's launcher re-runs this script for ranks 1..5; every rank runs the same
sequence of fits). For each data set, each method trains the same model from the same seed on the
same batches, without attack and with one liar (rank 4) sending each attack:

    ddp       plain DDP (all-reduce), no attack only: the reference
    mean      plain averaging through DRACO's exchange (code="none")
    median, geometric_median, krum   robust rules over the 6 received gradients (f=1)
    frc       DRACO, repetition code, r=3 (s=1)
    crc1, crc2  DRACO, cyclic code, s=1 (r=3) and s=2 (r=5)

``--partition dirichlet --alpha A`` gives each partition (each rank's data under plain DDP) a class
mix drawn from Dirichlet(A) (``lightning_draco.heterogeneous``): robust rules assume honest
gradients are close, and lose accuracy under heterogeneity even without an attack; DRACO's
decode is an exact sum and does not care. ``--attacks`` also accepts ``optimal_alie``.

Data sets: scikit-learn's digits (the examples' MLP, 128 wide, without dropout), and synthetic CIFAR-sized images (3x32x32,
ten classes, class means plus noise) with a CNN of 2.1M parameters, where aggregation costs show.
Rank 0 evaluates test accuracy every ``--eval-every`` steps, outside the timed wall clock.

Writes ``--out`` (default docs/): compare.csv (method, attack, dataset, step, wall seconds, loss,
accuracy), accuracy_vs_time_<dataset>.png, step_time_<dataset>.png (per-step time split into
compute, communication, decode/aggregate on the parameter server) and benchmarks.md with the
table of time to a target accuracy and final accuracy.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from models import MLP, Classifier  # noqa: E402  (the examples' classifier, as in the app and the tests)

import lightning_draco  # noqa: E402,F401
from lightning_draco import Adversary, DracoStrategy  # noqa: E402

WORLD = 6
LIAR = 4
ATTACKS = ["none", "reverse", "constant", "alie"]
ALL_ATTACKS = ATTACKS + ["optimal_alie"]
METHODS = ["ddp", "mean", "median", "geometric_median", "krum", "frc", "crc1", "crc2"]
TARGETS = {"digits": 0.8, "synthetic": 0.6}


def digits_task():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    net = MLP((64,), 10, hidden=128, dropout=0.0)  # the app's model=mlp, wider
    return TensorDataset(x[:1400], y[:1400]), (x[1400:], y[1400:]), net, 0.1


def synthetic_task():
    gen = torch.Generator().manual_seed(0)
    means = torch.randn(10, 3, 32, 32, generator=gen) * 0.5
    labels = torch.randint(10, (3000,), generator=gen)
    images = means[labels] + torch.randn(3000, 3, 32, 32, generator=gen)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, 10),
    )
    return TensorDataset(images[:2500], labels[:2500]), (images[2500:], labels[2500:]), net, 0.01


TASKS = {"digits": digits_task, "synthetic": synthetic_task}


def strategy_for(method: str, attack: str):
    adversary = None if attack == "none" else Adversary(ranks=[LIAR], attack=attack)
    common = dict(start_method="popen", adversary=adversary)
    if method == "ddp":
        return L.pytorch.strategies.DDPStrategy(start_method="popen")
    if method == "mean":
        return DracoStrategy(code="none", num_adversaries=0, **common)
    if method in ("median", "geometric_median", "krum"):
        return DracoStrategy(code="none", num_adversaries=1, aggregator=method, **common)
    if method == "frc":
        return DracoStrategy(code="frc", num_adversaries=1, **common)
    return DracoStrategy(code="crc", num_adversaries=int(method[-1]), **common)


class Recorder(L.Callback):
    """On rank 0: wall clock of training steps only, loss, periodic test accuracy, time split."""

    def __init__(self, test, eval_every: int):
        self.test, self.eval_every = test, eval_every
        self.rows, self.wall, self.split = [], 0.0, {"compute": 0.0, "communication": 0.0, "decode": 0.0}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._start = time.perf_counter()
        strategy = trainer.strategy
        self._exchange = strategy.exchange_seconds if isinstance(strategy, DracoStrategy) else None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        elapsed = time.perf_counter() - self._start
        self.wall += elapsed
        if self._exchange is not None:
            now = trainer.strategy.exchange_seconds
            comm = now["communication"] - self._exchange["communication"]
            decode = now["decode"] - self._exchange["decode"]
        else:
            comm = decode = 0.0
        self.split["communication"] += comm
        self.split["decode"] += decode
        self.split["compute"] += elapsed - comm - decode
        step = trainer.global_step
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        accuracy = None
        if trainer.global_rank == 0 and (step % self.eval_every == 0 or step == trainer.max_steps):
            module.eval()
            with torch.no_grad():
                x, y = self.test
                accuracy = float((module(x).argmax(1) == y).float().mean())
            module.train()
        self.rows.append(
            {
                "step": step,
                "wall_seconds": round(self.wall, 4),
                "loss": loss,
                "accuracy": accuracy,
                **{f"{part}_seconds": round(value, 5) for part, value in self.split.items()},
            }
        )


def run(dataset: str, method: str, attack: str, steps: int, eval_every: int, batch: int,
        partition: str = "iid", alpha: float = 1.0):
    L.seed_everything(0, verbose=False)  # before the model is built: every method starts from the same weights
    train, test, net, lr = TASKS[dataset]()
    if partition == "dirichlet":
        from lightning_draco.heterogeneous import DirichletSampler

        # Plain DDP keeps a DistributedSampler as given: its rank must be this process's (DRACO sets each partition's).
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        sampler = DirichletSampler(train, train.tensors[1].tolist(), WORLD, alpha, rank=rank, seed=0, min_size=batch)
        loader = DataLoader(train, batch_size=batch, sampler=sampler)
    else:
        loader = DataLoader(train, batch_size=batch, shuffle=True)
    recorder = Recorder(test, eval_every)
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=strategy_for(method, attack), max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder],
    )
    trainer.fit(Classifier(net, 10, lr=lr), loader)
    return recorder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--attacks", nargs="+", default=ATTACKS, choices=ALL_ATTACKS)
    parser.add_argument("--partition", default="iid", choices=["iid", "dirichlet"],
                        help="how the training set is split between partitions")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration with --partition dirichlet")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="per partition, as one plain-DDP rank's batch")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--report-only", action="store_true", help="redo plots and page from OUT/compare.csv")
    args = parser.parse_args(argv)
    if args.report_only:
        with open(Path(args.out) / "compare.csv") as f:
            records = [_typed(row) for row in csv.DictReader(f)]
        write_report(records, Path(args.out), _command_line(Path(args.out)))
        return
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    results = []
    for dataset in args.datasets:
        for method in args.methods:
            for attack in args.attacks:
                if method == "ddp" and attack != "none":
                    continue
                recorder = run(dataset, method, attack, args.steps, args.eval_every, args.batch, args.partition, args.alpha)
                results.append((dataset, method, attack, recorder))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        partition = "iid" if args.partition == "iid" else f"dirichlet-{args.alpha:g}"
        records = [
            {"dataset": dataset, "method": method, "attack": attack, "partition": partition, **row}
            for dataset, method, attack, recorder in results
            for row in recorder.rows
        ]
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "compare.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(records)
        write_report(records, out, " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]]))


CSV_FIELDS = [
    "dataset", "method", "attack", "partition", "step", "wall_seconds", "loss", "accuracy",
    "compute_seconds", "communication_seconds", "decode_seconds",
]


def _typed(row: dict) -> dict:
    typed = dict(row)
    typed["step"] = int(row["step"])
    typed["partition"] = row.get("partition") or "iid"  # files written before the option were IID
    for key in ("wall_seconds", "loss", "compute_seconds", "communication_seconds", "decode_seconds"):
        typed[key] = float(row[key])
    typed["accuracy"] = float(row["accuracy"]) if row["accuracy"] not in ("", "None") else None
    return typed


def _command_line(out: Path) -> str:
    page = out / "benchmarks.md"
    if page.exists():
        for line in page.read_text().splitlines():
            if line.startswith("Generated by `"):
                return line.split("`")[1]
    return "python benchmarks/compare.py"


def write_report(records: list[dict], out: Path, command: str) -> None:
    """Plots and benchmarks.md from the per-step records (what compare.csv holds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def runs_of(dataset):
        keys = sorted({(r["method"], r["attack"]) for r in records if r["dataset"] == dataset},
                      key=lambda k: (METHODS.index(k[0]), ALL_ATTACKS.index(k[1])))
        return [(m, a, [r for r in records if r["dataset"] == dataset and r["method"] == m and r["attack"] == a])
                for m, a in keys]

    datasets = [d for d in TASKS if any(r["dataset"] == d for r in records)]
    attacks = [a for a in ALL_ATTACKS if any(r["attack"] == a for r in records)]
    partitions = sorted({r.get("partition", "iid") for r in records})
    steps = max(r["step"] for r in records)
    lines = [
        "# DRACO against robust aggregation",
        "",
        f"Generated by `{command}` (6 CPU ranks over gloo on one 2-core machine, {steps} steps, one liar on"
        f" rank {LIAR}, partitions: {', '.join(partitions)}); the page and plots are redrawn from compare.csv by `python benchmarks/compare.py"
        " --report-only`. Wall clock counts training steps only; test accuracy is measured outside it. Under"
        " `alie` every rank also pays the simulation's two extra all-reduces per bucket (counted as"
        " communication). `ddp` is torch's all-reduce (its time is all 'compute' here); `mean` is plain"
        " averaging through DRACO's gather/broadcast exchange.",
        "",
    ]
    for dataset in datasets:
        runs = runs_of(dataset)
        target = TARGETS[dataset]
        columns = 2
        rows_n = (len(attacks) + columns - 1) // columns
        fig, axes = plt.subplots(rows_n, columns, figsize=(11, 3.8 * rows_n), sharey=True, squeeze=False)
        for ax, attack in zip(axes.flat, attacks):
            for method, a, rows in runs:
                if a != attack and not (method == "ddp" and a == "none"):
                    continue
                points = [(r["wall_seconds"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
                if points:
                    ax.plot(*zip(*points), marker=".", label=method, linestyle="--" if method == "ddp" else "-")
            ax.set_title(f"{dataset}: attack {attack}")
            ax.set_xlabel("training wall seconds")
            ax.set_ylabel("test accuracy")
            ax.axhline(target, color="grey", linewidth=0.5)
            ax.legend(fontsize=7, ncol=2)
        for ax in list(axes.flat)[len(attacks):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out / f"accuracy_vs_time_{dataset}.png", dpi=100)
        plt.close(fig)

        clean = [(m, rows) for m, a, rows in runs if a == "none"]
        fig, ax = plt.subplots(figsize=(8, 4))
        bottom = [0.0] * len(clean)
        for part, label in (("compute", "compute"), ("communication", "communication"), ("decode", "decode/aggregate")):
            values = [rows[-1][f"{part}_seconds"] / len(rows) * 1000 for _, rows in clean]
            ax.bar([m for m, _ in clean], values, bottom=bottom, label=label)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("ms per step (rank 0, no attack)")
        ax.set_title(f"{dataset}: where a step's time goes")
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"step_time_{dataset}.png", dpi=100)
        plt.close(fig)

        lines += [
            f"## {dataset}",
            "",
            f"![accuracy against time](accuracy_vs_time_{dataset}.png)",
            "",
            f"![step time split](step_time_{dataset}.png)",
            "",
            f"Time to {target:.0%} test accuracy (training seconds; '-' = not reached), final accuracy, and mean"
            " step time on rank 0 split into compute / communication / decode or aggregate (ms):",
            "",
            "| method | attack | time to target (s) | final accuracy | step ms: compute / comm / decode |",
            "|---|---|---|---|---|",
        ]
        for method, attack, rows in runs:
            evals = [r for r in rows if r["accuracy"] is not None]
            reached = next((r["wall_seconds"] for r in evals if r["accuracy"] >= target), None)
            final = evals[-1]["accuracy"] if evals else float("nan")
            split = " / ".join(f"{rows[-1][f'{k}_seconds'] / len(rows) * 1000:.1f}" for k in ("compute", "communication", "decode"))
            lines.append(
                f"| {method} | {attack} | {'-' if reached is None else f'{reached:.1f}'} | {final:.3f} | {split} |"
            )
        lines.append("")
    (out / "benchmarks.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
