"""The codes' Triton kernels compiled for a Hopper GPU (sm_90, the H100 and H200) on this machine, no GPU needed.

The other tests run the kernels in Triton's interpreter, which executes their Python: a construct that the
interpreter accepts and the compiler refuses (a loop bound that is not a compile-time constant, a type that
differs between the branches of an ``if``) would pass there and fail on every GPU, where the codes would
fall back to their slower torch passes with a warning. Triton compiles to PTX and runs ``ptxas`` without a
device, so the kernels are compiled here for the layouts the codes launch: group sizes whose pairs fill
one word of counts and several, every wire dtype, with and without the optional outputs, and row counts
up to those timed on a GPU (unrolled) and past them (a loop). ptxas's report says whether a layout spills
registers to local memory, which would make the pass read more than the rows.
"""

import json
import os
import subprocess
import sys

import pytest

from lightning_draco.codes import _triton

# ``d`` is compiled as a 32-bit integer, as Triton specialises it for rows shorter than 2**31 (the kernels
# widen offsets to 64 bits themselves). Run in a fresh interpreter: tests/conftest.py has set TRITON_INTERPRET=1 here, under which a kernel is
# interpreted Python and cannot be compiled.
COMPILE = r"""
import contextlib, io, json, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lightning_draco.codes import crc_triton, frc_triton

TL = {"float32": tl.float32, "bfloat16": tl.bfloat16, "float16": tl.float16, "float64": tl.float64}
POINTER = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float64": "*fp64"}
BITS = {"float32": "*i32", "bfloat16": "*i16", "float16": "*i16", "float64": "*i64"}
target = GPUTarget("cuda", 90, 32)
out = []

def compile_kernel(fn, signature, constants):
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG: Triton prints ptxas's report
        kernel = triton.compile(ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}},
                                          constexprs=constants), target=target)
    report = log.getvalue()
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", report)]
    out.append([len(kernel.asm["cubin"]), registers, spills])

for groups, r, leaders, dtype, summed, measured in json.loads(sys.argv[1]):
    acc = "float64" if dtype == "float64" else "float32"
    pairs = sum(r - 1 - a for a in range(leaders))
    compile_kernel(
        frc_triton._compare_and_sum,
        {"bits": BITS[dtype], "out": POINTER[acc], "partials": POINTER[acc], "d": "i32", "member": "i32",
         "probe_programs": "i32"},
        dict(SUM=summed, MEASURE=measured, GROUPS=groups, R=r, LEADERS=leaders, NUM_PAIRS=pairs,
             FIELD=frc_triton.BLOCK.bit_length(), COLUMNS=max(pairs + (1 + r if measured else 0), 1),
             VALUE=TL[dtype], ACC=TL[acc], SQUARE=TL[acc], BLOCK=frc_triton.BLOCK,
             UNROLL=groups * r <= frc_triton.UNROLLED_ROWS),
    )
for p, checks, dtype, measure, keep in json.loads(sys.argv[2]):
    acc = "float64" if dtype == "float64" else "float32"
    compile_kernel(
        crc_triton._certify,
        {"rows": POINTER[dtype], "mix": POINTER[acc], "total": POINTER[acc], "squares": POINTER[acc],
         "checks": POINTER[acc], "d": "i32", "programs": "i32"},
        dict(P=p, C=checks, CP=max(triton.next_power_of_2(checks), 1), TILE=crc_triton.tile_rows(p, checks),
             ACC=TL[acc], MEASURE=measure, KEEP_CHECKS=keep, BLOCK=crc_triton.BLOCK,
             UNROLL=p <= crc_triton.UNROLLED_ROWS),
    )
print(json.dumps(out))
"""

# (groups, r, leaders, dtype, sum, measure): the fused decode's first pass at r = 3 and r = 5 (all pairs),
# r = 9's first pass (member 0 against the others) and its other pairs (36: several words of counts),
# the per-group pass (no sum) and the winners' sum alone (no pairs).
FRC_LAYOUTS = [
    (5, 3, 2, "float32", True, True),
    (21, 3, 2, "bfloat16", True, True),
    (2, 5, 4, "float64", True, True),
    (1, 9, 1, "float16", True, True),
    (1, 9, 8, "float16", False, False),
    (5, 3, 2, "bfloat16", False, False),
    (5, 3, 0, "float32", True, False),
    (21, 3, 2, "float32", True, True),  # P = 63, the largest timed on a GPU: unrolled
    (32, 3, 2, "bfloat16", True, True),  # P = 96: past frc_triton.UNROLLED_ROWS, a loop over the groups
    (342, 3, 2, "bfloat16", True, True),  # P = 1,026: the same loop, the same code
]
# (P, check rows, dtype, measure, keep checks): s = 1 and s = 3, the first pass (norms measured) and a
# pass that keeps its checks for the Gram matrix.
CRC_LAYOUTS = [
    (15, 2, "float32", True, False),
    (63, 2, "bfloat16", True, False),
    (15, 2, "float16", False, True),
    (9, 6, "float64", True, True),
    (63, 2, "float32", True, False),
    # Past crc_triton.UNROLLED_ROWS, a loop over the tiles: float64, the one dtype the code accepts there.
    (96, 2, "float64", True, True),
    (1025, 2, "float64", True, True),
]


def test_the_kernels_compile_for_hopper_gpus():
    if _triton.triton is None:
        pytest.skip("Triton is not installed (CUDA builds of torch ship it; the CPU setup installs it too)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_ALWAYS_COMPILE="1")  # ptxas's report, also for cached kernels
    done = subprocess.run(
        [sys.executable, "-c", COMPILE, json.dumps(FRC_LAYOUTS), json.dumps(CRC_LAYOUTS)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if done.returncode and "ptxas" in done.stderr and "No such file" in done.stderr:
        pytest.skip(f"Triton's ptxas is missing here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = dict(zip(FRC_LAYOUTS + CRC_LAYOUTS, json.loads(done.stdout.strip().splitlines()[-1])))
    assert len(compiled) == len(FRC_LAYOUTS) + len(CRC_LAYOUTS)
    for layout, (size, registers, spills) in compiled.items():
        assert size > 0 and len(registers) == len(spills) == 1, (layout, registers, spills)
        # A spilled register goes to local memory, through the caches the rows stream through: the pass would
        # read more than the rows.
        assert spills == [0], f"{layout}: {spills[0]} bytes spilled ({registers[0]} registers)"
    # Past the unrolled rows the kernels loop: their code is a fraction of P = 63's and no longer grows with P.
    for layouts in (FRC_LAYOUTS, CRC_LAYOUTS):
        unrolled, looped, far = (compiled[layout][0] for layout in layouts[-3:])
        assert looped < unrolled / 3 and far <= 1.1 * looped, (unrolled, looped, far)
