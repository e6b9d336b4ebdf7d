"""DracoStrategy through Lightning's LightningCLI: every argument from flags or a YAML config, refusals, one real fit."""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from unittest import mock

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs the dev extra's jsonargparse[signatures]")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import LightningCLI  # noqa: E402
from torch import nn  # noqa: E402

import lightning_draco  # noqa: E402,F401
from lightning_draco import DracoStrategy  # noqa: E402
from lightning_draco.aggregators import Aggregator  # noqa: E402

HERE = Path(__file__).parent
BASE = ["--trainer.accelerator=cpu", "--trainer.devices=3", "--trainer.logger=false"]
STRATEGY = "--trainer.strategy=lightning_draco.DracoStrategy"


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 2)


def strategy_from(*args: str) -> DracoStrategy:
    """Parse and instantiate as the CLI does (no process starts: the Trainer is only built)."""
    with mock.patch.object(sys, "argv", ["cli"]):  # pytest's own arguments are not the CLI's
        cli = LightningCLI(Net, run=False, save_config_callback=None, seed_everything_default=False, args=[*BASE, *args])
    return cli.trainer.strategy


def test_every_repetition_code_argument_from_flags():
    s = strategy_from(
        STRATEGY,
        "--trainer.strategy.code=frc",
        "--trainer.strategy.num_adversaries=1",
        "--trainer.strategy.redundancy=3",
        "--trainer.strategy.ps_rank=1",
        "--trainer.strategy.adversary={ranks: [2], attack: gaussian, seed: 4, sigma: 2.0}",
        "--trainer.strategy.tolerance=0.0",
        "--trainer.strategy.on_decode_failure=skip",
        "--trainer.strategy.max_faulty_steps=5",
        "--trainer.strategy.seed=3",
        "--trainer.strategy.projection_secret=11",
        "--trainer.strategy.check_finite=false",
        "--trainer.strategy.broadcast_buffers=false",
        "--trainer.strategy.timeout=60",
        "--trainer.strategy.bucket_cap_mb=1",
        "--trainer.strategy.process_group_backend=gloo",
        "--trainer.strategy.start_method=popen",
    )
    assert isinstance(s, DracoStrategy)
    assert (s.config.code, s.num_adversaries, s.redundancy, s.ps_rank) == ("frc", 1, 3, 1)
    assert s.adversary.ranks == (2,) and s.adversary.attack_name == "gaussian" and s.adversary.seed == 4
    assert s.adversary.options == {"sigma": 2.0}
    c = s.config
    assert (c.tolerance, c.on_decode_failure, c.max_faulty_steps, s.seed, c.projection_secret) == (0.0, "skip", 5, 3, 11)
    assert c.check_finite is False and c.broadcast_buffers is False
    assert s._timeout == timedelta(seconds=60) and s._ddp_kwargs["bucket_cap_mb"] == 1
    assert s._process_group_backend == "gloo" and s._start_method == "popen"


def test_aggregator_arguments_from_flags():
    s = strategy_from(
        STRATEGY,
        "--trainer.strategy.code=none",
        "--trainer.strategy.aggregator=trimmed_mean",
        "--trainer.strategy.aggregator_options={num_byzantine: 1}",
        "--trainer.strategy.aggregate_over=bucket",
    )
    assert isinstance(s.aggregator, Aggregator) and type(s.aggregator).__name__ == "TrimmedMean"
    assert s.aggregator.num_byzantine == 1 and s.config.aggregate_over == "bucket" and s.config.code == "none"


def test_a_yaml_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  strategy:
    class_path: lightning_draco.DracoStrategy
    init_args:
      code: crc
      num_adversaries: 1
      adversary:
        ranks: random
        attack: reverse
        seed: 9
      on_decode_failure: skip
"""
    )
    s = strategy_from(f"--config={config}")
    assert (s.config.code, s.config.on_decode_failure) == ("crc", "skip")
    assert s.adversary.ranks == "random" and s.adversary.seed == 9


@pytest.mark.parametrize("value", ["lightning_draco.DracoStrategy", "draco", "draco_find_unused_parameters_true"])
def test_the_strategy_by_class_path_or_name_alone(value):
    s = strategy_from(f"--trainer.strategy={value}")
    assert isinstance(s, DracoStrategy) and (s.config.code, s.num_adversaries) == ("frc", 1)


@pytest.mark.parametrize(
    "flag, sentence",
    [
        (
            "--trainer.strategy.ddp_comm_hook=torch.distributed.algorithms.ddp_comm_hooks.default_hooks.allreduce_hook",
            "ddp_comm_hook cannot be set on DracoStrategy: its communication is DRACO's own hook.",
        ),
        ("--trainer.strategy.redundancy=2", "redundancy must be at least 2 * num_adversaries + 1 = 3"),
        ("--trainer.strategy.on_decode_failure=ignore", "on_decode_failure must be one of raise, skip (got 'ignore')."),
    ],
)
def test_a_real_value_or_a_broken_rule_is_refused_with_the_librarys_sentence(flag, sentence):
    with pytest.raises(ValueError) as caught:
        strategy_from(STRATEGY, flag)
    assert sentence in str(caught.value)


@pytest.mark.distributed
def test_a_real_fit_from_a_yaml_config_on_three_ranks(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        """
trainer:
  accelerator: cpu
  devices: 3
  max_steps: 3
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  strategy:
    class_path: lightning_draco.DracoStrategy
    init_args:
      num_adversaries: 1
      adversary: {ranks: [2], attack: reverse}
model:
  hidden: 6
"""
    )
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "DRACO_CLI_OUT": str(out)}
    proc = subprocess.run(
        [sys.executable, str(HERE / "distributed" / "cli_app.py"), "fit", f"--config={config}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads(out.read_text())
    assert result["strategy"] == "DracoStrategy" and result["code"] == "frc" and result["adversary_ranks"] == [2]
    assert result["global_step"] == 3 and result["faulty_counts"] == {"2": 3} and result["hook_calls"] >= 3
