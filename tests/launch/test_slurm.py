"""A real two-node SLURM cluster on this machine (scripts/slurm_cluster.sh): sbatch, requeue, submitit.

Skipped, with the reason, where SLURM's Debian packages cannot be installed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (APP, BASE, EPOCHS, ROOT, STEPS, STEPS_PER_EPOCH, app_env, explain, read_summary, run_app,
                      wait_for)

pytestmark = pytest.mark.launch
CLUSTER = ROOT / "scripts" / "slurm_cluster.sh"
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=600)
    if started.returncode == 3:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stdout + started.stderr
    env = app_env(SLURM_CONF=str(folder / "slurm.conf"), PYTHON=sys.executable, DRACO_APP=str(APP))
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], timeout=60)


def slurm_cmd(env: dict, *args: str) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def job_field(env: dict, job: str, field: str) -> str:
    text = slurm_cmd(env, "scontrol", "show", "job", job)
    return next(word.split("=", 1)[1] for word in text.split() if word.startswith(f"{field}="))


def submit(env: dict, cwd, *overrides: str) -> str:
    return slurm_cmd(env, "sbatch", "--parsable", f"--chdir={cwd}", "--output=job-%j.out", str(SBATCH), *overrides)


def finished(env: dict, job: str) -> bool:
    return job_field(env, job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def requeued_job(slurm: dict, tmp_path, *overrides: str) -> tuple[str, Path]:
    """Submit the sbatch script, send it the time limit's signal once it has checkpointed, wait until the
    requeued job has ended, COMPLETED; return the job id and its run directory. Each wait names the stage it
    got stuck in."""
    job = submit(slurm, tmp_path, *BASE, *overrides)
    run_dir = tmp_path / "outputs" / f"slurm-{job}"
    assert wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), timeout=300), "training never started"
    # What SLURM sends --signal=SIGUSR1@90 before the time limit.
    slurm_cmd(slurm, "scancel", "--signal=USR1", job)
    assert wait_for(lambda: job_field(slurm, job, "Restarts") == "1", timeout=120, every=0.5), "the job was not requeued"
    # The first run's steps wind down before the job is pending again (its state passes through
    # others meanwhile); SLURM then holds it for a while before it may start: let it start soon. Not
    # at once: a node refuses to launch a job in the same second its previous run was killed (it
    # compares the new credential with the revocation in whole seconds: "Job credential revoked").
    assert wait_for(lambda: job_field(slurm, job, "JobState") == "PENDING", timeout=120, every=0.5)
    slurm_cmd(slurm, "scontrol", "update", f"JobId={job}", "StartTime=now+2")
    assert wait_for(lambda: finished(slurm, job), timeout=400, every=1)
    assert job_field(slurm, job, "JobState") == "COMPLETED", (tmp_path / f"job-{job}.out").read_text()[-5000:]
    return job, run_dir


def test_sbatch_on_two_nodes_requeued_mid_epoch_trains_the_model_of_the_local_run(slurm, tmp_path, reference):
    """One job covers both paths a user's sbatch takes: the first run on two nodes, and the run after a
    requeue (the time limit's signal) that resumes inside an epoch."""
    job, run_dir = requeued_job(slurm, tmp_path)
    summary = read_summary(run_dir)
    assert summary["world_size"] == 6 and summary["config"]["trainer"]["num_nodes"] == 2
    assert summary["resumed_from"] == str(run_dir / "hpc_ckpt_1.ckpt")
    step = summary["resumed_from_step"]
    assert 0 < step < STEPS and step % STEPS_PER_EPOCH != 0, "resumed inside an epoch"
    assert summary["param_sha256"] == reference["param_sha256"]
    assert summary["faulty_counts"] == {"4": STEPS} and len(summary["val_acc_per_epoch"]) == EPOCHS


def test_a_requeue_with_the_parameter_server_on_the_second_node_resumes_with_its_state(slurm, tmp_path):
    """The PS on rank 3 (node2) writes its secret beside rank 0's requeue checkpoint, under the same name, and
    the requeued job reads it back there: no "is missing" warning, and the model of the uninterrupted local
    run with the PS on rank 3 (whose buffers, copied to every rank, are the model's)."""
    job, run_dir = requeued_job(slurm, tmp_path, "code.ps_rank=3")
    summary = read_summary(run_dir)
    assert summary["resumed_from"] == str(run_dir / "hpc_ckpt_1.ckpt")
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_1.ckpt.ps"]
    assert "is missing" not in (tmp_path / f"job-{job}.out").read_text()
    local = run_app([*BASE, "code.ps_rank=3", f"hydra.run.dir={tmp_path / 'local'}"], cwd=tmp_path)
    assert local.returncode == 0, explain(local)
    assert summary["param_sha256"] == read_summary(tmp_path / "local")["param_sha256"]
    assert summary["faulty_counts"] == {"4": STEPS}


def test_a_sweep_through_the_submitit_launcher(slurm, tmp_path, reference):
    args = ["-m", "hydra/launcher=draco_slurm", "trainer.devices=3", "trainer.num_nodes=2", *BASE,
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = run_app(args, cwd=tmp_path, timeout=400, **{k: slurm[k] for k in ("SLURM_CONF",)})
    assert proc.returncode == 0, explain(proc)
    summary = read_summary(tmp_path / "sweep" / "0")
    assert summary["world_size"] == 6
    assert summary["param_sha256"] == reference["param_sha256"]
