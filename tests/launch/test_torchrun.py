"""The app under torchrun: two node agents on loopback, restarts after kill -9, and no hang on a stalled rank."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import APP, BASE, CRC, app_env, kill_all, processes_with, read_summary, wait_for
from forked_ranks import free_port

pytestmark = pytest.mark.launch
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(job: str, *, nnodes: int, nproc: int, extra: tuple = ()) -> list[str]:
    return [
        *TORCHRUN, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={job}", *extra, str(APP),
    ]


# The default code, whose single-launcher reference the restart and SLURM tests share (the cyclic code
# runs under the app in test_app.py's sweep).
@pytest.mark.parametrize("code", ["frc"])
def test_two_node_agents_train_the_model_of_the_single_launcher_run(tmp_path, reference, code):
    command = torchrun(f"two-{code}", nnodes=2, nproc=3) + BASE + (CRC if code == "crc" else [])
    command += ["trainer.devices=3", "trainer.num_nodes=2"]
    agents = [subprocess.Popen(command, cwd=tmp_path, env=app_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=400)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    # Every rank of both agents used the job's directory, named after the rendezvous id.
    summary = read_summary(tmp_path / "outputs" / f"torchrun-two-{code}")
    assert summary["world_size"] == 6 and summary["config"]["trainer"]["num_nodes"] == 2
    expected = reference(code)
    assert summary["param_sha256"] == expected["param_sha256"]
    assert summary["faulty_counts"] == expected["faulty_counts"] == {"4": 64}


def test_a_killed_worker_then_a_killed_parameter_server_restart_the_job_from_its_last_checkpoint(tmp_path, reference):
    """One job loses a worker (rank 3) in its first attempt and the parameter server (rank 0) in its second;
    each restart resumes from the last checkpoint, and the job still ends with the uninterrupted model."""
    job = "kill"
    command = torchrun(job, nnodes=1, nproc=6, extra=("--max-restarts=2",)) + BASE
    # A restart reuses the agent's store, where the first attempt's addresses linger (torch issue 135712).
    env = app_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    agent = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    checkpoint = tmp_path / "outputs" / f"torchrun-{job}" / "checkpoints" / "last.ckpt"

    def saved_since(attempt: int, before: int) -> bool:
        """A checkpoint written after ``before`` (ns) while the ranks of ``attempt`` run."""
        running = processes_with(f"TORCHELASTIC_RUN_ID={job}", f"TORCHELASTIC_RESTART_COUNT={attempt}")
        # The checkpoint appears whole: it is written beside it and renamed into place.
        return bool(running) and checkpoint.exists() and checkpoint.stat().st_mtime_ns > before

    try:
        written = 0
        for attempt, victim in enumerate((3, 0)):
            assert wait_for(lambda: saved_since(attempt, written), timeout=240), f"attempt {attempt} never trained"
            pids = processes_with(f"TORCHELASTIC_RUN_ID={job}", f"RANK={victim}", f"TORCHELASTIC_RESTART_COUNT={attempt}")
            assert len(pids) == 1
            os.kill(pids[0], signal.SIGKILL)
            if attempt == 0:
                # Once every rank of the first attempt is gone, a newer checkpoint can only be the second's.
                gone = lambda: not processes_with(f"TORCHELASTIC_RUN_ID={job}", "TORCHELASTIC_RESTART_COUNT=0")  # noqa: E731
                assert wait_for(gone, timeout=120), "the first attempt outlived its killed rank"
                written = checkpoint.stat().st_mtime_ns
        output = agent.communicate(timeout=400)[0]
    finally:
        agent.kill()
    assert agent.returncode == 0, output[-6000:]
    summary = read_summary(checkpoint.parents[1])
    # Checkpoints every 4 steps: the second attempt wrote one at least 4 steps past the first's.
    assert 8 <= summary["resumed_from_step"] < 64, "the last attempt resumed from the second attempt's checkpoint"
    assert summary["resumed_from"].endswith("last.ckpt")
    expected = reference("frc")
    assert summary["param_sha256"] == expected["param_sha256"]
    assert summary["faulty_counts"] == {"4": 64} and summary["optimizer_steps"] == 64


def test_a_stalled_rank_fails_the_job_within_the_timeout_instead_of_hanging(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    # A 10 s collective timeout: the rendezvous has its own (startup_timeout, at least 5 minutes),
    # so six processes importing torch on two busy cores still join.
    command = [sys.executable, str(APP), *BASE, "trainer.max_epochs=1000", "timeout_s=10", f"hydra.run.dir={run_dir}"]
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=tmp_path, env=app_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), timeout=240), "training never started"
        stalled = processes_with(str(run_dir), "LOCAL_RANK=3")
        assert len(stalled) == 1
        os.kill(stalled[0], signal.SIGSTOP)  # alive, holding its sockets, answering nothing
        started = time.monotonic()
        job.wait(timeout=120)
        waited = time.monotonic() - started
        assert wait_for(lambda: not processes_with(str(run_dir)), timeout=10), "every rank of the job has ended"
    finally:
        job.kill()
        kill_all(processes_with(str(run_dir)))
    output = log.read_text()
    assert job.returncode != 0
    assert waited < 80, f"the job took {waited:.0f} s to fail with timeout_s=10"
    # The rank that timed out first said so in one line when it happened (the launcher may end it before
    # its traceback is printed): the exchange's own words, or, where another collective waited, why it stopped.
    said = re.search(r"rank \d+: the gradient exchange's .+? got no answer within the collective timeout \(10 s\)"
                     r"|rank \d+ stopped at step \d+: \w+: .*(timed out|timeout)", output, re.IGNORECASE)
    assert said, output[-4000:]
    assert not (run_dir / "summary.json").exists()
