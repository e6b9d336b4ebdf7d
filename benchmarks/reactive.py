"""Reactive redundancy against the one-shot repetition code and plain DDP: compute, wall time, final model.

    python benchmarks/reactive.py [--steps 200] [--worlds 6 8] [--markdown docs/reactive.md] [--json F]

CPU ranks over gloo train the same MLP on the same synthetic data (``--batch`` samples per
partition, one thread per rank) with each method:

* ``ddp``: Lightning's DDPStrategy (one partition per rank, no protection);
* ``frc``: DracoStrategy, the one-shot repetition code, r = 2s+1 (only where r divides P);
* ``reactive``: DracoStrategy(redundancy_mode="reactive"), groups of s+1;

and, for the two DRACO modes, three adversaries: none; a liar at every step (rank 4, ``reverse``);
a liar at 1 % of steps (a random rank at randomly chosen steps, ``reverse``). Per run it records
the partition forwards per step over all ranks (each has its backward: the measure of compute),
the backward passes, the escalations, the CPU seconds per step summed over the ranks (after 5
warm-up steps: the least disturbed by other load on the machine), the median wall time per step
(rank 0; every rank waits for the exchange, so rank 0's step is the job's), and a digest of the
final parameters, which must equal the same mode's adversary-free run.

``reactive:noisy`` (P = 6) simulates honest replicas that are not bitwise equal, as with
non-deterministic GPU kernels: each rank scales its loss by ``1 + 1e-6 * rank``. No one lies; the
escalations count how often the noise-floor rule still sends a group to the vote.

The wall times come from 6 or 8 processes sharing this machine's cores: they show the ratios, not
what a rank with its own accelerator would see.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

S = 1
LIAR = 4


def liar_at_one_percent(honest: torch.Tensor, *, step: int) -> torch.Tensor:
    """``reverse`` at about 1 % of steps, chosen by a fixed draw per step (the same on every rank)."""
    draw = torch.rand((), generator=torch.Generator().manual_seed(10_000 + step))
    return honest * -100.0 if float(draw) < 0.01 else honest.clone()


def lying_steps(steps: int) -> list[int]:
    return [t for t in range(steps) if float(torch.rand((), generator=torch.Generator().manual_seed(10_000 + t))) < 0.01]


# -- the job (every rank runs this; Lightning's launcher re-runs the script for ranks 1..P-1) ---------
def job(out: str, world: int, steps: int, batch: int, names: list[str]) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_draco  # noqa: F401
    from lightning_draco import Adversary, DracoStrategy

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(256, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
            )
            self.forwards = 0
            self.backwards = 0
            self.noisy = False

        def training_step(self, data, index):
            self.forwards += 1
            x, y = data
            loss = nn.functional.cross_entropy(self.net(x), y)
            return loss * (1 + 1e-6 * self.global_rank) if self.noisy else loss

        def backward(self, loss, *args, **kwargs):
            self.backwards += 1
            super().backward(loss, *args, **kwargs)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class StepTimer(Callback):
        """Wall and CPU seconds of each step on this rank (CPU time: what this rank's process spent)."""

        def __init__(self):
            self.times, self.cpu, self.start = [], [], (0.0, 0.0)

        def on_train_batch_start(self, *args):
            self.start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.start[0])
            self.cpu.append(time.process_time() - self.start[1])

    gen = torch.Generator().manual_seed(0)
    samples = world * batch * 25
    x = torch.randn(samples, 256, generator=gen)
    y = (x[:, :10].argmax(1) + (torch.rand(samples, generator=gen) < 0.2).long()) % 10
    data = TensorDataset(x, y)

    results = {}
    for name in names:
        method, adversary = name.split(":")
        L.seed_everything(1, verbose=False)
        if method == "ddp":
            strategy = L.pytorch.strategies.DDPStrategy(start_method="popen")
        else:
            liar = {
                "none": None,
                "every": Adversary(ranks=[LIAR], attack="reverse"),
                "one_percent": Adversary(ranks="random", attack=liar_at_one_percent, seed=7),
                "noisy": None,
            }[adversary]
            mode = "reactive" if method == "reactive" else "full"
            strategy = DracoStrategy(num_adversaries=S, redundancy_mode=mode, adversary=liar, start_method="popen")
        timer = StepTimer()
        model = Net()
        model.noisy = adversary == "noisy"
        trainer = L.Trainer(
            accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False, callbacks=[timer],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=batch, shuffle=True))
        digest = hashlib.sha256()
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                digest.update(tensor.detach().contiguous().numpy().tobytes())
        stats = getattr(trainer.strategy, "escalation_stats", {"steps": 0, "groups": 0, "partitions": 0})
        helper_backwards = stats["partitions"] // (S + 1)
        counts = torch.tensor([model.forwards, model.backwards + helper_backwards], dtype=torch.long)
        torch.distributed.all_reduce(counts)
        cpu = torch.tensor([sum(timer.cpu[5:])], dtype=torch.float64)
        torch.distributed.all_reduce(cpu)
        results[name] = {
            "world": world,
            "method": method,
            "adversary": adversary,
            "steps": trainer.global_step,
            "forwards_per_step": counts[0].item() / trainer.global_step,
            "backwards_per_step": counts[1].item() / trainer.global_step,
            "escalations": stats["steps"],
            "caught": {str(k): v for k, v in getattr(trainer.strategy, "faulty_counts", {}).items()},
            "seconds_per_step": statistics.median(timer.times[5:]),
            "cpu_seconds_per_step": cpu.item() / len(timer.cpu[5:]),
            "sha": digest.hexdigest(),
        }
    if trainer.global_rank == 0:
        Path(out).write_text(json.dumps(results))


# -- the driver ---------------------------------------------------------------------------------------
def configs(world: int) -> list[str]:
    names = ["ddp:none"]
    if world % (2 * S + 1) == 0:
        names += [f"frc:{a}" for a in ("none", "every", "one_percent")]
    names += [f"reactive:{a}" for a in ("none", "every", "one_percent")]
    return names + (["reactive:noisy"] if world == 6 else [])


def run(world: int, steps: int, batch: int, folder: Path) -> dict:
    out = folder / f"reactive_{world}.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--job", str(out), "--world", str(world), "--steps", str(steps),
               "--batch", str(batch), *configs(world)]
    subprocess.run(command, cwd=folder, env=env, check=True)
    return json.loads(out.read_text())


def table(results: dict, steps: int) -> str:
    lines = [
        "| P | method | liar | partition forwards / step (all ranks) | vs one-shot FRC | backwards / step |"
        " escalated steps | caught | CPU s / step (all ranks) | vs DDP | wall s / step (median) | vs DDP | final model |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for world, runs in results.items():
        ddp = runs["ddp:none"]
        frc_forwards = 2 * S + 1 if "frc:none" not in runs else runs["frc:none"]["forwards_per_step"] / int(world)
        for name, run in runs.items():
            clean = runs.get(f"{run['method']}:none", run)
            same = "reference" if clean is run else ("= clean run" if run["sha"] == clean["sha"] else "DIFFERS")
            if run["method"] == "ddp":
                same = "(no protection)"
            elif run["adversary"] == "noisy":
                same = "(other losses)"
            ratio = run["forwards_per_step"] / (frc_forwards * int(world))
            caught = ", ".join(f"rank {k}: {v}" for k, v in run["caught"].items()) or "-"
            lines.append(
                f"| {world} | {run['method']} | {run['adversary']} | {run['forwards_per_step']:.2f} | {ratio:.3f} |"
                f" {run['backwards_per_step']:.2f} | {run['escalations']} / {run['steps']} | {caught} |"
                f" {run['cpu_seconds_per_step']:.3f} | {run['cpu_seconds_per_step'] / ddp['cpu_seconds_per_step']:.2f}x |"
                f" {run['seconds_per_step']:.4f} | {run['seconds_per_step'] / ddp['seconds_per_step']:.2f}x | {same} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--worlds", type=int, nargs="+", default=[6, 8])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument("--job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("names", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        job(args.job, args.world, args.steps, args.batch, args.names)
        return
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "draco_reactive_bench"
    folder.mkdir(parents=True, exist_ok=True)
    results = {str(world): run(world, args.steps, args.batch, folder) for world in args.worlds}
    lies = lying_steps(args.steps)
    text = table(results, args.steps)
    print(text)
    print(f"1 % liar: lies at steps {lies}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "one_percent_steps": lies}, indent=1))
    if args.markdown:
        args.markdown.write_text(args.markdown.read_text().replace("<!-- table -->", text) if args.markdown.exists()
                                 and "<!-- table -->" in args.markdown.read_text() else text + "\n")


if __name__ == "__main__":
    main()
