"""``compare_clean=true``: the app says the model is IDENTICAL to the adversary-free run only when it is, bit for bit.

Single process, no launch.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import train  # noqa: E402


def _one_ulp_apart(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    clean = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).to(dtype)
    attacked = copy.deepcopy(clean)
    with torch.no_grad():
        weight = attacked[0].weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(10.0, dtype=dtype))
    return attacked, clean


def test_a_float64_model_one_ulp_from_the_clean_one_is_not_called_identical():
    # Before: identical_to_clean compared param_sha256, which hashes float32 values; a float64 run of the
    # cyclic code (trainer.precision=64-true) 3.8e-17 from the clean run was reported "model IDENTICAL to the
    # adversary-free run", against the README's "bitwise" meaning of the word.
    attacked, clean = _one_ulp_apart(torch.float64)
    assert train.param_sha256(attacked) == train.param_sha256(clean)  # the hash cannot tell them apart
    verdict = train.compared_to_clean(train.model_values(attacked), train.model_values(clean))
    assert verdict["identical_to_clean"] is False
    assert 0 < verdict["relative_distance_to_clean"] < 1e-15
    summary = {"faulty_counts": {}, "final_val_acc": 0.5, "world_size": 3, "skipped_steps": 0, "optimizer_steps": 6,
               "wall_seconds": 1.0, "param_sha256": train.param_sha256(attacked),
               "clean_param_sha256": train.param_sha256(clean), **verdict}
    from test_app_resume import compose_with

    line = train.report(compose_with("code=crc"), summary, Path("run"))
    assert "model DIFFERENT (relative distance" in line and "IDENTICAL" not in line


def test_identical_means_every_parameter_and_buffer_bit_for_bit():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        attacked, clean = _one_ulp_apart(dtype)
        same = train.compared_to_clean(train.model_values(clean), train.model_values(copy.deepcopy(clean)))
        assert same == {"identical_to_clean": True, "relative_distance_to_clean": 0.0}
        verdict = train.compared_to_clean(train.model_values(attacked), train.model_values(clean))
        assert not verdict["identical_to_clean"]
    # A BatchNorm running statistic is part of the model too (param_sha256 covers it).
    moved = copy.deepcopy(clean)
    moved[1].running_mean[0] += 1.0
    assert not train.compared_to_clean(train.model_values(moved), train.model_values(clean))["identical_to_clean"]
