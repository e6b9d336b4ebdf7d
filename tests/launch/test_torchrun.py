"""The app under torchrun: two node agents on loopback that restart after kill -9, and no hang on a stalled rank."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import APP, BASE, STEPS, app_env, kill_all, processes_with, read_summary, wait_for
from forked_ranks import free_port

pytestmark = pytest.mark.launch
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def torchrun(job: str, *, nnodes: int, nproc: int, extra: tuple = ()) -> list[str]:
    return [
        *TORCHRUN, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={job}", *extra, str(APP),
    ]


def test_two_node_agents_restart_after_a_killed_worker_then_a_killed_parameter_server(tmp_path, reference):
    """Two node agents (3 ranks each) run one job. It loses a worker (rank 3, on the second node) in its
    first attempt and the parameter server (rank 0, on the first) in its second; both nodes restart from
    the last checkpoint each time, and the job still ends with the single launcher's uninterrupted model."""
    job = f"kill-{os.getpid()}"  # the ranks are found by it: unique to this test session
    command = torchrun(job, nnodes=2, nproc=3, extra=("--max-restarts=3",)) + BASE
    command += ["trainer.devices=3", "trainer.num_nodes=2"]
    # A restart reuses the agent's store, where the first attempt's addresses linger (torch issue 135712).
    env = app_env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    agents = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for _ in range(2)]
    run_dir = tmp_path / "outputs" / f"torchrun-{job}"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"

    def ranks() -> list[int]:
        """The job's ranks: processes the agents started (the agents themselves were not)."""
        return processes_with(f"TORCHELASTIC_RUN_ID={job}")

    def saved_by(attempt: set[int], before: int) -> bool:
        """All six ranks of ``attempt`` (pids) run, and a checkpoint newer than ``before`` (ns) exists."""
        # The checkpoint appears whole: it is written beside it and renamed into place.
        return len(attempt) == 6 and checkpoint.exists() and checkpoint.stat().st_mtime_ns > before

    try:
        written, old = 0, set()
        for victim in (3, 0):
            # Each attempt's ranks are new processes: those of the attempts before have all ended.
            assert wait_for(lambda: saved_by(set(ranks()) - old, written), timeout=300), f"no attempt killed rank {victim}"
            current = set(ranks())
            pids = [p for p in processes_with(f"TORCHELASTIC_RUN_ID={job}", f"RANK={victim}") if p in current]
            assert len(pids) == 1
            os.kill(pids[0], signal.SIGKILL)
            # Once every rank of this attempt is gone, a newer checkpoint can only be the next one's.
            assert wait_for(lambda: not (set(ranks()) & current), timeout=120), "an attempt outlived its killed rank"
            written, old = checkpoint.stat().st_mtime_ns, old | current
        outputs = [agent.communicate(timeout=400)[0] for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
        kill_all(ranks())
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    # Every rank of both agents used the job's directory, named after the rendezvous id.
    summary = read_summary(run_dir)
    assert summary["world_size"] == 6 and summary["config"]["trainer"]["num_nodes"] == 2
    # Checkpoints every 4 steps: the last attempt resumed from one the second attempt wrote.
    assert 8 <= summary["resumed_from_step"] < STEPS, "the last attempt resumed from the second attempt's checkpoint"
    assert summary["resumed_from"].endswith("last.ckpt")
    assert summary["param_sha256"] == reference["param_sha256"]
    assert summary["faulty_counts"] == {"4": STEPS} and summary["optimizer_steps"] == STEPS


def test_a_stalled_rank_fails_the_job_within_the_timeout_instead_of_hanging(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.log"
    # A 10 s collective timeout: the rendezvous has its own (startup_timeout, at least 5 minutes),
    # so processes importing torch on two busy cores still join. Three ranks, one of them stalled.
    command = [sys.executable, str(APP), *BASE, "trainer.devices=3", "attack.ranks=[2]", "trainer.max_epochs=1000",
               "timeout_s=10", f"hydra.run.dir={run_dir}"]
    with open(log, "w") as out:
        job = subprocess.Popen(command, cwd=tmp_path, env=app_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), timeout=240), "training never started"
        stalled = processes_with(str(run_dir), "LOCAL_RANK=1")
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
