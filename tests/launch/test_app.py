"""The Hydra app on this machine: the demo, sweeps, and settings refused before any process starts."""

from __future__ import annotations

import pytest

from conftest import BASE, EPOCHS, STEPS, explain, processes_with, read_summary, run_app

pytestmark = pytest.mark.launch


def test_the_demo_catches_the_liar_and_ends_with_the_adversary_free_model(demo, tmp_path):
    output, run_dir, summary = demo
    assert summary["world_size"] == 6
    assert summary["faulty_counts"] == {"4": STEPS} and summary["optimizer_steps"] == STEPS
    assert summary["identical_to_clean"] and summary["param_sha256"] == summary["clean_param_sha256"]
    assert len(summary["val_acc_per_epoch"]) == EPOCHS and summary["final_val_acc"] > 0.8
    assert summary["config"]["attack"]["name"] == "reverse" and summary["skipped_steps"] == 0
    host = summary["caught"][0]["host"]
    assert summary["caught"] == [
        {"rank": 4, "host": host, "times_caught": STEPS, "first_at_step": 0, "before_resume": False}]
    assert summary["quarantined"] == []
    # What the user reads at the end of the run: the rank, and the node to check.
    assert f"caught: rank 4 on host {host} at {STEPS} steps" in output
    assert "model IDENTICAL to the adversary-free run" in output
    assert (run_dir / "logs" / "version_0" / "metrics.csv").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()

    # The run directory's checkpoint cannot be resumed under another world size.
    proc = run_app([*BASE, "trainer.devices=3", "attack.ranks=[2]", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "the checkpoint was written with world_size=6 but this run has world_size=3" in proc.stdout + proc.stderr
    assert not processes_with(str(run_dir))


def test_a_sweep_runs_each_job_as_its_own_launch_in_its_own_directory(tmp_path):
    # Both codes, eight steps each: the sweep is under test, not the training (the demo trains to the end).
    args = ["-m", "code=frc,crc", "attack=reverse", "attack.ranks=[2]", "trainer.devices=3",
            "trainer.max_epochs=1", "trainer.max_steps=8", "trainer.enable_progress_bar=false",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_app(args, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, explain(proc)
    summaries = [read_summary(tmp_path / "sweep" / str(job)) for job in range(2)]
    assert [s["config"]["code"]["name"] for s in summaries] == ["frc", "crc"]
    for summary in summaries:
        assert summary["world_size"] == 3 and summary["optimizer_steps"] == 8
        assert summary["faulty_counts"] == {"2": 8} and summary["skipped_steps"] == 0
        # Eight steps end inside the first epoch: the final accuracy is the final model's, validated at the end.
        assert summary["val_acc_per_epoch"] == [] and 0.1 < summary["final_val_acc"] <= 1.0


# Each row: CLI overrides, and a piece of the one-line message the user gets. One row per layer that
# refuses: Hydra's composition, a missing value, the library's rules.
# ``tests/test_app_config.py`` checks every other refused setting in one process.
REFUSED = [
    (["code=frcc"], "Could not find 'code/frcc'"),
    (["data=cifar10"], "missing mandatory value: data.root (set it: data.root=...)"),
    (["trainer.devices=4"], "needs the redundancy r=3 to divide the number of workers (4)"),
]


@pytest.mark.parametrize("overrides, message", REFUSED, ids=[" ".join(o) for o, _ in REFUSED])
def test_a_bad_setting_is_refused_before_any_process_starts(tmp_path, overrides, message):
    marker = tmp_path / "run"
    proc = run_app([*overrides, f"hydra.run.dir={marker}"], cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr, explain(proc)
    assert "Traceback" not in proc.stdout + proc.stderr, "one sentence, not a stack trace"
    assert not processes_with(str(marker)), "no rank may be left running"
    assert not (marker / "summary.json").exists()
