"""The host's work around a decode's Triton pass, on the CPU: the fixed time per decode that a GPU adds to the pass.

    python benchmarks/decode_host.py                        # both codes, P in {15, 63}
    python benchmarks/decode_host.py --codes crc --workers 15 --repeats 5001 --json host.json

On a GPU at d = 11.2M the decoders' passes take about the plain mean's time, and what is left of a
decode is the host's work around them: Python, small tensor operations, launches and syncs
(docs/decode_cuda.md, run 7). This measures that work without a GPU. The pass is replaced by a stub
that writes a fixed outcome into the kernel's outputs (every pair equal but one: worker 4 lies
grossly, in the repetition code's group 1; the cyclic code's checks all fit), so that each decode
takes the path it takes on a GPU with one -100x liar; the stub's own time is excluded. Reported per
decode: the median host time (``--repeats`` decodes after a warm-up), and the ATen operators the
host dispatched outside the pass (on a GPU each computing one is a launch, each copy to the host a
sync). The rows are float32, d = 1,024 (the stub reads none of them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_draco.codes import _triton, crc_triton, frc_triton
from lightning_draco.codes.crc import CyclicRepetitionCode
from lightning_draco.codes.frc import FractionalRepetitionCode

LIAR = 4  # worker 4: member 1 of the repetition code's group 1


class _Stub:
    """Stands in for a Triton kernel: ``stub[grid](*args, **constants)`` writes the fixed outcome and adds
    its own time to ``spent``."""

    def __init__(self, write):
        self.write, self.spent, self.paused = write, 0.0, False

    def __getitem__(self, grid):
        def launch(*args, **constants):
            start = time.perf_counter()
            self.paused = True
            try:
                self.write(*args, **constants)
            finally:
                self.paused = False
                self.spent += time.perf_counter() - start
        return launch


def _compared(bits, out, partials, d, member, probe_programs, **c):
    """The repetition code's pass: pairs (0, 1) and (1, 2) of group 1 differ; member 1 there is far."""
    partials.zero_()
    pairs = c["NUM_PAIRS"]
    if pairs:
        partials[0, 1, 0] = partials[0, 1, 2] = 1.0
    if c["MEASURE"]:
        partials[:, :, pairs] = 1.0
        partials[0, 1, pairs + 1 + 1] = 1e6


def _certified(rows, mix, total, squares, checks, d, programs, **c):
    """The cyclic code's pass: every row's squares 1e-3 per block, the checks' 1e-20 (they fit)."""
    squares.fill_(1e-3)
    squares[: c["C"]] = 1e-20


class _Count(TorchDispatchMode):
    def __init__(self, stubs):
        super().__init__()
        self.stubs, self.operators = stubs, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(stub.paused for stub in self.stubs):
            self.operators += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def stubbed():
    """The codes' Triton kernels replaced by the stubs, and Triton's availability faked for the CPU."""
    saved = frc_triton._compare_and_sum, crc_triton._certify, _triton.available
    stubs = _Stub(_compared), _Stub(_certified)
    frc_triton._compare_and_sum, crc_triton._certify = stubs
    _triton.available = lambda device: True
    try:
        yield stubs
    finally:
        frc_triton._compare_and_sum, crc_triton._certify, _triton.available = saved


def measure(name: str, p: int, repeats: int) -> dict:
    """Median host time and operators per decode of code ``name`` at ``p`` workers, the pass stubbed."""
    if _triton.triton is None:
        return {"code": name, "workers": p, "skipped": "Triton is not installed"}
    with stubbed() as stubs:
        code = (FractionalRepetitionCode(p, 1, 3, fused=True, kernel="triton") if name == "frc"
                else CyclicRepetitionCode(p, 1, 3, kernel="triton"))
        received = torch.randn(p, 1024, generator=torch.Generator().manual_seed(0))
        for _ in range(5):
            faulty = code.decode(received).faulty
        times = []
        for _ in range(repeats):
            before = sum(stub.spent for stub in stubs)
            start = time.perf_counter()
            code.decode(received)
            times.append(time.perf_counter() - start - (sum(stub.spent for stub in stubs) - before))
        with _Count(stubs) as count:
            code.decode(received)
    return {"code": name, "workers": p, "host_us": statistics.median(times) * 1e6, "operators": count.operators,
            "faulty": faulty}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--codes", nargs="+", default=["frc", "crc"], choices=["frc", "crc"])
    parser.add_argument("--workers", type=int, nargs="+", default=[15, 63])
    parser.add_argument("--repeats", type=int, default=2001)
    parser.add_argument("--json", help="write the rows here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"torch {torch.__version__}, 1 CPU thread, the pass stubbed, median of {args.repeats}")
    print("| code | P | host per decode (us) | operators | faulty |\n|---|---|---|---|---|")
    for name in args.codes:
        for p in args.workers:
            row = measure(name, p, args.repeats)
            rows.append(row)
            if "skipped" in row:
                print(f"| {name} | {p} | skipped: {row['skipped']} | | |")
            else:
                print(f"| {name} | {p} | {row['host_us']:.1f} | {row['operators']} | {row['faulty']} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
    return {"rows": rows}


if __name__ == "__main__":
    main()
