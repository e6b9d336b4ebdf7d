"""A ``-m`` sweep job runs as a single run of the app with the job's overrides and the sweep's config
directories (single process: the command is built, not run)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train  # noqa: E402


def hydra_config(sources: list[dict], hydra_overrides: list[str]):
    return OmegaConf.create({
        "runtime": {"output_dir": "/tmp/sweep/0", "config_sources": sources},
        "job": {"config_name": "config", "num": 0},
        "overrides": {"task": ["model=tiny", "seed=3"], "hydra": hydra_overrides},
    })


def test_a_sweep_job_keeps_the_config_directories_of_the_sweep():
    # Before: `python examples/train.py -m --config-dir=MYCONF model=tiny` failed in every job with
    # "Could not find 'model/tiny'" (the job's command lost --config-dir), though the same single run worked;
    # a --config-path of the user's own was lost too, and the jobs composed conf/ instead, silently.
    sources = [
        {"path": "hydra.conf", "schema": "pkg", "provider": "hydra"},
        {"path": "/my/primary", "schema": "file", "provider": "main"},
        {"path": "/my/extra", "schema": "file", "provider": "command-line"},
        {"path": "", "schema": "structured", "provider": "schema"},
    ]
    command = train.sweep_command(hydra_config(sources, ["hydra.searchpath=[file:///my/more]", "hydra.verbose=true"]))
    assert "--config-path=/my/primary" in command and "--config-dir=/my/extra" in command
    assert "hydra.searchpath=[file:///my/more]" in command and "hydra.verbose=true" not in command
    assert command[-5:-2] == ["model=tiny", "seed=3", "hydra.searchpath=[file:///my/more]"]
    assert command.index("--config-name=config") < command.index("model=tiny")
    assert command[-2:] == ["hydra.run.dir=/tmp/sweep/0", "hydra.output_subdir=null"]
