"""benchmarks/decode.py on the CPU at a tiny size: its rows, and what ``--profile`` adds to them; and
benchmarks/decode_host.py, the host's work per decode."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


decode = _load("decode")


def test_each_row_catches_the_liar_and_its_profile_counts_the_decodes_operators(tmp_path):
    out = decode.main([
        "--devices", "cpu", "--workers", "6", "--dims", "300", "--repeats", "3",
        "--methods", "aggregator:mean", "code:frc", "code:crc", "code:crc:triton",
        "--profile", str(tmp_path / "profiles"), "--json", str(tmp_path / "rows.json"),
    ])
    rows = {row["method"]: row for row in out["rows"]}
    assert json.loads((tmp_path / "rows.json").read_text())["rows"] == out["rows"]
    for method in ("code:frc", "code:crc", "code:crc:triton"):
        assert rows[method]["caught"] == [rows[method]["liar"]], rows[method]
    for method, row in rows.items():
        # On the CPU nothing is launched or waited for; the operators are the host's work per call.
        assert row["launches"] is None and row["syncs"] is None
        assert row["operators"] > 0 and row["seconds"] > 0
        table = Path(row["profile"]).read_text()
        assert Path(row["profile"]).name == f"cpu-P6-d300-float32-{method.replace(':', '_')}.txt"
        assert table.startswith("3 calls; per call: ") and "aten::" in table
        trace = json.loads(Path(row["profile"]).with_suffix(".trace.json").read_text())
        assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])
    # A decode does more than the mean it is measured against.
    assert rows["code:crc"]["operators"] > rows["aggregator:mean"]["operators"]


def test_the_host_benchmark_walks_each_code_through_its_one_liar_path():
    """benchmarks/decode_host.py: the stubbed pass leads each code down its GPU path (the repetition code
    names worker 4 from the pass's sums, the cyclic code accepts its first set), and the kernels are put
    back afterwards."""
    from lightning_draco.codes import crc_triton, frc_triton

    decode_host = _load("decode_host")
    kernels = frc_triton._compare_and_sum, crc_triton._certify
    out = decode_host.main(["--workers", "6", "15", "--repeats", "3"])
    assert (frc_triton._compare_and_sum, crc_triton._certify) == kernels
    for row in out["rows"]:
        if "skipped" in row:
            pytest.skip(row["skipped"])
        assert row["faulty"] == ([4] if row["code"] == "frc" else []), row
        assert row["host_us"] > 0 and row["operators"] > 0


def test_looped_rows_run_the_looping_passes_and_put_the_unrolled_rows_back(unroll_launches):
    """``code:NAME:looped`` times the Triton passes as they run past 64 rows, at any P: the looped decode
    catches the liar, every launch loops, and the default is restored afterwards; a row whose decode runs no
    Triton pass says so instead of timing it under that name."""
    from lightning_draco.codes import _triton, crc_triton, frc_triton

    if not _triton.available("cpu"):
        pytest.skip("Triton's interpreter is not available here (Triton missing, or a GPU present)")
    unrolled = frc_triton.UNROLLED_ROWS, crc_triton.UNROLLED_ROWS
    out = decode.main(["--devices", "cpu", "--workers", "6", "--dims", "300", "--repeats", "2",
                       "--methods", "code:frc:triton:looped", "code:crc:triton:looped", "code:crc:torch:looped"])
    rows = {row["method"]: row for row in out["rows"]}
    for method in ("code:frc:triton:looped", "code:crc:triton:looped"):
        assert rows[method]["caught"] == [rows[method]["liar"]], rows[method]
    assert "Triton pass" in rows["code:crc:torch:looped"]["skipped"]
    for name in ("frc", "crc"):
        assert unroll_launches[name] and not any(unroll_launches[name]), name
    assert (frc_triton.UNROLLED_ROWS, crc_triton.UNROLLED_ROWS) == unrolled
