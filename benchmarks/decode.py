"""Decode and aggregation speed on the parameter server, against the plain mean of the same tensor.

    python benchmarks/decode.py                                  # P in {8, 15, 31}, d in {1M, 11.2M}
    python benchmarks/decode.py --workers 15 --dims 11200000 --methods frc crc none
    python benchmarks/decode.py --json out.json --markdown out.md

For each device (CPU, and CUDA when present), P and d, every code (at s=1, its smallest valid
r; skipped with the reason where the code does not exist at that P) and every aggregator (with
num_byzantine=1) runs on one (P, d) float32 tensor: honest codewords with one random row
replaced by -100x its value. Each figure is the median of ``--repeats`` runs after one
warm-up; ``ratio`` divides it by the median of ``received.mean(0)`` on the same tensor in the
same run. The cyclic code's time includes drawing its projection.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lightning_draco.aggregators import AGGREGATORS, make_aggregator
from lightning_draco.codes import CODES, make_code


def codeword_rows(code, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Honest coded vectors: each worker combines its partitions' gradients the same way."""
    grads = torch.randn(code.num_partitions, d, generator=gen, dtype=dtype)
    received = torch.empty(code.num_workers, d, dtype=dtype)
    for worker in range(code.num_workers):
        row = received[worker]
        row.zero_()
        for weight, partition in zip(code.coefficients(worker), code.partitions(worker)):
            row.add_(grads[partition], alpha=weight)
    return received


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(method: str, p: int, d: int, device: torch.device, repeats: int, gen: torch.Generator) -> dict:
    row = {"method": method, "device": str(device), "workers": p, "dim": d}
    kind, name = method.split(":", 1)
    try:
        code = make_code(name if kind == "code" else "none", p, 1 if kind == "code" and name != "none" else 0)
        rule = make_aggregator(name, 1) if kind == "aggregator" else None
        if rule is not None:
            rule.check(p)
    except ValueError as err:
        return {**row, "skipped": str(err)}
    received = codeword_rows(code, d, torch.float32, gen).to(device)
    liar = int(torch.randint(p, (1,), generator=gen))
    received[liar] *= -100
    mean_s = median_seconds(lambda: received.mean(0), repeats, device)
    projection = torch.Generator(device=device).manual_seed(1)
    if rule is None:
        run = lambda: code.decode(received, generator=projection)  # noqa: E731
    else:
        run = lambda: rule(received)  # noqa: E731
    seconds = median_seconds(run, repeats, device)
    caught = code.decode(received, generator=projection).faulty if rule is None else None
    del received
    return {**row, "liar": liar, "caught": caught, "seconds": seconds, "mean_seconds": mean_s, "ratio": seconds / mean_s}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 15, 31])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 11_200_000])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[f"code:{c}" for c in sorted(CODES)] + [f"aggregator:{a}" for a in sorted(AGGREGATORS)],
        help="code:NAME or aggregator:NAME (bare names are codes)",
    )
    parser.add_argument("--json", help="write all rows here as JSON")
    parser.add_argument("--markdown", help="write the table here as markdown")
    args = parser.parse_args(argv)
    methods = [m if ":" in m else f"code:{m}" for m in args.methods]

    gen = torch.Generator().manual_seed(0)
    rows = []
    for device in map(torch.device, args.devices):
        for p in args.workers:
            for d in args.dims:
                for method in methods:
                    rows.append(bench_one(method, p, d, device, args.repeats, gen))
                    print(_line(rows[-1]), flush=True)
    header = [
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.machine()},"
        f" median of {args.repeats} runs, float32, one liar sending -100x",
        "",
        "| device | P | d | method | seconds | plain mean (s) | ratio | liar -> caught |",
        "|---|---|---|---|---|---|---|---|",
    ]
    table = "\n".join(header + [_line(r) for r in rows])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, f, indent=2)
    return {"rows": rows}


def _line(row: dict) -> str:
    head = f"| {row['device']} | {row['workers']} | {row['dim']:,} | {row['method']} |"
    if "skipped" in row:
        return head + f" skipped: {row['skipped']} | | | |"
    caught = "" if row["caught"] is None else f"{row['liar']} -> {row['caught']}"
    return head + f" {row['seconds']:.4f} | {row['mean_seconds']:.4f} | {row['ratio']:.2f}x | {caught} |"


if __name__ == "__main__":
    main()
