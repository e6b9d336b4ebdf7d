"""Both codes, and reactive redundancy, under ``precision="bf16-mixed"`` (autocast on the CPU): honest
ranks are never named; under gradient accumulation (two micro-batches per optimizer step); and the
cyclic code with honest ranks whose gradients differ by far more than rounding (non-deterministic kernels).

The cyclic code applies its encoding weights between per-partition backwards, so every holder of
a partition computes its gradient with the same bf16 kernels and inputs; its replicas then fit the
code to float32 rounding. Six ranks over gloo, 24 steps (more than one epoch of the digits data).
"""

import math

import pytest

from jobs import run_job, selected_scenarios
from scenarios import SCENARIOS

pytestmark = pytest.mark.distributed
scenarios = pytest.mark.scenarios

NAMES = ["crc1_clean_bf16", "crc1_reverse_bf16", "crc1_sparse_bf16", "frc_bf16_clean", "frc_bf16_reverse",
         "reactive_bf16_clean", "reactive_bf16_all",
         "crc1_clean_acc2", "crc1_reverse_acc2", "frc_acc2_clean", "frc_acc2_reverse",
         "crc1_clean_noise", "crc1_reverse_noise"]
STEPS = SCENARIOS[NAMES[0]].steps


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_job("digits_job.py", tmp_path_factory.mktemp("bf16"), selected_scenarios(request, NAMES))


def relative_distance(params, reference):
    diff = sum((a - b) ** 2 for pa, pb in zip(params, reference) for a, b in zip(pa, pb))
    return math.sqrt(diff / sum(b * b for pb in reference for b in pb))


@scenarios("{name}")
@pytest.mark.parametrize("name", ["crc1_clean_bf16", "frc_bf16_clean", "reactive_bf16_clean"])
def test_no_liar_nobody_named_and_no_step_fails(runs, name):
    run = runs[name]
    assert run.get("error") is None, run.get("error")
    assert run["global_step"] == STEPS
    assert run["faulty_counts"] == {} and run["skipped"] == 0


@scenarios("crc1_{attack}_bf16", "crc1_clean_bf16")
@pytest.mark.parametrize("attack", ["reverse", "sparse"])
def test_cyclic_names_only_the_liar_and_keeps_the_clean_model(runs, attack):
    run, clean = runs[f"crc1_{attack}_bf16"], runs["crc1_clean_bf16"]
    assert run.get("error") is None, run.get("error")
    assert run["faulty_counts"] == {"5": STEPS}
    assert relative_distance(run["params"], clean["params"]) <= 1e-5
    assert len({r["sha"] for r in run["ranks"]}) == 1


@scenarios("frc_bf16_reverse", "frc_bf16_clean")
def test_repetition_code_keeps_the_clean_model_bitwise(runs):
    run = runs["frc_bf16_reverse"]
    assert run.get("error") is None, run.get("error")
    assert run["faulty_counts"] == {"4": STEPS}
    assert run["sha"] == runs["frc_bf16_clean"]["sha"]


@scenarios("crc1_reverse_acc2", "crc1_clean_acc2", "frc_acc2_reverse", "frc_acc2_clean")
def test_gradient_accumulation_keeps_the_clean_model(runs):
    """The weighted step keeps ``.grad`` as the coded gradient over the last weight between micro-batches."""
    crc, clean = runs["crc1_reverse_acc2"], runs["crc1_clean_acc2"]
    for run in (crc, clean, runs["frc_acc2_reverse"]):
        assert run.get("error") is None, run.get("error")
        assert run["global_step"] == STEPS // 2 or run["global_step"] == STEPS
    assert crc["faulty_counts"] == {"5": crc["global_step"]}
    assert relative_distance(crc["params"], clean["params"]) <= 1e-5
    assert runs["frc_acc2_reverse"]["sha"] == runs["frc_acc2_clean"]["sha"]


@scenarios("reactive_bf16_all", "reactive_bf16_clean")
def test_reactive_mode_escalates_only_for_the_liar_and_keeps_the_clean_model_bitwise(runs):
    """Groups of two compare their bf16-autocast replicas bit for bit: without a liar nothing escalates;
    a liar under every gradient attack in turn escalates its group at every step, and only it is named."""
    clean, run = runs["reactive_bf16_clean"], runs["reactive_bf16_all"]
    assert clean["escalations"]["steps"] == 0
    assert run.get("error") is None, run.get("error")
    assert run["faulty_counts"] == {"4": STEPS}
    assert run["escalations"]["steps"] == run["escalations"]["groups"] == STEPS
    assert run["sha"] == clean["sha"]


@scenarios("crc1_clean_noise", "crc1_reverse_noise")
def test_cyclic_code_under_kernel_noise_names_only_the_liar(runs):
    """Every rank's gradients off by its own 2e-5 to 1.2e-4 (relative): each decode measures that noise
    and certifies under it, so without a liar nobody is named and no step fails; with a -100x liar only
    it is named, at every step, and the model stays within the noise of the liar-free run."""
    clean, run = runs["crc1_clean_noise"], runs["crc1_reverse_noise"]
    steps = SCENARIOS["crc1_clean_noise"].steps
    for each in (clean, run):
        assert each.get("error") is None, each.get("error")
        assert each["global_step"] == steps and each["skipped"] == 0
    assert clean["faulty_counts"] == {}
    assert run["faulty_counts"] == {"5": steps}
    assert relative_distance(run["params"], clean["params"]) <= 1e-4  # the noise level
