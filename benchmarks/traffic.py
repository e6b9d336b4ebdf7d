"""Traffic and step time of DRACO's exchanges: parameter server, sharded decoding, DDP's ring all-reduce.

    python benchmarks/traffic.py bytes   [--worlds 6 9 12] [--d 1000000]    # measured, CPU gloo ranks
    python benchmarks/traffic.py project [--alpha-us 5] [--bucket-mb 25]     # alpha-beta model, plot
    python benchmarks/traffic.py steps   [--worlds 6 9] [--steps 8 --warmup 2 --repeats 2]  # Lightning fits
    python benchmarks/traffic.py report                                      # docs/traffic.md from the JSONs
    python benchmarks/traffic.py all                                         # the four in turn

``bytes`` drives the exchange hooks directly (no DDP, no Lightning) on one fp32 bucket of ``d``
values in a gloo world of ``P`` processes, code "frc" with s=1 (r=3): one PS-mode exchange and
one sharded exchange per rank, each on a fresh ``ExchangeState``, and compares every rank's
``stats.sent``/``stats.received`` with the exact formulas of the counting rules
(lightning_draco/exchange/collectives.py). DDP's ring all-reduce is the formula 2(P-1)/P d only.
Writes docs/traffic_bytes.json.

``project`` is a model, not a measurement: per step, each collective on the busiest rank costs
``messages * alpha + max(bytes sent, bytes received) / bandwidth`` (full-duplex links), and the
collectives of a bucket run one after the other, bucket after bucket (no overlap with
compute, no decode time). Writes docs/traffic.png and docs/traffic_projection.json.

``steps`` runs, per world size, one set of P Lightning processes (the popen launcher re-runs this
script as ``_steps``) that fits an MLP of 6.3M parameters on synthetic data for a few steps under
each configuration (DDP, DRACO PS, DRACO sharded, each DRACO mode with overlap=True), and records
per step the wall time between consecutive ``on_train_batch_end`` calls, the deltas of
``exchange_seconds`` and ``exchange_bytes``. Writes docs/traffic_steps.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOCS = ROOT / "docs"
S = 1  # adversaries tolerated in the measured parts (code "frc", r = 2s+1 = 3)
E = 4  # bytes per value (fp32)
INT = 4  # bytes per int32 (outcome vectors and flags)


# --------------------------------------------------------------------------------------------------
# Exact byte counts of one bucket of d values, by the counting rules of exchange/collectives.py
# --------------------------------------------------------------------------------------------------
def ps_formula(P: int, d: int, e: int = E) -> dict:
    """PS mode, one bucket: gather to the PS, broadcast of the decoded bucket, broadcast of the outcome (1+P int32)."""
    outcome = (1 + P) * INT
    return {
        "ps": {"sent": (P - 1) * (d * e + outcome), "received": (P - 1) * d * e},
        "worker": {"sent": d * e, "received": d * e + outcome},
    }


def sharded_formula(P: int, d: int, s: int = S, e: int = E) -> list[dict]:
    """Sharded mode, one bucket that is the step's last: all_to_all of the coded shards, all_gather of the
    decoded shards (padded to the widest) and of the verdicts ((2s+1) x (1+s) int32), one all-reduce of
    2+2P int32 flags. Per rank."""
    m = min(2 * s + 1, P)
    bounds = [k * d // P for k in range(P + 1)]
    length = [bounds[k + 1] - bounds[k] for k in range(P)]
    sizes = [sum(length[(j - (m - 1) + u) % P] for u in range(m)) for j in range(P)]
    gathered = (P - 1) * (max(sizes) * e + m * (1 + s) * INT)
    agree = (2 + 2 * P) * INT
    return [
        {"sent": (sum(sizes) - sizes[j]) * e + gathered + agree, "received": (P - 1) * sizes[j] * e + gathered + agree}
        for j in range(P)
    ]


def ring_values(P: int) -> float:
    """DDP's ring all-reduce: values sent (and received) per rank, in units of d."""
    return 2 * (P - 1) / P


# --------------------------------------------------------------------------------------------------
# bytes: the hooks on one hand-made bucket in a gloo world
# --------------------------------------------------------------------------------------------------
class _Bucket:
    """What the hooks use of DDP's ``GradBucket``: one bucket, the step's last."""

    def __init__(self, buffer):
        self._buffer = buffer

    def buffer(self):
        return self._buffer

    def set_buffer(self, buffer):
        self._buffer = buffer

    def index(self):
        return 0

    def is_last(self):
        return True

    def parameters(self):
        return []


def _hook_world(out: str, world: int, d: int) -> None:
    """One rank of the measured world (run as ``_hooks OUT WORLD D`` with RANK set)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from lightning_draco.codes import FractionalRepetitionCode
    from lightning_draco.exchange import ExchangeSetup, ExchangeState, ps_hook, sharded_hook

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=600))
    code = FractionalRepetitionCode(world, S)
    # An honest FRC coded gradient: every member of a group sends the same vector (its group's sum).
    group = tuple(code.partitions(rank))
    coded = torch.randn(d, generator=torch.Generator().manual_seed(1000 + min(group)), dtype=torch.float32)
    seen = {"rank": rank}
    results = {}
    for mode, hook in (("ps", ps_hook), ("sharded", sharded_hook)):
        state = ExchangeState(ExchangeSetup(code, rank, ps_rank=0))
        state.begin_step(0)
        dist.barrier()
        start = time.perf_counter()
        results[mode] = hook(state, _Bucket(coded.clone())).value().clone()
        wall = time.perf_counter() - start
        seen[mode] = {"sent": state.stats.sent, "received": state.stats.received, "seconds": wall,
                      "caught": sorted(state.outcome.caught), "failure": str(state.outcome.failure or "")}
    seen["bitwise_equal"] = bool(torch.equal(results["ps"], results["sharded"]))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def measure_bytes(worlds: list[int], d: int) -> dict:
    rows = []
    for P in worlds:
        with tempfile.TemporaryDirectory() as out:
            env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(P)}
            command = [sys.executable, __file__, "_hooks", out, str(P), str(d)]
            procs = [subprocess.Popen(command, env={**env, "RANK": str(r)}) for r in range(P)]
            codes = [p.wait(timeout=900) for p in procs]
            if codes != [0] * P:
                raise SystemExit(f"the hook world at P={P} failed: exit codes {codes}")
            seen = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(P)]
        ps, sharded = ps_formula(P, d), sharded_formula(P, d)
        busiest = max(range(P), key=lambda j: (seen[j]["sharded"]["received"], seen[j]["sharded"]["sent"]))
        row = {
            "P": P, "d": d, "bytes_per_value": E,
            "measured": {
                "ps_server": {k: seen[0]["ps"][k] for k in ("sent", "received")},
                "ps_worker": {k: seen[1]["ps"][k] for k in ("sent", "received")},
                "sharded_busiest": {k: seen[busiest]["sharded"][k] for k in ("sent", "received")},
                "sharded_busiest_rank": busiest,
            },
            "formula": {
                "ps_server": ps["ps"], "ps_worker": ps["worker"], "sharded_busiest": sharded[busiest],
                "ring": {"sent": ring_values(P) * d * E, "received": ring_values(P) * d * E},
            },
            "approx_in_d": {"ps_server_received": P - 1, "ps_worker": 1, "sharded": 2 * (2 * S + 1) * (P - 1) / P,
                            "ring": ring_values(P)},
            "every_rank_matches": all(
                {k: seen[j]["ps"][k] for k in ("sent", "received")} == (ps["ps"] if j == 0 else ps["worker"])
                and {k: seen[j]["sharded"][k] for k in ("sent", "received")} == sharded[j]
                for j in range(P)
            ),
            "sharded_equals_ps_bitwise": all(v["bitwise_equal"] for v in seen),
            "nobody_caught": all(not v[m]["caught"] and not v[m]["failure"] for v in seen for m in ("ps", "sharded")),
            "hook_seconds_rank0": {m: seen[0][m]["seconds"] for m in ("ps", "sharded")},
        }
        rows.append(row)
        print(_bytes_table([row], header=len(rows) == 1), flush=True)
    return {"d": d, "s": S, "code": "frc", "redundancy": 2 * S + 1, "rows": rows,
            "command": f"python benchmarks/traffic.py bytes --worlds {' '.join(map(str, worlds))} --d {d}"}


def _bytes_table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += [
            "| P | rank | sent: measured / formula (B) | received: measured / formula (B)"
            " | received in units of d | approx. formula (d) |",
            "|---|---|---|---|---|---|",
        ]
    for row in rows:
        P, d, m, f, a = row["P"], row["d"], row["measured"], row["formula"], row["approx_in_d"]
        entries = [
            ("PS mode: the PS (rank 0)", m["ps_server"], f["ps_server"], f"P-1 = {a['ps_server_received']}"),
            ("PS mode: a worker", m["ps_worker"], f["ps_worker"], "1"),
            (f"sharded: busiest (rank {m['sharded_busiest_rank']})", m["sharded_busiest"], f["sharded_busiest"],
             f"2(2s+1)(P-1)/P = {a['sharded']:.3f}"),
        ]
        for name, meas, form, approx in entries:
            lines.append(f"| {P} | {name} | {meas['sent']:,} / {form['sent']:,}"
                         f" | {meas['received']:,} / {form['received']:,}"
                         f" | {meas['received'] / (d * E):.4f} | {approx} |")
        ring = f["ring"]["received"]
        lines.append(f"| {P} | DDP ring all-reduce (formula only) | {ring:,.0f} | {ring:,.0f} | {ring / (d * E):.4f}"
                     f" | 2(P-1)/P = {a['ring']:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# project: the alpha-beta model
# --------------------------------------------------------------------------------------------------
def phases(mode: str, P: int, d: float, s: int = S, e: int = E, bucket_bytes: float = 25 * 2**20) -> list[tuple]:
    """The busiest rank's collectives of one step, as ``(count, messages, bytes sent, bytes received)``:
    each collective repeated ``count`` times (per bucket, or once per step)."""
    n = max(1, math.ceil(d * e / bucket_bytes))  # DDP buckets of bucket_bytes
    b = d / n  # values per bucket
    m = min(2 * s + 1, P)
    if mode == "ring":
        v = 2 * (P - 1) / P * b * e
        return [(n, 2 * (P - 1), v, v)]
    if mode == "ps":  # the PS: gather, then the decoded bucket and the outcome broadcast (flat, as counted)
        return [
            (n, P - 1, 0.0, (P - 1) * b * e),
            (n, P - 1, (P - 1) * b * e, 0.0),
            (n, P - 1, (P - 1) * (1 + P) * INT, 0.0),
        ]
    if mode == "sharded":
        coded = m * (P - 1) / P * b * e
        decoded = (P - 1) * math.ceil(m * b / P) * e
        verdicts = (P - 1) * m * (1 + s) * INT
        flags = 2 * (P - 1) / P * (2 + 2 * P) * INT
        return [
            (n, P - 1, coded, coded),  # all_to_all of the coded shards
            (n, P - 1, decoded, decoded),  # all_gather (ring) of the decoded shards
            (n, P - 1, verdicts, verdicts),  # all_gather of the verdicts
            (1, 2 * (P - 1), flags, flags),  # the step's agreement: a ring all-reduce of 2+2P flags
        ]
    raise ValueError(mode)


def projected(mode: str, P: int, d: float, s: int, alpha: float, bandwidth: float, bucket_bytes: float) -> dict:
    """Seconds per step of the busiest rank (alpha: seconds per message; bandwidth: bytes per second each way)."""
    ph = phases(mode, P, d, s, bucket_bytes=bucket_bytes)
    latency = sum(n * msgs * alpha for n, msgs, _, _ in ph)
    transfer = sum(n * max(out, inn) / bandwidth for n, _, out, inn in ph)
    return {
        "seconds": latency + transfer, "latency_s": latency, "transfer_s": transfer,
        "messages": sum(n * msgs for n, msgs, _, _ in ph),
        "received_bytes": sum(n * inn for n, _, _, inn in ph), "sent_bytes": sum(n * out for n, _, out, _ in ph),
    }


MODES = [("ring", 0, "DDP ring all-reduce"), ("ps", 1, "DRACO PS (s=1)"),
         ("sharded", 1, "sharded s=1"), ("sharded", 2, "sharded s=2")]
LINKS = [100, 400]  # Gb/s


def projection(alpha: float, bucket_mb: float, plot: Path | None) -> dict:
    bucket_bytes = bucket_mb * 2**20
    grid_P = [8, 16, 32, 64, 128, 256, 512, 1024]
    grid_d = [1e6, 1e7, 1e8, 1e9]
    rows = []
    for gbps in LINKS:
        for d in grid_d:
            for P in grid_P:
                row = {"link_gbps": gbps, "d": d, "P": P}
                for mode, s, label in MODES:
                    row[label] = projected(mode, P, d, s, alpha, gbps * 1e9 / 8, bucket_bytes)
                rows.append(row)
    if plot is not None:
        _plot(alpha, bucket_bytes, plot)
    return {"alpha_s": alpha, "bucket_mb": bucket_mb, "bytes_per_value": E, "rows": rows,
            "command": f"python benchmarks/traffic.py project --alpha-us {alpha * 1e6:g} --bucket-mb {bucket_mb:g}"}


def _plot(alpha: float, bucket_bytes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ps = [2**k for k in range(2, 11)]
    ds = [1e6, 1e8, 1e9]
    fig, axes = plt.subplots(len(LINKS), len(ds), figsize=(13, 7.5), sharex=True)
    styles = {"DDP ring all-reduce": "k-", "DRACO PS (s=1)": "r-o", "sharded s=1": "b-s", "sharded s=2": "c--^"}
    for i, gbps in enumerate(LINKS):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            for mode, s, label in MODES:
                ys = [projected(mode, P, d, s, alpha, gbps * 1e9 / 8, bucket_bytes)["seconds"] for P in Ps]
                ax.plot(Ps, ys, styles[label], label=label, markersize=4)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"d = {d:.0e} fp32 ({d * E / 1e9:g} GB), {gbps} Gb/s", fontsize=10)
            if i == len(LINKS) - 1:
                ax.set_xlabel("ranks P")
            if j == 0:
                ax.set_ylabel("projected communication s / step")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Alpha-beta projection (not measured): busiest rank, alpha = {alpha * 1e6:g} us/message,"
                 f" {bucket_bytes / 2**20:g} MiB buckets, collectives in sequence", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _projection_table(proj: dict, Ps=(8, 64, 256, 1024), ds=(1e6, 1e8, 1e9)) -> str:
    lines = [
        "| link | d | P | ring all-reduce | DRACO PS | sharded s=1 | sharded s=2 | PS / ring | sharded s=1 / ring"
        " | messages (ring / PS / sharded) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in proj["rows"]:
        if row["P"] not in Ps or row["d"] not in ds:
            continue
        r, p, s1, s2 = (row[label] for _, _, label in MODES)
        lines.append(
            f"| {row['link_gbps']} Gb/s | {row['d']:.0e} | {row['P']} | {_t(r)} | {_t(p)} | {_t(s1)} | {_t(s2)}"
            f" | {p['seconds'] / r['seconds']:.1f} | {s1['seconds'] / r['seconds']:.2f}"
            f" | {r['messages']:,} / {p['messages']:,} / {s1['messages']:,} |"
        )
    return "\n".join(lines)


def _t(x: dict) -> str:
    sec = x["seconds"]
    return f"{sec * 1e3:.3g} ms" if sec < 1 else f"{sec:.3g} s"


# --------------------------------------------------------------------------------------------------
# steps: Lightning fits, one set of processes per world size
# --------------------------------------------------------------------------------------------------
CONFIGS = {
    "ddp": None,
    "ps": dict(decode="ps"),
    "sharded": dict(decode="sharded"),
    "ps_overlap": dict(decode="ps", overlap=True),
    "sharded_overlap": dict(decode="sharded", overlap=True),
}
WIDTHS = (512, 2048, 2048, 512, 10)  # 6.3M parameters
BATCH = 16  # per partition (= per DDP rank)
BUCKET_MB = 4  # several buckets for the 25 MB gradient, so that overlap has something to overlap


def _job(out: str, world: int, steps: int, names: list[str]) -> None:
    """One rank of the Lightning job (run as ``_steps OUT WORLD STEPS NAME...``)."""
    import warnings

    import lightning as L
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_draco import DracoStrategy

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    class MLP(L.LightningModule):
        def __init__(self):
            super().__init__()
            layers = []
            for a, b in zip(WIDTHS[:-1], WIDTHS[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.net = nn.Sequential(*layers[:-1])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Clock(L.Callback):
        def __init__(self):
            self.ends, self.seconds, self.bytes = [], [], []

        def _read(self, trainer):
            strategy = trainer.strategy
            if isinstance(strategy, DracoStrategy):
                self.seconds.append(dict(strategy.exchange_seconds))
                self.bytes.append(dict(strategy.exchange_bytes))

        def on_train_batch_start(self, trainer, *args):
            if not self.ends:  # the first step's start: the reference of step 0
                self.ends.append(time.perf_counter())
                self._read(trainer)

        def on_train_batch_end(self, trainer, *args):
            self.ends.append(time.perf_counter())
            self._read(trainer)

    g = torch.Generator().manual_seed(0)
    n = world * BATCH * (steps + 1)
    data = TensorDataset(torch.randn(n, WIDTHS[0], generator=g), torch.randint(0, WIDTHS[-1], (n,), generator=g))
    results = {}
    for name in names:
        L.seed_everything(1234, verbose=False)
        kw = CONFIGS[name]
        if kw is None:
            strategy = L.pytorch.strategies.DDPStrategy(start_method="popen", bucket_cap_mb=BUCKET_MB)
        else:
            strategy = DracoStrategy(code="frc", num_adversaries=S, bucket_cap_mb=BUCKET_MB, start_method="popen",
                                     timeout=900, **kw)
        clock = Clock()
        model = MLP()
        trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_steps=steps, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[clock])
        trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=False))
        mine = {"step_s": [b - a for a, b in zip(clock.ends, clock.ends[1:])]}
        if clock.seconds:
            for key in ("communication", "decode"):
                mine[key + "_s"] = [b[key] - a[key] for a, b in zip(clock.seconds, clock.seconds[1:])]
            for key in ("sent", "received"):
                mine[key] = [b[key] - a[key] for a, b in zip(clock.bytes, clock.bytes[1:])]
        if kw is None:  # DDP's all-reduce of the whole gradient alone, outside training: its cost when not overlapped
            flat = torch.zeros(sum(p.numel() for p in model.parameters()))
            times = []
            for _ in range(4):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(flat)
                times.append(time.perf_counter() - start)
            mine["allreduce_alone_s"] = times
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        results[name] = {"ranks": gathered, "numel": sum(p.numel() for p in model.parameters()),
                         "global_step": trainer.global_step}
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(results, f)


def measure_steps(worlds: list[int], steps: int, warmup: int, names: list[str], repeats: int) -> dict:
    """Per world size, ``repeats`` jobs (each a fresh set of P processes), the configurations in reverse
    order on every other job so that a drift of the machine's load does not favour one of them."""
    out = {"steps": steps, "warmup": warmup, "repeats": repeats, "batch_per_partition": BATCH, "widths": WIDTHS,
           "bucket_mb": BUCKET_MB, "load_average_before": os.getloadavg(), "cpus": os.cpu_count(), "worlds": {}}
    for P in worlds:
        world = out["worlds"][str(P)] = {"job_wall_s": [], "load_average_after": [], "configs": {}}
        for repeat in range(repeats):
            order = names if repeat % 2 == 0 else names[::-1]
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "steps.json"
                start = time.perf_counter()
                proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_steps", str(path), str(P),
                                       str(steps), *order], cwd=folder, env=_env(), capture_output=True, text=True,
                                      timeout=1800)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    text = proc.stdout + proc.stderr
                    first = text.find("Traceback")
                    excerpt = text[first : first + 6000] if first >= 0 else text[-6000:]
                    raise SystemExit(f"the step job at P={P} failed:\n{excerpt}")
                raw = json.loads(path.read_text())
            world["job_wall_s"].append(wall)
            world["load_average_after"].append(os.getloadavg())
            for name in names:
                world["configs"].setdefault(name, []).append(raw[name])
            print(f"P={P}, job {repeat + 1}/{repeats} ({' '.join(order)}): {wall:.0f} s", flush=True)
        print(_steps_table({**out, "worlds": {str(P): world}}), flush=True)
    return out


def _summary(runs: list[dict], warmup: int) -> dict:
    """Rank 0's medians over the measured steps of every job (each job's first ``warmup`` steps dropped);
    bytes of rank 0 and of the rank that received most."""
    def pooled(rank: int, key: str) -> list[float]:
        return [x for run in runs for x in run["ranks"][rank][key][warmup:]]

    r0 = runs[0]["ranks"][0]
    steps = pooled(0, "step_s")
    out = {"step": statistics.median(steps), "steps_measured": len(steps),
           "step_per_job": [statistics.median(run["ranks"][0]["step_s"][warmup:]) for run in runs]}
    if "communication_s" in r0:
        comm, dec = pooled(0, "communication_s"), pooled(0, "decode_s")
        out["communication"] = statistics.median(comm)
        out["decode"] = statistics.median(dec)
        out["rest"] = statistics.median([t - c - d for t, c, d in zip(steps, comm, dec)])
        out["received_r0"] = statistics.median(pooled(0, "received"))
        out["sent_r0"] = statistics.median(pooled(0, "sent"))
        out["received_max"] = max(statistics.median(pooled(r, "received")) for r in range(len(runs[0]["ranks"])))
    if "allreduce_alone_s" in r0:
        out["allreduce_alone"] = statistics.median(
            [x for run in runs for x in run["ranks"][0]["allreduce_alone_s"][1:]])
    return out


LABELS = {"ddp": "DDP (gloo all-reduce)", "ps": "DRACO PS", "sharded": "DRACO sharded",
          "ps_overlap": "DRACO PS + overlap", "sharded_overlap": "DRACO sharded + overlap"}


def _steps_table(data: dict) -> str:
    warmup = data["warmup"]
    lines = [
        "| P | configuration | step (ms, median) | per job (ms) | communication (ms) | decode (ms) | rest (ms) | vs DDP"
        " | rank 0 received / sent per step (MB) | busiest rank received (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for P, world in data["worlds"].items():
        configs = world["configs"]
        ddp = _summary(configs["ddp"], warmup)["step"] if "ddp" in configs else None
        for name, run in configs.items():
            x = _summary(run, warmup)
            ratio = f"{x['step'] / ddp:.2f}" if ddp else "-"
            if "communication" in x:
                split = f"{x['communication'] * 1e3:.0f} | {x['decode'] * 1e3:.0f} | {x['rest'] * 1e3:.0f}"
                moved = f"{x['received_r0'] / 1e6:.1f} / {x['sent_r0'] / 1e6:.1f} | {x['received_max'] / 1e6:.1f}"
            else:
                d = run[0]["numel"]
                ring = ring_values(int(P)) * d * E / 1e6
                split = f"(all-reduce alone: {x['allreduce_alone'] * 1e3:.0f}) | - | -"
                moved = f"{ring:.1f} / {ring:.1f} (formula) | {ring:.1f} (formula)"
            per_job = ", ".join(f"{s * 1e3:.0f}" for s in x["step_per_job"])
            lines.append(f"| {P} | {LABELS[name]} | {x['step'] * 1e3:.0f} | {per_job} | {split} | {ratio} | {moved} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# report: docs/traffic.md
# --------------------------------------------------------------------------------------------------
def report() -> None:
    measured = json.loads((DOCS / "traffic_bytes.json").read_text())
    proj = json.loads((DOCS / "traffic_projection.json").read_text())
    steps = json.loads((DOCS / "traffic_steps.json").read_text()) if (DOCS / "traffic_steps.json").exists() else None
    text = TEMPLATE.format(
        d=measured["d"], d_mb=measured["d"] * E / 1e6, bytes_command=measured["command"],
        bytes_table=_bytes_table(measured["rows"]),
        checks="\n".join(
            f"- P={r['P']}: every rank's counts equal the formulas: {r['every_rank_matches']}; sharded result bitwise"
            f" equal to PS mode's on every rank: {r['sharded_equals_ps_bitwise']}; nobody caught: {r['nobody_caught']}"
            for r in measured["rows"]),
        alpha_us=proj["alpha_s"] * 1e6, bucket_mb=proj["bucket_mb"], proj_command=proj["command"],
        proj_table=_projection_table(proj),
        steps_section=_steps_section(steps) if steps else "(not run yet: `python benchmarks/traffic.py steps`)",
        cores_section=_cores_section(json.loads(CORES.read_text())) if CORES.exists() else CORES_MISSING,
    )
    (DOCS / "traffic.md").write_text(text)
    print(f"wrote {DOCS / 'traffic.md'}")


def _ratios(steps: dict) -> dict:
    """Step-time ratios measured in the same jobs: per P, overlap / no overlap and sharded / PS."""
    out = {}
    for P, world in steps["worlds"].items():
        med = {name: _summary(runs, steps["warmup"])["step"] for name, runs in world["configs"].items()}
        pairs = {"PS + overlap / PS": ("ps_overlap", "ps"),
                 "sharded + overlap / sharded": ("sharded_overlap", "sharded"), "sharded / PS": ("sharded", "ps"),
                 "PS / DDP": ("ps", "ddp"), "sharded / DDP": ("sharded", "ddp")}
        out[P] = {label: med[a] / med[b] for label, (a, b) in pairs.items() if a in med and b in med}
    return out


def _overlap_pairs(steps: dict) -> str:
    """Per P and mode, each job's median step with overlap over its median without (same job)."""
    parts = []
    for P, world in steps["worlds"].items():
        for label, (on, off) in (("PS", ("ps_overlap", "ps")), ("sharded", ("sharded_overlap", "sharded"))):
            if on in world["configs"] and off in world["configs"]:
                a, b = (_summary(world["configs"][x], steps["warmup"])["step_per_job"] for x in (on, off))
                parts.append(f"P={P} {label} " + ", ".join(f"{x / y:.2f}" for x, y in zip(a, b)))
    return "; ".join(parts)


def _run_fields(steps: dict) -> dict:
    """What the step-time sections say of any run: its table, ratios, job wall times and command arguments."""
    return dict(
        table=_steps_table(steps), worlds=" ".join(steps["worlds"]), repeats=steps["repeats"], cpus=steps["cpus"],
        walls=", ".join(f"P={P}: " + " + ".join(f"{s:.0f}" for s in w["job_wall_s"]) + " s"
                        for P, w in steps["worlds"].items()),
        ratios="\n".join(f"- P={P}: " + "; ".join(f"{k} = {v:.2f}" for k, v in r.items())
                         for P, r in _ratios(steps).items()),
    )


def _steps_section(steps: dict) -> str:
    numel = next(iter(next(iter(steps["worlds"].values()))["configs"].values()))[0]["numel"]
    return STEPS_TEMPLATE.format(
        **_run_fields(steps),
        widths=" -> ".join(map(str, steps["widths"])), numel=numel, mb=numel * E / 1e6,
        batch=steps["batch_per_partition"],
        steps=steps["steps"], warmup=steps["warmup"], bucket_mb=steps["bucket_mb"],
        load=", ".join(f"{x:.1f}" for x in steps["load_average_before"]),
        overlap_pairs=_overlap_pairs(steps),
    )


# Step times measured on a machine with more cores (scripts/gpu_check.sh, GPU_CHECK_STEP_TIMES=1).
CORES = DOCS / "traffic_steps_cores.json"
CORES_MISSING = """## 4. Step time on more cores

Not measured yet: `GPU_CHECK_TESTS=0 GPU_CHECK_TRAINING=0 GPU_CHECK_DECODE=0 GPU_CHECK_STEP_TIMES=1 bash
scripts/gpu_check.sh` on a machine with at least P cores writes docs/traffic_steps_cores.json, and
`python benchmarks/traffic.py report` adds it here.
"""


def _cores_section(cores: dict) -> str:
    ratios = _ratios(cores)
    nine = ratios.get("9", {})
    return CORES_TEMPLATE.format(
        **_run_fields(cores),
        load=", ".join(f"{x:.2f}" for x in cores["load_average_before"]),
        sharded_vs_ps=f"{nine.get('sharded / PS', float('nan')):.2f}",
        overlap_saved="; ".join(
            f"P={P} " + ", ".join(f"{mode} {1 - r[key]:.0%}" for mode, key in
                                  (("PS", "PS + overlap / PS"), ("sharded", "sharded + overlap / sharded")) if key in r)
            for P, r in ratios.items()),
    )


CORES_TEMPLATE = """## 4. Step time on {cpus} CPU cores, measured

The same benchmark on a machine with {cpus} cores and nothing else running (load average {load} when it
started), so that each of the P ranks has a core of its own:
`python benchmarks/traffic.py steps --worlds {worlds} --repeats {repeats} --json docs/traffic_steps_cores.json`
(what `GPU_CHECK_STEP_TIMES=1 bash scripts/gpu_check.sh` runs, with P = 9 only). Job wall time: {walls}.

{table}

Step-time ratios (medians over the same jobs):

{ratios}

**Sharded against PS with a core per rank.** At P = 9 sharded mode's step is {sharded_vs_ps} times PS mode's: the
goal "below PS mode's" is not met on one host with enough cores either. The busiest rank receives a third less
in sharded mode (the last two columns), and its communication time is a little lower, but its "rest" is
higher. On one host every transfer is a copy through the same memory, so the total bytes all ranks move
count, not the busiest rank's: per step about 2(P-1) d values in PS mode and about 2(2s+1)(P-1) d, three times
as many at s = 1, in sharded mode. Where the extra "rest" goes (the vote over 2s+1 copies of every shard, the
shard copies, waiting for the slowest rank) was not profiled. Sharded mode's advantage, the busiest rank's
traffic independent of P, needs ranks on separate hosts, each with its own link: section 2 projects it,
and no multi-host run has measured it.

**What overlap saved with a core per rank** (1 - overlap / no overlap, step medians of the same jobs):
{overlap_saved}. Here the communication thread has cores to run on, so this is the saving the 2-core runs of
section 3 could not measure reliably.
(This section's reading was written for the committed run; the numbers are recomputed by `report`.)
"""


TEMPLATE = """# Traffic per rank: parameter server, sharded decoding, ring all-reduce

Generated by `benchmarks/traffic.py` (`python benchmarks/traffic.py report` redraws this page from
docs/traffic_bytes.json, docs/traffic_projection.json and docs/traffic_steps.json). Three kinds of numbers,
kept apart:

1. **Measured bytes** (exact, deterministic): the payload bytes each rank counted in `ExchangeStats` while
   the exchange hooks ran on one hand-made fp32 bucket in a gloo world of P CPU processes.
2. **Projected time** (a model, nothing run): alpha-beta communication time per step for P up to 1024.
3. **Measured step time** on this machine (2 CPU cores shared with other jobs: noisy).

## 1. Bytes per rank and step, measured (one bucket of d = {d:,} fp32 values = {d_mb:g} MB)

`{bytes_command}` (code "frc", s=1, r=3; PS on rank 0; each hook on its own fresh state). "sent"/"received"
follow the counting rules of lightning_draco/exchange/collectives.py (logical payload, a rank's own share
excluded, outcome vectors and flags included). The formula column is the exact count those rules predict;
"units of d" is received bytes / (4 d). DDP's ring all-reduce is not measured, only its formula.

{bytes_table}

{checks}

PS mode's busiest rank (the PS) receives (P-1) d and sends as much again (the decoded bucket to every
worker): it grows linearly with P. Sharded mode's busiest rank receives 2(2s+1)(P-1)/P d, under the
bound (2(2s+1)+1) d = 7 d, whatever P; it is (2s+1) = 3 times a ring all-reduce's 2(P-1)/P d, the price of
having every shard decoded by 2s+1 ranks and every decoded copy sent to every rank for the vote.

## 2. Communication time per step, projected (alpha-beta model; not measured)

`{proj_command}`. Model: fp32, d values split into {bucket_mb:g} MiB buckets (DDP's default), every
collective of a bucket in sequence, bucket after bucket, no overlap with compute, no decode time; each
collective costs the busiest rank `messages x alpha + max(bytes sent, bytes received) / bandwidth`
(full-duplex links), alpha = {alpha_us:g} us per message, bandwidth 100 Gb/s (12.5 GB/s) or 400 Gb/s
(50 GB/s) each way. Per bucket:

- ring all-reduce: 2(P-1) messages, 2(P-1)/P b values each way;
- DRACO PS (the PS): gather (P-1) messages and (P-1) b received; broadcast of the decoded bucket (P-1)
  messages and (P-1) b sent, as counted (a tree broadcast would shrink this half of the PS's time, not
  the gather's half);
  broadcast of the outcome (1+P int32) the same way;
- sharded: all_to_all (P-1) messages, (2s+1)(P-1)/P b each way; all_gather of the decoded shards (ring,
  P-1 messages) (P-1) ceil((2s+1) b/P) each way; all_gather of the verdicts (P-1) messages and
  (P-1)(2s+1)(1+s) int32 (a status and at most s named ranks per shard); once per step a ring
  all-reduce of 2+2P int32 flags.

P is treated as continuous (FRC needs r | P: 1023 or 1025 ranks in practice, not 1024).

![projected communication time per step](traffic.png)

{proj_table}

Reading it: the ring's and sharded mode's bandwidth terms do not grow with P (sharded: (2s+1) x the
ring's); PS mode's grows as P (the PS's link carries (P-1) d in and out). At large P and small buckets the
latency term takes over for every mode (2(P-1) messages per bucket for the ring, 3(P-1) for the sharded
exchange), which is why production all-reduces use trees or hierarchies there; the model has none for any
mode. The verdicts do not grow with P either: each decoder sends, per shard, its status and the at
most s ranks it caught ((1+s) int32), since a decode that names more than s ranks has failed. Only the
step's agreement (2+2P int32, once per step) grows with P, and it is negligible; so do reactive mode's
detection verdicts, one bit per group of s+1 ranks (1 + ceil(P / (31 (s+1))) int32 per shard: two up to
P = 62 at s = 1).

## 3. Step time on this machine, measured

{steps_section}
{cores_section}"""

STEPS_TEMPLATE = """Command:
`python benchmarks/traffic.py steps --worlds {worlds} --steps {steps} --warmup {warmup} --repeats {repeats}`.
An MLP {widths} ({numel:,} parameters, {mb:.1f} MB of fp32 gradient), synthetic data, batch {batch} per partition
(= per DDP rank), SGD, {bucket_mb} MB DDP buckets, CPU, gloo, one torch thread per rank, {steps} optimizer
steps per configuration, the first {warmup} dropped; every configuration for one P runs in the same set of
P processes, one after the other, and that job is run {repeats} times (a fresh set of processes each time,
the configurations in reverse order the second time). Step time: the wall time between consecutive
`on_train_batch_end`s on rank 0 (the PS in PS mode), median over the measured steps of all jobs ("per job":
each job's own median). communication / decode: medians of the per-step
deltas of rank 0's `exchange_seconds`; rest = step - communication - decode (compute, optimizer, Lightning,
and the hook's own work outside collectives and decode: sharded mode's vote and shard copies are here). With
overlap=True the exchange runs on the communication thread, so its seconds overlap the backward and "rest" is
only the part of the step the exchange did not cover.
Bytes: per-step deltas of `exchange_bytes` (rank 0, and the rank that received most); DDP's from the ring
formula (its all-reduce is not counted), and, in the communication column, one all-reduce of the whole
gradient timed alone after its fit.

**Machine caveat:** {cpus} CPU cores shared with other engineers' jobs (load average {load} when the run
started), P processes time-slicing them; gloo over loopback costs CPU copies, so "communication" here is
mostly CPU time and waiting for other ranks' CPU time, not network. Few steps, {repeats} jobs: differences
under ~20% are noise (compare the two per-job medians). Job wall time: {walls}.

Note on compute: with code "frc" (r=3) every DRACO rank computes the gradients of 3 partitions per step
where a DDP rank computes 1, so DRACO's "rest" is about 3x DDP's compute by design (the redundancy), apart
from the exchange.

{table}

Step-time ratios (medians over the same jobs):

{ratios}

**Sharded against PS here.** On one host, what limits the exchange is not the busiest rank's link but
the total work of all ranks on 2 cores: per step the ranks together copy about 2(P-1) d values through
gloo in PS mode and about 2(2s+1)(P-1) d = 3 times as many in sharded mode (every shard goes to 3
decoders, every decoded copy to every rank), and they decode and vote 3 P d values against the PS's P d.
Sharded mode's advantage, a busiest rank that receives 2(2s+1)(P-1)/P d instead of (P-1) d, only pays
where every rank has its own link and cores. The decode column shows the same effect: sharded mode's
decode seconds are wall time while all P ranks decode at once on 2 cores, whereas in PS mode the PS
decodes alone while the other ranks wait, so each of sharded mode's decodes (a third of the PS's work
per rank at P=9) takes longer in wall time than the PS's whole decode. So the goal "at P=9,
sharded mode's step time below PS mode's" is not met on this machine, and a 2-core host cannot
show it; section 2 projects it for separate hosts (not measured), and section 4 measures it on a host
with a core per rank.

**What overlap saved here.** Per job (same processes, same minutes), overlap / no overlap:
{overlap_pairs}. The medians say overlap saved roughly 0-15% of the step, but the per-step spread of
one configuration (e.g. PS steps from 1.0 to 2.0 s within one job at P=6) is larger than that, so this machine does
not measure it reliably. Where a saving appears it is not hidden network time: the exchange seconds are
the same with and without overlap (same collectives, on another thread), and the P processes keep both
cores busy (gloo's loopback transfers are CPU copies, the decode is CPU work), so the communication thread
competes with the backward for the same cores. Our reading (not measured): what overlap can remove here
is idle time: with the exchange
inside the hook, each rank stops at every bucket until the slowest rank arrives, and a time-sliced rank
is often the slowest; with the communication thread it can go on with its backward meanwhile, so the
cores have fewer idle holes. On separate hosts, overlap can hide at most the backward's compute per step
behind the exchange (about the "rest" of the rows without overlap); that is not measured here.
(This paragraph's reading was written for the committed run; the ratios above are recomputed by
`report`.)
"""


# --------------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_hooks":
        return _hook_world(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if len(sys.argv) > 1 and sys.argv[1] == "_steps":
        return _job(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bytes")
    p.add_argument("--worlds", type=int, nargs="+", default=[6, 9, 12])
    p.add_argument("--d", type=int, default=1_000_000)
    p = sub.add_parser("project")
    p.add_argument("--alpha-us", type=float, default=5.0)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p = sub.add_parser("steps")
    p.add_argument("--worlds", type=int, nargs="+", default=[6, 9])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=str(DOCS / "traffic_steps.json"), help="where the measurements go")
    sub.add_parser("report")
    sub.add_parser("all")
    args = parser.parse_args()
    if args.command in ("bytes", "all"):
        worlds, d = (args.worlds, args.d) if args.command == "bytes" else ([6, 9, 12], 1_000_000)
        bad = [P for P in worlds if P % (2 * S + 1)]
        if bad:
            raise SystemExit(f"code 'frc' with s={S} needs P a multiple of {2 * S + 1} (got {bad}).")
        data = measure_bytes(worlds, d)
        (DOCS / "traffic_bytes.json").write_text(json.dumps(data, indent=1))
        for row in data["rows"]:
            print(f"P={row['P']}: counts match formulas on every rank: {row['every_rank_matches']};"
                  f" sharded == PS bitwise: {row['sharded_equals_ps_bitwise']}")
    if args.command in ("project", "all"):
        alpha, bucket = (args.alpha_us, args.bucket_mb) if args.command == "project" else (5.0, 25.0)
        proj = projection(alpha * 1e-6, bucket, DOCS / "traffic.png")
        (DOCS / "traffic_projection.json").write_text(json.dumps(proj, indent=1))
        print(_projection_table(proj))
    if args.command in ("steps", "all"):
        worlds, steps, warmup, names, repeats = (
            (args.worlds, args.steps, args.warmup, args.configs, args.repeats) if args.command == "steps"
            else ([6, 9], 8, 2, list(CONFIGS), 2))
        data = measure_steps(worlds, steps, warmup, names, repeats)
        Path(args.json if args.command == "steps" else DOCS / "traffic_steps.json").write_text(json.dumps(data, indent=1))
    if args.command in ("report", "all"):
        report()


if __name__ == "__main__":
    main()
