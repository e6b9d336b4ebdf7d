"""Accuracy of the cyclic code's decode under every adversary class, for docs/crc_accuracy.md.

    python benchmarks/crc_accuracy.py [--trials 2] [--dim 2000] [--max-s 10] [--json out.json]
    python benchmarks/crc_accuracy.py --noise 1e-4 --max-s 3     # honest rows as non-deterministic kernels give them

For each P and each s from 1 to min(10, (P-1)//2), float32 gradients: honest rows are formed as
training forms them (``Code.encode``: per-partition gradients combined by Horner's rule in float32),
then s workers (at random, or a contiguous block) lie with each class below, and the decode is
compared with the float64 sum of the true partition gradients. Per cell: wrong totals (relative
error above 1e-5: must be 0), honest workers named (must be 0), liars of more than 1% left unnamed,
decodes that raised although at most s lied (failures), and the largest relative error. Cells the
code refuses for float32 (its conditioning lets a lie under the rounding floor move the sum by more
than 1e-5) say so, with that bound.

Classes: reverse (-100x), nan, sparse (+X and -X at two coordinates, X = 100x the largest entry),
scaled (1 + 3e-4 times the liar's row), scaled_small (1 + 3e-6: about the floor), other_row (another
worker's row), codeword (a random codeword's entries added on the liars' rows), huge_and_small (one
liar sends 1e30, the others 1.01x their row), noise; and honest (nobody lies).

``--noise LEVEL``: every holder of a partition computes its own copy of that partition's gradient,
off by LEVEL (relative, random direction), as non-deterministic kernels give them; the decode then
certifies under the noise it measures, and a total counts as wrong beyond ``1e-5 + (growth + 8 x
exposure) x LEVEL`` (the noise carried through the combiner, plus what a lie under eight measured
noise floors can move it: docs/codes.md).
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from lightning_draco.codes import CyclicRepetitionCode, DracoDecodeError

WORKERS = [3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 16, 17, 19, 21, 24, 25, 31, 32, 33, 45, 63, 64]
CLASSES = ["honest", "reverse", "nan", "sparse", "scaled", "scaled_small", "other_row", "codeword",
           "huge_and_small", "noise"]


def lie(kind: str, code: CyclicRepetitionCode, rows: torch.Tensor, liars: list[int], gen: torch.Generator) -> None:
    p, d = rows.shape
    size = float(rows.abs().max())
    if kind == "codeword":
        rows[liars] += (code.encoding_matrix[liars] @ torch.randn(p, d, dtype=torch.float64, generator=gen)).float()
        return
    for n, liar in enumerate(liars):
        if kind == "reverse":
            rows[liar] *= -100
        elif kind == "nan":
            rows[liar] = math.nan
        elif kind == "sparse":
            a, b = torch.randperm(d, generator=gen)[:2].tolist()
            rows[liar, a] += 100 * size
            rows[liar, b] -= 100 * size
        elif kind == "scaled":
            rows[liar] *= 1 + 3e-4
        elif kind == "scaled_small":
            rows[liar] *= 1 + 3e-6
        elif kind == "other_row":
            rows[liar] = rows[(liar + 1 + n) % p].clone()
        elif kind == "huge_and_small":
            rows[liar] = 1e30 if n == 0 else rows[liar] * 1.01
        elif kind == "noise":
            rows[liar] = torch.randn(d, generator=gen) * size


def cell(p: int, s: int, trials: int, dim: int, noise: float = 0.0) -> dict:
    code = CyclicRepetitionCode(p, s)
    out = {"workers": p, "adversaries": s, "growth": code.growth, "hidden_error": code.hidden_error(torch.float32)}
    limit = 1e-5 + (code.growth + 8 * code.exposure) * noise
    try:
        code.check_wire_dtype(torch.float32)
    except ValueError:
        return {**out, "refused": True}
    counts = dict(decodes=0, wrong=0, honest_named=0, unnamed=0, raised=0)
    worst = 0.0
    for kind in CLASSES:
        for placement in ("random", "contiguous"):
            if kind == "honest" and placement == "contiguous":
                continue
            for trial in range(trials):
                gen = torch.Generator().manual_seed(hash((p, s, kind, placement, trial)) % 2**31)
                grads = torch.randn(p, dim, dtype=torch.float64, generator=gen)
                rows = code.encode(grads, torch.float32, noise=noise, generator=gen)
                honest_rows = rows.clone()
                if kind == "honest":
                    liars = []
                elif placement == "random":
                    liars = sorted(torch.randperm(p, generator=gen)[:s].tolist())
                else:
                    start = int(torch.randint(p, (1,), generator=gen))
                    liars = sorted((start + t) % p for t in range(s))
                lie(kind, code, rows, liars, gen)
                counts["decodes"] += 1
                try:
                    result = code.decode(rows, generator=torch.Generator().manual_seed(trial))
                except DracoDecodeError:
                    counts["raised"] += 1
                    continue
                truth = grads.sum(0)
                error = float((result.total.double() - truth).norm() / truth.norm())
                worst = max(worst, error)
                counts["wrong"] += error > limit
                counts["honest_named"] += bool(set(result.faulty) - set(liars))
                big = {w for w in liars if not bool(torch.isfinite(rows[w]).all())
                       or float((rows[w] - honest_rows[w]).norm()) > 1e-2 * float(honest_rows[w].norm())}
                counts["unnamed"] += bool(big - set(result.faulty))
    return {**out, **counts, "relative_error": worst}


def text(entry: dict) -> str:
    if entry.get("refused"):
        return f"refused ({entry['hidden_error']:.0e})"
    bad = [f"{entry[k]} {label}" for k, label in (("wrong", "wrong"), ("honest_named", "accused"),
                                                  ("raised", "raised"), ("unnamed", "unnamed")) if entry[k]]
    return f"{entry['relative_error']:.0e}" + (" (" + ", ".join(bad) + ")" if bad else "")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=2, help="decodes per class and placement")
    parser.add_argument("--dim", type=int, default=2000)
    parser.add_argument("--max-s", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=WORKERS)
    parser.add_argument("--noise", type=float, default=0.0, help="honest replicas' relative disagreement")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    results = []
    per_cell = (len(CLASSES) * 2 - 1) * args.trials
    print(f"float32 gradients, {per_cell} decodes per cell ({len(CLASSES) - 1} classes x random/contiguous liars"
          f" + honest, {args.trials} each), d={args.dim}: the largest relative error of the total, then any"
          f" wrong totals (> {'1e-5 + (growth + 8 x exposure) x noise' if args.noise else '1e-5'}), honest workers"
          " named, raises and liars left unnamed; refused = the code"
          " refuses float32 here (the bound a lie under the floor could reach)"
          + (f"; honest copies of each partition off by {args.noise:g} (relative)" if args.noise else "") + "\n")
    print("| P | " + " | ".join(f"s={s}" for s in range(1, args.max_s + 1)) + " |")
    print("|---|" + "---|" * args.max_s)
    for p in args.workers:
        cells = []
        for s in range(1, min(args.max_s, (p - 1) // 2) + 1):
            entry = cell(p, s, args.trials, args.dim, args.noise)
            results.append(entry)
            cells.append(text(entry))
        cells += ["-"] * (args.max_s - len(cells))
        print(f"| {p} | " + " | ".join(cells) + " |", flush=True)
    totals = {k: sum(r.get(k, 0) for r in results) for k in ("decodes", "wrong", "honest_named", "raised", "unnamed")}
    if args.noise:
        print("\nlargest error / noise level:", max((r["relative_error"] for r in results if "relative_error" in r),
                                                 default=0.0) / args.noise)
    print(f"\nall accepted cells: {totals}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
