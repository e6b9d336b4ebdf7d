"""benchmarks/decode.py on the CPU at a tiny size: its rows, and what ``--profile`` adds to them."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decode.py"
spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(decode)


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
