"""Decode and aggregation speed on the parameter server, against the plain mean of the same tensor.

    python benchmarks/decode.py                                  # P in {8, 15, 31}, d in {1M, 11.2M}
    python benchmarks/decode.py --workers 15 --dims 11200000 --methods frc crc none
    python benchmarks/decode.py --json out.json --markdown out.md
    python benchmarks/decode.py --workers 15 --dims 4000000 --num-byzantine 3 --peer byzfl \
        --methods aggregator:krum aggregator:median pre:nnm     # against ByzFL, rule by rule

For each device (CPU, and CUDA when present), P, d and dtype (``--dtypes``, default float32),
every code (at s = ``--num-byzantine``, default 1, its smallest valid r; skipped with the reason
where the code does not exist at that P), every aggregator (with ``--num-byzantine`` f) and, when
named, every pre-aggregator (``pre:NAME``) runs on one (P, d) tensor: honest codewords with one
random row replaced by -100x its value. Each figure is the median of ``--repeats`` runs after one
warm-up; ``ratio`` divides it by the median of ``received.mean(0)`` on the same tensor in the same
run; ``GB/s`` is the received tensor's bytes over the method's time (what a single read of the data
at that speed gives). The cyclic code's time includes drawing its projection.
``code:NAME:moving`` alternates between two tensors whose liars differ, so no decode meets the
previous one's liar (the cyclic code certifies the previous decode's honest set in its first pass;
a liar that moves costs it a second pass). ``code:NAME:noisy`` adds independent noise of 1e-4
(relative) to every row, as non-deterministic kernels give honest replicas: the cyclic code then
certifies under the noise it measures, the repetition code votes on whole vectors. ``code:frc:fused`` and
``code:frc:reference`` force the repetition code's fused decode or its block-wise reference (by default
the fused one runs on CUDA only); ``code:frc:triton`` and ``code:frc:compiled`` force the fused decode's
kernel (one Triton pass, or two compiled passes; by default Triton where it runs), ``code:crc:triton`` and
``code:crc:torch`` the cyclic code's certifying pass (one Triton pass, or torch products; by default
Triton on CUDA); ``code:NAME:looped`` makes either code's Triton pass loop over its groups or tiles of rows
at every P (by default it is unrolled up to 64 rows, as timed on an H100, and loops beyond; the row is
skipped where no Triton pass runs). Figures exclude compiling, which the warm-up pays.
``aggregator:NAME:network`` and ``aggregator:NAME:sort`` force the order-statistics engine of the median,
trimmed mean and Meamed (by default a sorting network on the CPU up to 128 rows, ``torch.sort`` elsewhere).

    python benchmarks/decode.py --devices cuda --workers 15 63 --dims 11200000 100000000 \
        --dtypes float32 bfloat16 --methods code:frc code:frc:reference code:crc aggregator:median

``--profile DIR`` also runs each method ``--repeats`` more times under ``torch.profiler`` and writes,
per row, ``DIR/<device>-P<P>-d<d>-<dtype>-<method>.txt``: the operators by their own time (on the
GPU's side where the row ran on CUDA) and, beside it as ``.trace.json``, the calls' timeline (host calls
and device kernels; open it in Perfetto or chrome://tracing). The row gains ``launches`` and ``syncs`` per call (kernel
launches, and the host's waits for the device: stream and device synchronizations and blocking copies)
and ``operators`` (ATen operators the host dispatched, nested ones included). At small ``d`` those are
the fixed work of a decode, whatever the device:

    python benchmarks/decode.py --devices cuda --workers 15 --dims 11200000 --methods aggregator:mean \
        code:frc code:crc --repeats 11 --profile profiles

``--peer byzfl`` adds ByzFL's time for the same rule on the same tensor in the same process, and
``vs peer`` (ours / ByzFL's). ByzFL is a development extra, never a dependency of the package:
``pip install --no-deps byzfl==0.0.11`` (it needs numpy and scipy; ``--no-deps`` keeps pip from
replacing torch). The geometric median is compared per Weiszfeld iteration (ByzFL runs a fixed
3 from zero; ours runs to a tolerance from the mean, its start counted in).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import types

import torch

from lightning_draco.aggregators import AGGREGATORS, make_aggregator, make_pre_aggregator
from lightning_draco.codes import CODES, _triton, crc_triton, frc_triton, make_code


def codeword_rows(
    code, d: int, dtype: torch.dtype, gen: torch.Generator, device: torch.device = torch.device("cpu")
) -> torch.Tensor:
    """Honest coded vectors: each worker combines its partitions' gradients the same way.

    Built on ``device`` one partition gradient at a time (float32, then cast to ``dtype``), so that
    P = 63, d = 1e8 fits beside the received tensor; every worker adds its partitions in increasing
    order, so the members of a repetition group are bitwise equal.
    """
    seed = int(torch.randint(2**62, (1,), generator=gen))
    draw = torch.Generator(device=device).manual_seed(seed)
    received = torch.zeros(code.num_workers, d, dtype=torch.float32, device=device)
    holders = {}
    for worker in range(code.num_workers):
        for weight, partition in zip(code.coefficients(worker), code.partitions(worker)):
            holders.setdefault(partition, []).append((worker, weight))
    for partition in sorted(holders):
        grad = torch.randn(d, generator=draw, device=device)
        for worker, weight in holders[partition]:
            received[worker].add_(grad, alpha=weight)
        del grad
    return received if dtype == torch.float32 else received.to(dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# CUDA runtime and driver calls as the profiler names them: a kernel launch, and a host wait on the device.
_LAUNCHES = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel"}
_SYNCS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def profile_calls(fn, calls: int, device: torch.device, path: str) -> dict:
    """``fn`` called ``calls`` times under ``torch.profiler`` (after one warm-up call): its operators by their
    own time written to ``path``, its timeline (host calls and device kernels, for chrome://tracing or
    Perfetto) beside it as ``.trace.json``; per call, the kernel launches, host waits and ATen operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    events = prof.key_averages()
    counted = {
        "launches": sum(e.count for e in events if e.key in _LAUNCHES) / calls if cuda else None,
        "syncs": sum(e.count for e in events if e.key in _SYNCS) / calls if cuda else None,
        "operators": sum(e.count for e in events if e.key.startswith("aten::")) / calls,
    }
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    with open(path, "w") as f:
        f.write(f"{calls} calls; per call: {counted}\n\n")
        f.write(events.table(sort_by=sort, row_limit=40, max_name_column_width=60) + "\n")
    prof.export_chrome_trace(path.removesuffix(".txt") + ".trace.json")
    return counted


def load_byzfl() -> types.ModuleType:
    """ByzFL's aggregators module. Its package ``__init__`` also imports its training framework
    (torchvision, pandas): when those are absent, load the aggregators alone under a bare package."""
    spec = importlib.util.find_spec("byzfl")
    if spec is None:
        raise SystemExit("--peer byzfl needs ByzFL installed: pip install --no-deps byzfl==0.0.11")
    try:
        return importlib.import_module("byzfl.aggregators")
    except ImportError:
        for name in [m for m in sys.modules if m == "byzfl" or m.startswith("byzfl.")]:
            del sys.modules[name]
        package = types.ModuleType("byzfl")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["byzfl"] = package
        return importlib.import_module("byzfl.aggregators")


def byzfl_counterpart(byzfl: types.ModuleType, kind: str, name: str, f: int):
    """ByzFL's object for the same rule with the same parameters, or None where it has none."""
    table = {
        ("aggregator", "mean"): lambda: byzfl.Average(),
        ("aggregator", "median"): lambda: byzfl.Median(),
        ("aggregator", "trimmed_mean"): lambda: byzfl.TrMean(f=f),
        ("aggregator", "krum"): lambda: byzfl.Krum(f=f),
        ("aggregator", "multi_krum"): lambda: byzfl.MultiKrum(f=f),
        ("aggregator", "centered_clipping"): lambda: byzfl.CenteredClipping(tau=100.0, L=1),
        ("aggregator", "geometric_median"): lambda: byzfl.GeometricMedian(T=3),
        ("aggregator", "mda"): lambda: byzfl.MDA(f=f),
        ("aggregator", "monna"): lambda: byzfl.MoNNA(f=f),
        ("aggregator", "meamed"): lambda: byzfl.Meamed(f=f),
        ("pre", "nnm"): lambda: byzfl.NNM(f=f),
        ("pre", "bucketing"): lambda: byzfl.Bucketing(s=2),
        ("pre", "arc"): lambda: byzfl.ARC(f=f),
        ("pre", "clipping"): lambda: byzfl.Clipping(c=1.0),
    }
    make = table.get((kind, name))
    return make() if make is not None else None


# Peer rules that overwrite the tensor they are given (ours never modify their input).
_PEER_WRITES_ITS_INPUT = {("pre", "clipping"), ("pre", "arc")}


def bench_one(method: str, p: int, d: int, device: torch.device, repeats: int, gen: torch.Generator,
              f: int = 1, peer: types.ModuleType | None = None, dtype: torch.dtype = torch.float32,
              profile_dir: str | None = None) -> dict:
    row = {"method": method, "device": str(device), "workers": p, "dim": d, "dtype": str(dtype).removeprefix("torch.")}
    kind, name = method.split(":", 1)
    name, *flags = name.split(":")
    moving = "moving" in flags
    noise = 1e-4 if "noisy" in flags else 0.0
    if noise and dtype in (torch.bfloat16, torch.float16):
        return {**row, "skipped": "noise of 1e-4 is below half precision's rounding: nothing to measure"}
    try:
        code = make_code(name if kind == "code" else "none", p, f if kind == "code" and name != "none" else 0)
        kernels = [flag for flag in flags if flag in ("triton", "compiled", "torch")]
        if kernels:
            if kernels[0] not in getattr(code, "kernels", ()):
                raise ValueError(f"code {name!r} has no kernel {kernels[0]!r}")
            code.kernel = kernels[0]
        if "fused" in flags or "reference" in flags or (kernels and hasattr(code, "fused")):
            if not hasattr(code, "fused"):
                raise ValueError(f"code {name!r} has no fused decode")
            code.fused, code.batched = ("reference" not in flags), (False if "reference" in flags else code.batched)
        if "looped" in flags and not _runs_triton(code, device, dtype):
            raise ValueError("looped times a code's Triton pass: it needs Triton on this device and the code's"
                             " triton kernel (the default on CUDA; code:NAME:triton elsewhere)")
        rule = None
        if kind == "aggregator":
            engines = [flag for flag in flags if flag in ("network", "sort")]
            rule = make_aggregator(name, f, **({"engine": engines[0]} if engines else {}))
            rule.check(p)
        elif kind == "pre":
            rule = make_pre_aggregator({"name": name, "threshold": 1.0} if name == "clipping" else name, f)
            rule.check(p)
    except ValueError as err:
        return {**row, "skipped": str(err)}
    try:
        with _looped() if "looped" in flags else contextlib.nullcontext():
            return _measure(row, code, rule, kind, name, moving, p, d, device, repeats, gen, f, peer, dtype, noise,
                            profile_dir)
    except torch.OutOfMemoryError as err:
        return {**row, "skipped": f"out of memory ({str(err).splitlines()[0][:80]})"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _runs_triton(code, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``code`` decodes ``dtype`` rows on ``device`` through its Triton pass, as the code itself
    chooses (the repetition code's fused kernel, the cyclic code's certifying pass)."""
    if not _triton.available(device):
        return False
    if hasattr(code, "_triton_here"):
        return code._triton_here(device, dtype)
    if hasattr(code, "_fused_kernel"):
        return code._fused_kernel(torch.empty(0, device=device, dtype=dtype)) == "triton"
    return False


@contextlib.contextmanager
def _looped():
    """The codes' Triton passes loop over their rows at every P (``code:NAME:looped``)."""
    unrolled = frc_triton.UNROLLED_ROWS, crc_triton.UNROLLED_ROWS
    frc_triton.UNROLLED_ROWS = crc_triton.UNROLLED_ROWS = 0
    try:
        yield
    finally:
        frc_triton.UNROLLED_ROWS, crc_triton.UNROLLED_ROWS = unrolled


def _measure(row, code, rule, kind, name, moving, p, d, device, repeats, gen, f, peer, dtype, noise=0.0,
             profile_dir=None) -> dict:
    received = codeword_rows(code, d, dtype, gen, device)
    for i in range(p) if noise else ():  # one row at a time: no second (P, d) tensor
        size = float(received[i].double().norm()) / d**0.5
        received[i] += (noise * size * torch.randn(d, generator=gen).to(device)).to(dtype)
    liar = int(torch.randint(p, (1,), generator=gen))
    if moving:  # the liar alternates between two ranks, so no decode finds the previous one's suspects
        other = received.clone()
        other[(liar + p // 2) % p] *= -100
    received[liar] *= -100
    mean_s = median_seconds(lambda: received.mean(0), repeats, device)
    projection = torch.Generator(device=device).manual_seed(1)
    if rule is None and moving:
        turn = [received, other]
        run = lambda: code.decode(turn.reverse() or turn[0], generator=projection)  # noqa: E731
    elif rule is None:
        run = lambda: code.decode(received, generator=projection)  # noqa: E731
    else:
        run = lambda: rule(received)  # noqa: E731
    seconds = median_seconds(run, repeats, device)
    caught = code.decode(received, generator=projection).faulty if rule is None else None
    gbps = received.numel() * received.element_size() / seconds / 1e9
    out = {**row, "liar": liar, "caught": caught, "seconds": seconds, "mean_seconds": mean_s, "ratio": seconds / mean_s,
           "gb_per_s": gbps, "mean_gb_per_s": received.numel() * received.element_size() / mean_s / 1e9}
    if profile_dir is not None:
        os.makedirs(profile_dir, exist_ok=True)
        label = f"{device.type}-P{p}-d{d}-{row['dtype']}-{row['method'].replace(':', '_')}"
        out["profile"] = os.path.join(profile_dir, label + ".txt")
        out.update(profile_calls(run, repeats, device, out["profile"]))
    counterpart = byzfl_counterpart(peer, kind, name, f) if peer is not None else None
    if counterpart is not None:
        try:
            out.update(_measure_peer(counterpart, kind, name, rule, seconds, received, repeats, device))
        except Exception as err:  # noqa: BLE001 - the peer's failure is a row's finding, not the run's end
            out["peer_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:100] if str(err).strip() else ''}"
    return out


def _measure_peer(counterpart, kind, name, rule, seconds, received, repeats, device) -> dict:
    """ByzFL's time for the same rule on the same tensor, and ours against it."""
    out = {}
    if (kind, name) in _PEER_WRITES_ITS_INPUT:
        # ByzFL clips the caller's rows in place: time it on a fresh copy, as ours returns a new tensor.
        peer_seconds = median_seconds(lambda: counterpart(received.clone()), repeats, device)
        out["peer_note"] = "copy included: ByzFL clips its input in place"
    else:
        peer_seconds = median_seconds(lambda: counterpart(received), repeats, device)
    out["peer_seconds"] = peer_seconds
    if name == "geometric_median":
        out["iterations"], out["peer_iterations"] = rule.iterations, counterpart.T
        out["vs_peer"] = (seconds / rule.iterations) / (peer_seconds / counterpart.T)
    else:
        out["vs_peer"] = seconds / peer_seconds
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 15, 31])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 11_200_000])
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16", "float64"]
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[f"code:{c}" for c in sorted(CODES)] + [f"aggregator:{a}" for a in sorted(AGGREGATORS)],
        help="code:NAME, aggregator:NAME or pre:NAME (a pre-aggregator alone); bare names are codes",
    )
    parser.add_argument("--num-byzantine", type=int, default=1, help="f of every aggregator and pre-aggregator")
    parser.add_argument("--peer", choices=["byzfl"], help="also time the peer library's rule on the same tensor")
    parser.add_argument("--json", help="write all rows here as JSON")
    parser.add_argument("--markdown", help="write the table here as markdown")
    parser.add_argument("--profile", metavar="DIR", help="also profile each method; its tables go here")
    args = parser.parse_args(argv)
    methods = [m if ":" in m else f"code:{m}" for m in args.methods]

    peer = load_byzfl() if args.peer == "byzfl" else None
    gen = torch.Generator().manual_seed(0)
    rows = []
    for device in map(torch.device, args.devices):
        for p in args.workers:
            for d in args.dims:
                for dtype in args.dtypes:
                    for method in methods:
                        rows.append(bench_one(method, p, d, device, args.repeats, gen, args.num_byzantine, peer,
                                              getattr(torch, dtype), args.profile))
                        print(_line(rows[-1], peer is not None), flush=True)
                        write(args, rows, peer is not None)  # after every row: a run stopped midway keeps them
    return {"rows": rows}


def write(args, rows: list, with_peer: bool) -> None:
    """The table so far to ``--markdown`` and ``--json``, where named."""
    gpu = next((torch.cuda.get_device_name(0) for dev in args.devices if dev.startswith("cuda")), None)
    header = [
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {platform.machine()}"
        + (f", {gpu}" if gpu else "")
        + f", median of {args.repeats} runs, one liar sending -100x, f={args.num_byzantine}"
        + (", ByzFL 0.0.11 alongside (vs peer: ours / ByzFL's; geometric median per iteration)" if with_peer else ""),
        "",
        "| device | P | d | dtype | method | seconds | plain mean (s) | ratio | GB/s (mean's) | liar -> caught |"
        + (" ByzFL (s) | vs peer |" if with_peer else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_peer else ""),
    ]
    table = "\n".join(header + [_line(r, with_peer) for r in rows])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "peer": args.peer, "rows": rows}, f, indent=2)


def _line(row: dict, with_peer: bool = False) -> str:
    head = f"| {row['device']} | {row['workers']} | {row['dim']:,} | {row.get('dtype', 'float32')} | {row['method']} |"
    if "skipped" in row:
        return head + f" skipped: {row['skipped']} | | | | |" + (" | |" if with_peer else "")
    caught = "" if row["caught"] is None else f"{row['liar']} -> {row['caught']}"
    bandwidth = f"{row['gb_per_s']:.1f} ({row['mean_gb_per_s']:.1f})" if "gb_per_s" in row else ""
    line = head + f" {row['seconds']:.4g} | {row['mean_seconds']:.4g} | {row['ratio']:.2f}x | {bandwidth} | {caught} |"
    if with_peer:
        if "peer_error" in row:
            return line + f" | failed: {row['peer_error']} |"
        if "peer_seconds" not in row:
            return line + " | |"
        iters = f" ({row['iterations']} vs {row['peer_iterations']} iterations)" if "iterations" in row else ""
        iters += f" ({row['peer_note']})" if "peer_note" in row else ""
        line += f" {row['peer_seconds']:.4g} | {row['vs_peer']:.2f}x{iters} |"
    return line


if __name__ == "__main__":
    main()
