"""benchmarks/compare.py --merge: a table holds runs of one budget only (single process, no training)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
spec = importlib.util.spec_from_file_location("compare_benchmark_merge", SCRIPT)
compare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare)

ROW = dict(dataset="digits", step=1, wall_seconds=0.1, loss=2.0, accuracy=0.5, compute_seconds=0.1,
           communication_seconds=0.0, decode_seconds=0.0, partition="iid")


def test_merge_refuses_runs_of_another_budget_before_training(tmp_path, monkeypatch):
    # Before: `--merge --steps 40` kept the rows of a 150-step sweep beside its own 40-step rows, and the page
    # called them all "after 150 steps" (the largest step) with the last command's batch size.
    first = [dict(ROW, method=m, attack="none") for m in ("frc", "median")]
    compare.save(tmp_path, "heterogeneity", first, "python benchmarks/compare.py --heterogeneity iid --steps 150")
    rerun = [dict(ROW, method="krum", attack="none")]
    with pytest.raises(ValueError, match="--steps 150 there, 40 now"):
        compare.merged(tmp_path, "heterogeneity", rerun,
                       "python benchmarks/compare.py --heterogeneity iid --steps 40 --merge")
    with pytest.raises(ValueError, match="--batch 16 there, 32 now"):
        compare.merged(tmp_path, "heterogeneity", rerun,
                       "python benchmarks/compare.py --heterogeneity iid --steps 150 --batch 32 --merge")
    records, _ = compare.merged(tmp_path, "heterogeneity", rerun,
                                "python benchmarks/compare.py --heterogeneity iid --steps 150 --methods krum --merge")
    assert sorted(r["method"] for r in records) == ["frc", "krum", "median"]

    def trained(*args, **kwargs):
        raise AssertionError("trained before refusing the merge")

    monkeypatch.setattr(compare, "run", trained)
    with pytest.raises(SystemExit):
        compare.main(["--heterogeneity", "iid", "--steps", "40", "--datasets", "digits", "--methods", "krum",
                      "--attacks", "none", "--merge", "--out", str(tmp_path)])
