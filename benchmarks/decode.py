"""Decode speed on the parameter server: plain mean vs each code's decoder, on one (P, d) tensor.

    python benchmarks/decode.py                     # P=15, d=11.2M (ResNet-18 size), fp32, CPU
    python benchmarks/decode.py --workers 6 --dim 1000000 --json out.json

Each row is the median of ``--repeats`` runs after one warm-up; ``ratio`` is that median over
the median of ``received.mean(0)`` on the same tensor, measured in the same run. The received
rows are honest codewords (what honest workers send) with ``--liars`` rows replaced by
``-100 x`` their value, on ranks drawn at random.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=15, help="P, the number of received rows")
    parser.add_argument("--dim", type=int, default=11_200_000, help="d, the gradient length")
    parser.add_argument("--adversaries", type=int, default=1, help="s (each code uses its smallest r)")
    parser.add_argument("--liars", type=int, default=1, help="rows replaced by -100x their value")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--codes", nargs="*", default=sorted(CODES))
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name in args.codes:
        s = args.adversaries if name != "none" else 0
        try:
            code = make_code(name, args.workers, s)
        except ValueError as err:
            rows.append({"method": f"{name} decode", "skipped": str(err)})
            continue
        received = codeword_rows(code, args.dim, dtype, gen).to(device)
        liars = torch.randperm(args.workers, generator=gen)[: min(args.liars, s)].tolist()
        received[liars] *= -100
        mean_s = median_seconds(lambda: received.mean(0), args.repeats, device)
        proj = torch.Generator(device=device).manual_seed(1)
        decode_s = median_seconds(lambda: code.decode(received, generator=proj), args.repeats, device)
        found = code.decode(received, generator=proj).faulty
        rows.append(
            {
                "method": f"{name} decode",
                "code": repr(code),
                "liars": sorted(liars),
                "caught": found,
                "mean_seconds": mean_s,
                "seconds": decode_s,
                "ratio": decode_s / mean_s,
            }
        )
    result = {
        "workers": args.workers,
        "dim": args.dim,
        "dtype": args.dtype,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "rows": rows,
    }
    print(f"P={args.workers} d={args.dim} {args.dtype} on {device} ({torch.get_num_threads()} threads), median of {args.repeats}")
    print("| method | seconds | plain mean (s) | ratio to mean | liars -> caught |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "skipped" in row:
            print(f"| {row['method']} | skipped: {row['skipped']} | | | |")
        else:
            print(
                f"| {row['method']} | {row['seconds']:.4f} | {row['mean_seconds']:.4f} | {row['ratio']:.2f}x |"
                f" {row['liars']} -> {row['caught']} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
