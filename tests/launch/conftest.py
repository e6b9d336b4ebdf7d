"""Helpers for running the example app (examples/train.py) the way users launch it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "train.py"
# 4 epochs of 8 steps on the 6-rank digits default; last.ckpt every 4 steps for the restart tests.
EPOCHS, STEPS_PER_EPOCH = 4, 8
STEPS = EPOCHS * STEPS_PER_EPOCH
BASE = ["trainer.enable_progress_bar=false", f"trainer.max_epochs={EPOCHS}", "checkpoint.every_n_train_steps=4",
        "loggers=[csv]"]


#: What a launcher sets in the processes it runs. A single-rank fit run inside this pytest worker by an earlier test
#: leaves them in its environment; a launch that inherited LOCAL_RANK would take its ranks for started elsewhere.
LAUNCHER_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "RANK", "WORLD_SIZE", "GROUP_RANK",
                      "LOCAL_WORLD_SIZE")


def app_env(**extra: str) -> dict[str, str]:
    inherited = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    return {**inherited, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **extra}


def run_app(args: list[str], cwd: Path, timeout: float = 300, prefix: Optional[list[str]] = None, **env: str):
    """Run the app (or ``prefix`` + app, e.g. torchrun) and return the finished process."""
    command = [*(prefix or [sys.executable]), str(APP), *args]
    return subprocess.run(command, cwd=cwd, env=app_env(**env), capture_output=True, text=True, timeout=timeout)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def explain(proc: subprocess.CompletedProcess) -> str:
    text = proc.stdout + proc.stderr
    first = text.find("Traceback")
    return text[first : first + 5000] if first >= 0 else text[-5000:]


def processes_with(*needles: str) -> list[int]:
    """Live PIDs whose environment holds every ``KEY=value`` needle and whose command line holds the others."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = set((entry / "environ").read_bytes().decode(errors="replace").split("\0"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and all((n in environ) if "=" in n else (n in cmdline) for n in needles):
            found.append(int(entry.name))
    return found


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo (``make demo``) on the launch tests' settings, run once per session: its output, its run
    directory and its summary. Its model is the one every other launcher must train (the liar changes
    nothing), so the torchrun and SLURM tests compare theirs with it.

    Under pytest-xdist the launch modules run on different workers: the first to ask runs the demo in
    the session's shared folder, the others wait for it there.
    """
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the session's folder, above each worker's own
    folder = shared / "demo"
    with FileLock(str(shared / "demo.lock")):
        said = folder / "said.json"
        if not said.exists():
            folder.mkdir(exist_ok=True)
            try:
                proc = run_app([*BASE, "compare_clean=true", f"hydra.run.dir={folder / 'run'}"], cwd=folder)
                ran = {"returncode": proc.returncode, "output": proc.stdout, "why": explain(proc)}
            except subprocess.TimeoutExpired as timeout:  # every test that needs it fails with this, not only the first
                ran = {"returncode": None, "output": "", "why": f"the demo did not end: {timeout}"}
            said.write_text(json.dumps(ran))
        run = json.loads(said.read_text())
    assert run["returncode"] == 0, run["why"]
    return run["output"], folder / "run", read_summary(folder / "run")


@pytest.fixture(scope="session")
def reference(demo) -> dict:
    """The summary of the single-launcher run of ``BASE`` (the default code, rank 4 lying)."""
    return demo[2]
