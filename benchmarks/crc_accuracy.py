"""Accuracy of the cyclic code's decode, for the README's table.

    python benchmarks/crc_accuracy.py [--trials 5] [--dim 4000] [--json out.json]

For each P and each s from 1 to (P-1)//2, and each wire dtype (float32, bfloat16): honest
coded vectors W G are rounded to the wire dtype, s random workers send -100x theirs, and the
decode is compared with the float64 sum of the true partition gradients. A cell gives the
worst relative error over the trials and whether every adversary was located in every
trial; "refused" where the code refuses that dtype at that (P, s) (its rounding growth is too
large), "failed k/n" where the decode raised instead of answering.
"""

from __future__ import annotations

import argparse
import json

import torch

from lightning_draco.codes import CyclicRepetitionCode, DracoDecodeError

WORKERS = [3, 5, 6, 7, 8, 9, 12, 15, 16, 31, 32, 45, 64]


def cell(code: CyclicRepetitionCode, dtype: torch.dtype, trials: int, dim: int) -> dict:
    try:
        code.check_wire_dtype(dtype)
    except ValueError:
        return {"refused": True, "growth": code.growth}
    worst, located, failed = 0.0, True, 0
    p, s = code.num_workers, code.num_adversaries
    for trial in range(trials):
        gen = torch.Generator().manual_seed(1000 * p + 10 * s + trial)
        grads = torch.randn(p, dim, dtype=torch.float64, generator=gen)
        received = (code.encoding_matrix @ grads).to(dtype)
        liars = sorted(torch.randperm(p, generator=gen)[:s].tolist())
        received[liars] *= -100
        try:
            result = code.decode(received, generator=torch.Generator().manual_seed(trial))
        except DracoDecodeError:
            failed += 1
            continue
        truth = grads.sum(0)
        worst = max(worst, float((result.total.double() - truth).norm() / truth.norm()))
        located &= result.faulty == liars
    return {"relative_error": worst, "located": located, "failed": failed, "trials": trials, "growth": code.growth}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--dim", type=int, default=4000)
    parser.add_argument("--max-s", type=int, default=None, help="largest s per P (default: (P-1)//2)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        print(f"\n{name} on the wire: worst relative error over {args.trials} trials; * = an adversary missed;"
              " refused = the code refuses this dtype here; failed = decode raised\n")
        print("| P | " + " | ".join(f"s={s}" for s in range(1, 11)) + " | larger s |")
        print("|---|" + "---|" * 11)
        for p in WORKERS:
            cells, beyond = [], []
            for s in range(1, min(args.max_s or p, (p - 1) // 2) + 1):
                entry = cell(CyclicRepetitionCode(p, s), dtype, args.trials, args.dim)
                results.append({"dtype": name, "workers": p, "adversaries": s, **entry})
                if entry.get("refused"):
                    text = "refused"
                elif entry["failed"]:
                    text = f"failed {entry['failed']}/{entry['trials']}"
                else:
                    text = f"{entry['relative_error']:.0e}" + ("" if entry["located"] else "*")
                (cells if s <= 10 else beyond).append(text if s <= 10 else f"{s}: {text}")
            cells += ["-"] * (10 - len(cells))
            summary = _summarise(beyond)
            print(f"| {p} | " + " | ".join(cells) + f" | {summary} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _summarise(beyond: list[str]) -> str:
    if not beyond:
        return "-"
    first, last = beyond[0].split(":")[0], beyond[-1].split(":")[0]
    kinds = sorted({b.split(": ")[1] if not b.split(": ")[1][0].isdigit() else "ok" for b in beyond})
    return f"s={first}..{last}: " + ", ".join(kinds)


if __name__ == "__main__":
    main()
