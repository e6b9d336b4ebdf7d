"""DRACO against robust aggregation, the paper's comparison at laptop scale.

    python benchmarks/compare.py                        # both data sets, all methods and attacks
    python benchmarks/compare.py --datasets digits --steps 40
    python benchmarks/compare.py --partition dirichlet --alpha 0.1 --attacks none alie optimal_alie --out docs/alpha0.1
    python benchmarks/compare.py --heterogeneity iid,1.0,0.1 --datasets digits --steps 150   # the heterogeneity sweep

Six CPU ranks (Lightning's launcher re-runs this script for ranks 1..5; every rank runs the same
sequence of fits). For each data set, each method trains the same model from the same seed on the
same batches, without attack and with one liar (rank 4) sending each attack:

    ddp       plain DDP (all-reduce), no attack only: the reference
    mean      plain averaging through DRACO's exchange (code="none")
    median, geometric_median, krum   robust rules over the 6 received gradients (f=1)
    frc       DRACO, repetition code, r=3 (s=1)
    crc1, crc2  DRACO, cyclic code, s=1 (r=3) and s=2 (r=5)

and, on request, trimmed_mean and centered_clipping (tau=10: the digits MLP's gradients have norms of
about 0.5-1.5, so it clips a liar far from the last aggregate but no honest gradient; tau=1 clipped
honest ones too, lagged and made training oscillate without attack), and any rule behind
pre-aggregators written ``pre+rule`` (``nnm+krum``: nearest-neighbour mixing, then Krum).

``--partition dirichlet --alpha A`` gives each partition (each rank's data under plain DDP) a class
mix drawn from Dirichlet(A) (``lightning_draco.heterogeneous``): robust rules assume honest
gradients are close, and lose accuracy under heterogeneity even without an attack; DRACO's
decode is an exact sum and does not care. ``--attacks`` also accepts ``optimal_alie``.

``--heterogeneity iid,1.0,0.1`` runs the whole sequence once per partition (IID, then Dirichlet
with each alpha), by default over HETERO_METHODS and HETERO_ATTACKS (none, reverse, alie,
optimal_alie), and writes
heterogeneity.csv and heterogeneity_<dataset>.png (accuracy against training seconds and against
steps, one column per partition, one row per attack) instead of compare.csv and its plots; the
page benchmarks.md is redrawn from both CSVs that exist. ``--merge`` keeps the CSV's rows of the
runs a command does not redo: a sweep can be extended by attacks or methods without rerunning it.
It refuses, before training, a command whose ``--steps``, ``--batch`` or ``--eval-every`` differ from
those that made the CSV (rows of another budget would sit beside them as if comparable).

Data sets: scikit-learn's digits (the examples' MLP, 128 wide, without dropout), and synthetic CIFAR-sized images (3x32x32,
ten classes, class means plus noise) with a CNN of 2.1M parameters, where aggregation costs show.
Rank 0 evaluates test accuracy every ``--eval-every`` steps, outside the timed wall clock.

Writes ``--out`` (default docs/): compare.csv (method, attack, dataset, step, wall seconds, loss,
accuracy), accuracy_vs_time_<dataset>.png, step_time_<dataset>.png (per-step time split into
compute, communication, decode/aggregate on the parameter server) and benchmarks.md with the
table of time to a target accuracy and final accuracy. Hand-written text between
``<!-- notes:NAME -->`` and ``<!-- /notes -->`` in benchmarks.md survives regeneration.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import re
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
RULES = ["median", "trimmed_mean", "geometric_median", "krum", "centered_clipping"]
RULE_OPTIONS = {"centered_clipping": {"tau": 10.0}}
# The PS's secret, fixed so that every run is reproducible (it draws the cyclic code's projections and
# bucketing's permutation; unset, the PS draws a fresh one from OS entropy in each run).
SECRET = 20181
PRE_AGGREGATORS = ["nnm", "bucketing", "arc"]
HETERO_METHODS = ["ddp", "frc", "crc1", *RULES, *(f"nnm+{rule}" for rule in RULES)]
HETERO_ATTACKS = ["none", "reverse", "alie", "optimal_alie"]
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


def method_type(name: str) -> str:
    """argparse type of a method: one of METHODS, a rule of RULES, or ``pre+...+rule``."""
    *pres, rule = name.split("+")
    if (not pres and name in METHODS) or (rule in RULES and all(p in PRE_AGGREGATORS for p in pres)):
        return name
    raise argparse.ArgumentTypeError(
        f"unknown method {name!r}: one of {', '.join(METHODS)}, a rule of {', '.join(RULES)},"
        f" or pre-aggregators ({', '.join(PRE_AGGREGATORS)}) and a rule joined by '+' (nnm+krum)."
    )


def method_order(name: str) -> tuple:
    """Sort key of the tables and legends: the reference, DRACO, then each rule with and without pre-aggregators."""
    *pres, rule = name.split("+")
    if not pres and name in METHODS and name not in RULES:
        return (0, ["ddp", "mean", "frc", "crc1", "crc2"].index(name), "")
    return (1, RULES.index(rule), "+".join(pres))


def parse_heterogeneity(text: str) -> list[tuple[str, float]]:
    """``iid,1.0,0.1`` -> [("iid", 1.0), ("dirichlet", 1.0), ("dirichlet", 0.1)] (alpha unused for IID)."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "iid":
            out.append(("iid", 1.0))
            continue
        try:
            alpha = float(item)
        except ValueError:
            alpha = -1.0
        if not alpha > 0:
            raise argparse.ArgumentTypeError(f"--heterogeneity takes 'iid' and Dirichlet alphas > 0 (got {item!r}).")
        out.append(("dirichlet", alpha))
    return out


def partition_label(partition: str, alpha: float) -> str:
    return "iid" if partition == "iid" else f"dirichlet-{alpha:g}"


def strategy_for(method: str, attack: str):
    adversary = None if attack == "none" else Adversary(ranks=[LIAR], attack=attack)
    common = dict(start_method="popen", adversary=adversary, projection_secret=SECRET)
    if method == "ddp":
        return L.pytorch.strategies.DDPStrategy(start_method="popen")
    if method == "mean":
        return DracoStrategy(code="none", num_adversaries=0, **common)
    *pres, rule = method.split("+")
    if rule in RULES:
        return DracoStrategy(code="none", num_adversaries=1, aggregator=rule, aggregator_options=RULE_OPTIONS.get(rule),
                             pre_aggregators=pres or None, **common)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", type=method_type,
                        help=f"default: {' '.join(METHODS)}; with --heterogeneity: {' '.join(HETERO_METHODS)}")
    parser.add_argument("--attacks", nargs="+", choices=ALL_ATTACKS,
                        help=f"default: {' '.join(ATTACKS)}; with --heterogeneity: {' '.join(HETERO_ATTACKS)}")
    parser.add_argument("--partition", default="iid", choices=["iid", "dirichlet"],
                        help="how the training set is split between partitions")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration with --partition dirichlet")
    parser.add_argument("--heterogeneity", type=parse_heterogeneity, metavar="iid,1.0,0.1",
                        help="sweep: every run once per listed partition (writes heterogeneity.csv and its plots)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16, help="per partition, as one plain-DDP rank's batch")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--report-only", action="store_true", help="redo plots and page from the CSVs in OUT")
    parser.add_argument("--merge", action="store_true",
                        help="keep OUT's CSV rows of other runs (dataset, method, attack, partition), replace those"
                             " this command reruns: add attacks or methods to an earlier sweep")
    return parser


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        redraw(out, {})
        return
    if args.heterogeneity and args.partition != "iid":
        parser.error("--heterogeneity lists the partitions itself: leave --partition/--alpha out.")
    kind = "heterogeneity" if args.heterogeneity else "compare"
    partitions = args.heterogeneity or [(args.partition, args.alpha)]
    methods = args.methods or (HETERO_METHODS if args.heterogeneity else METHODS)
    attacks = args.attacks or (HETERO_ATTACKS if args.heterogeneity else ATTACKS)
    command = " ".join(["python", "benchmarks/compare.py", *sys.argv[1:]] if argv is None else
                       ["python", "benchmarks/compare.py", *argv])
    if args.merge and merge_conflict(out, kind, command):
        parser.error(merge_conflict(out, kind, command))  # before hours of training, not after
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    results = []
    for partition, alpha in partitions:
        for dataset in args.datasets:
            for method in methods:
                for attack in attacks:
                    if method == "ddp" and attack != "none":
                        continue
                    recorder = run(dataset, method, attack, args.steps, args.eval_every, args.batch, partition, alpha)
                    results.append((dataset, method, attack, partition_label(partition, alpha), recorder))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        records = [
            {"dataset": dataset, "method": method, "attack": attack, "partition": label, **row}
            for dataset, method, attack, label, recorder in results
            for row in recorder.rows
        ]
        if args.merge:
            records, command = merged(out, kind, records, command)
        save(out, kind, records, command)


# What every run of one table must share: rows trained for other steps, on other batch sizes, or evaluated at
# other intervals (time to target is read at the evaluations) would sit side by side as if comparable.
BUDGET_OPTIONS = ("steps", "batch", "eval_every")


def _budget(command: str) -> dict | None:
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # argparse's usage error is not the user's to read
            options = build_parser().parse_args(command.split()[2:])
    except SystemExit:  # not a command of this script's options: nothing to compare
        return None
    return {name: getattr(options, name) for name in BUDGET_OPTIONS}


def merge_conflict(out: Path, kind: str, command: str) -> str | None:
    """Why ``command``'s runs cannot be merged into OUT's CSV (None: they can)."""
    page = out / "benchmarks.md"
    if not (out / CSV_FILES[kind]).exists() or not page.exists():
        return None
    if not any(line.startswith(COMMAND_PREFIXES[kind]) for line in page.read_text().splitlines()):
        return None  # the CSV's commands are not recorded: nothing to compare with
    now = _budget(command)
    for earlier in _command_line(out, kind).split("&&"):
        before = _budget(earlier.strip())
        if now is None or before is None:
            continue
        changed = [f"--{name.replace('_', '-')} {before[name]} there, {now[name]} now"
                   for name in BUDGET_OPTIONS if before[name] != now[name]]
        if changed:
            return (f"--merge would put this command's runs beside runs of another budget in {out / CSV_FILES[kind]}"
                    f" ({'; '.join(changed)}; made by `{earlier.strip()}`): use the same --steps, --batch and"
                    " --eval-every, or another --out.")
    return None


def merged(out: Path, kind: str, records: list[dict], command: str) -> tuple[list[dict], str]:
    """``records`` added to the rows of OUT's CSV from other runs (a rerun run replaces its rows), and the
    commands that made them all, joined by ``&&``. Runs of another budget (``BUDGET_OPTIONS``) are refused."""
    path = out / CSV_FILES[kind]
    if not path.exists():
        return records, command
    conflict = merge_conflict(out, kind, command)
    if conflict:
        raise ValueError(conflict)
    runs = {(r["dataset"], r["method"], r["attack"], r["partition"]) for r in records}
    with open(path) as f:
        kept = [row for row in map(_typed, csv.DictReader(f))
                if (row["dataset"], row["method"], row["attack"], row["partition"]) not in runs]
    return kept + records, f"{_command_line(out, kind)} && {command}"


def save(out: Path, kind: str, records: list[dict], command: str) -> None:
    """Write ``kind``'s CSV (compare or heterogeneity), then redraw its plots and the page."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV_FILES[kind], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(records)
    redraw(out, {kind: (records, command)})


CSV_FILES = {"compare": "compare.csv", "heterogeneity": "heterogeneity.csv"}
COMMAND_PREFIXES = {"compare": "Generated by `", "heterogeneity": "Sweep generated by `"}
DEFAULT_COMMANDS = {"compare": "python benchmarks/compare.py",
                    "heterogeneity": "python benchmarks/compare.py --heterogeneity iid,1.0,0.1"}
NOTES = re.compile(r"<!-- notes:([\w-]+) -->\n(.*?)<!-- /notes -->", re.DOTALL)


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


def _command_line(out: Path, kind: str) -> str:
    page = out / "benchmarks.md"
    if page.exists():
        for line in page.read_text().splitlines():
            if line.startswith(COMMAND_PREFIXES[kind]):
                return line.split("`")[1]
    return DEFAULT_COMMANDS[kind]


def redraw(out: Path, fresh: dict) -> None:
    """benchmarks.md from ``fresh`` ({kind: (records, command)}) and the other CSVs in ``out``; the plots of
    ``fresh`` only, or all of them when ``fresh`` is empty (``--report-only``)."""
    sections = dict(fresh)
    for kind, name in CSV_FILES.items():
        if kind not in sections and (out / name).exists():
            with open(out / name) as f:
                records = [_typed(row) for row in csv.DictReader(f)]
            if records:
                sections[kind] = (records, _command_line(out, kind))
    page = out / "benchmarks.md"
    # Without the newline before the closing marker: the page puts it back.
    notes = {name: text.rstrip("\n") for name, text in NOTES.findall(page.read_text())} if page.exists() else {}
    if "compare" in sections:
        records, command = sections["compare"]
        lines = write_report(records, out, command, notes, draw=not fresh or "compare" in fresh)
    else:
        lines = ["# DRACO against robust aggregation", ""]
    if "heterogeneity" in sections:
        records, command = sections["heterogeneity"]
        lines += heterogeneity_report(records, out, command, notes, draw=not fresh or "heterogeneity" in fresh)
    page.write_text("\n".join(lines))
    print("\n".join(lines))


def write_report(records: list[dict], out: Path, command: str, notes: dict, draw: bool = True) -> list[str]:
    """Plots and the lines of benchmarks.md from the per-step records (what compare.csv holds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def runs_of(dataset):
        """(label, attack, rows) per run: a method's runs on different partitions are different runs."""
        keys = sorted({(r["method"], r["attack"], r.get("partition", "iid")) for r in records if r["dataset"] == dataset},
                      key=lambda k: (METHODS.index(k[0]) if k[0] in METHODS else len(METHODS),
                                     method_order(k[0]), ALL_ATTACKS.index(k[1]), k[2]))
        return [(m if len(partitions) == 1 else f"{m} ({p})", a,
                 [r for r in records if r["dataset"] == dataset and r["method"] == m and r["attack"] == a
                  and r.get("partition", "iid") == p])
                for m, a, p in keys]

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
        " averaging through DRACO's gather/broadcast exchange. Under `frc` a rank runs a forward per partition"
        " it holds; BatchNorm's running statistics move in its own partition's only, once per step as under"
        " DDP (docs/codes.md). The loss column of compare.csv is rank 0's mean over the partitions it"
        " computes (r of them under `frc`, one otherwise).",
        "",
    ]
    for dataset in datasets:
        runs = runs_of(dataset)
        target = TARGETS[dataset]
        if draw:
            columns = 2
            rows_n = (len(attacks) + columns - 1) // columns
            fig, axes = plt.subplots(rows_n, columns, figsize=(11, 3.8 * rows_n), sharey=True, squeeze=False)
            for ax, attack in zip(axes.flat, attacks):
                for method, a, rows in runs:
                    baseline = rows[0]["method"] == "ddp" and a == "none"
                    if a != attack and not baseline:
                        continue
                    points = [(r["wall_seconds"], r["accuracy"]) for r in rows if r["accuracy"] is not None]
                    if points:
                        label = f"{method} (clean)" if baseline and attack != "none" else method
                        ax.plot(*zip(*points), marker=".", label=label, linestyle="--" if baseline else "-")
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
            parts = (("compute", "compute"), ("communication", "communication"), ("decode", "decode/aggregate"))
            for part, label in parts:
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
            f"<!-- notes:compare-{dataset} -->",
            notes.get(f"compare-{dataset}", ""),
            "<!-- /notes -->",
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
    return lines


def _final(rows: list[dict]) -> float:
    evals = [r["accuracy"] for r in rows if r["accuracy"] is not None]
    return evals[-1] if evals else float("nan")


def shard_summary(dataset: str, partition: str, batch: int) -> str:
    """Each partition's size and the share of its largest class, as the sweep split them."""
    if partition == "iid":
        return "shuffled, equal shares"
    from lightning_draco.heterogeneous import dirichlet_shards

    labels = TASKS[dataset]()[0].tensors[1]
    shards = dirichlet_shards(labels.tolist(), WORLD, float(partition.split("-", 1)[1]), seed=0, min_size=batch)
    cells = []
    for shard in shards:
        counts = torch.bincount(labels[shard], minlength=10)
        cells.append(f"{len(shard)} ({int((counts > 0).sum())} cl, top {float(counts.max()) / len(shard):.0%})")
    return "; ".join(cells)


def heterogeneity_report(records: list[dict], out: Path, command: str, notes: dict, draw: bool = True) -> list[str]:
    """Plots (accuracy against seconds and against steps, per partition and attack) and the page's section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The options of the last command (a merged sweep lists its commands joined by ``&&``).
    options = build_parser().parse_args(command.split("&&")[-1].split()[2:])
    datasets = [d for d in TASKS if any(r["dataset"] == d for r in records)]
    attacks = [a for a in ALL_ATTACKS if any(r["attack"] == a for r in records)]
    partitions = sorted({r["partition"] for r in records},
                        key=lambda p: (0, 0.0) if p == "iid" else (1, -float(p.split("-", 1)[1])))
    steps = max(r["step"] for r in records)
    colours = plt.get_cmap("tab10").colors
    style = {"ddp": dict(color="black", linestyle=":", linewidth=2.0, zorder=5),
             "frc": dict(color=colours[3], linewidth=2.2), "crc1": dict(color=colours[6], linewidth=1.6),
             "crc2": dict(color=colours[8], linewidth=1.6), "mean": dict(color=colours[7])}

    def line_style(method):
        if method in style:
            return style[method]
        *pres, rule = method.split("+")
        return dict(color=colours[[0, 1, 2, 4, 5][RULES.index(rule)]], linestyle="--" if pres else "-", linewidth=1.0)

    def label(partition):
        return "IID" if partition == "iid" else f"Dirichlet alpha={partition.split('-', 1)[1]}"

    lines = [
        "## Heterogeneous data: IID against Dirichlet partitions",
        "",
        f"{COMMAND_PREFIXES['heterogeneity']}{command}` ({WORLD} CPU ranks over gloo on one 2-core machine,"
        f" {steps} steps, batch {options.batch} per partition, test accuracy every {options.eval_every} steps,"
        f" one liar on rank {LIAR};"
        " redrawn from heterogeneity.csv by `python benchmarks/compare.py --report-only`). Each partition"
        " (one rank's data under plain DDP, one partition of the code under DRACO) draws its class mix from"
        " Dirichlet(alpha) per class (`lightning_draco.heterogeneous`, seed 0); every method sees the same"
        " partitions and batches from the same initial weights. Robust rules run over the 6 received gradients"
        " with f=1; `nnm+rule` mixes each gradient with its n-f nearest neighbours first (Allouah et al. 2023);"
        f" centred clipping uses tau={RULE_OPTIONS['centered_clipping']['tau']:g}; `alie` sends mean + 1.5 std of"
        " what the honest ranks send (their gradients; under `frc` and `crc` their coded sums); every method's PS"
        f" secret (the cyclic code's projections, bucketing's permutation) is {SECRET}.",
        "",
        "Partitions, rank 0 to 5: samples (classes present, share of the largest class):",
        "",
        "| partition | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for partition in partitions:
        cells = " | ".join(shard_summary(d, partition, options.batch) for d in datasets)
        lines.append(f"| {label(partition)} | {cells} |")
    lines.append("")
    for dataset in datasets:
        runs = {}
        for r in records:
            if r["dataset"] == dataset:
                runs.setdefault((r["method"], r["attack"], r["partition"]), []).append(r)
        methods = sorted({m for m, _, _ in runs}, key=method_order)
        for axis, xlabel in (("time", "training wall seconds (rank 0)"), ("steps", "optimizer steps")) if draw else ():
            fig, axes = plt.subplots(len(attacks), len(partitions), figsize=(4.6 * len(partitions), 3.6 * len(attacks)),
                                     sharey=True, squeeze=False)
            for i, attack in enumerate(attacks):
                for j, partition in enumerate(partitions):
                    ax = axes[i][j]
                    for method in methods:
                        rows = runs.get((method, attack, partition)) or (
                            runs.get((method, "none", partition)) if method == "ddp" else None)
                        if not rows:
                            continue
                        points = [(r["wall_seconds"] if axis == "time" else r["step"], r["accuracy"])
                                  for r in rows if r["accuracy"] is not None]
                        ax.plot(*zip(*points), label=method if method != "ddp" else "ddp (clean)", **line_style(method))
                    ax.set_title(f"{dataset}, {label(partition)}, attack {attack}", fontsize=9)
                    ax.set_xlabel(xlabel, fontsize=8)
                    ax.set_ylabel("test accuracy", fontsize=8)
                    ax.set_ylim(0, 1)
                    ax.grid(alpha=0.3)
            handles, names = axes[0][0].get_legend_handles_labels()
            fig.legend(handles, names, loc="lower center", ncol=min(len(names), 7), fontsize=8)
            fig.tight_layout(rect=(0, 0.06 if len(names) > 7 else 0.04, 1, 1))
            fig.savefig(out / f"heterogeneity_{axis}_{dataset}.png", dpi=90)
            plt.close(fig)

        head = " | ".join(f"accuracy {label(p)}" for p in partitions)
        secs = " | ".join(f"s {label(p)}" for p in partitions)
        lines += [
            f"### {dataset}",
            "",
            f"![accuracy against training seconds](heterogeneity_time_{dataset}.png)",
            "",
            f"![accuracy against steps](heterogeneity_steps_{dataset}.png)",
            "",
            f"Final test accuracy (after {steps} steps) and training wall seconds on rank 0 (steps only) per"
            " partition; `ddp` is the clean reference (plain all-reduce, no liar):",
            "",
            f"| method | attack | {head} | {secs} |",
            "|---|---|" + "---|" * (2 * len(partitions)),
        ]
        for method in methods:
            for attack in attacks:
                cells = [runs.get((method, attack, p)) for p in partitions]
                if not any(cells):
                    continue
                acc = " | ".join("-" if c is None else f"{_final(c):.3f}" for c in cells)
                sec = " | ".join("-" if c is None else f"{c[-1]['wall_seconds']:.1f}" for c in cells)
                lines.append(f"| {method} | {attack} | {acc} | {sec} |")
        lines.append("")
    lines += [
        "<!-- notes:heterogeneity -->",
        notes.get("heterogeneity", "(What the numbers show: written by hand, kept when the page is redrawn.)"),
        "<!-- /notes -->",
        "",
    ]
    return lines


if __name__ == "__main__":
    main()
