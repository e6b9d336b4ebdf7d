"""Running a multi-rank job script and reading what its scenarios recorded.

A job (``digits_job.py``, ``lightning_job.py``) runs named scenarios in one set of processes,
since starting the ranks costs more than most scenarios; rank 0 writes one JSON line per finished
scenario. A test reads its scenarios through ``Results``: a scenario the job did not finish fails
that test, by name, with the job's traceback, and the others still pass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


class Results:
    """What a job recorded, by scenario name."""

    def __init__(self, recorded: dict[str, dict], failure: str | None, log: Path):
        self.recorded, self.failure, self.log = recorded, failure, log

    def __getitem__(self, name: str) -> dict:
        if name not in self.recorded:
            why = f"the job ended before it finished (log: {self.log}):\n{self.failure}" if self.failure else (
                "the job was not asked to run it")
            pytest.fail(f"scenario {name!r} has no result: {why}", pytrace=False)
        return self.recorded[name]


def run_job(script: str, folder: Path, names: list[str], timeout: float = 900) -> Results:
    """Run the job ``script`` (next to this file) with the scenarios ``names``, in that order."""
    out = folder / "results.jsonl"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / script), str(out), *names], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=timeout)
    recorded = {}
    if out.exists():
        for line in out.read_text().splitlines():
            result = json.loads(line)
            recorded[result["name"]] = result
    failure = None
    log = folder / "job.log"
    if proc.returncode != 0:
        text = proc.stdout + proc.stderr
        log.write_text(text)
        first = text.find("Traceback")
        failure = text[first : first + 6000] if first >= 0 else text[-6000:]
    return Results(recorded, failure, log)


def selected_scenarios(request: pytest.FixtureRequest, every: list[str]) -> list[str]:
    """The scenarios that the selected tests of the requesting module read, in the order of ``every``.

    A test names them with ``@pytest.mark.scenarios("frc_clean", "frc_fixed_{attack}")``: each is
    formatted with the test's parameters. Running one test runs only the scenarios it reads.
    """
    wanted: set[str] = set()
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        params = item.callspec.params if hasattr(item, "callspec") else {}
        for mark in item.iter_markers("scenarios"):
            wanted.update(name.format(**params) for name in mark.args)
    unknown = wanted - set(every)
    if unknown:
        raise ValueError(f"tests read scenarios that no job defines: {sorted(unknown)}")
    return [name for name in every if name in wanted]
