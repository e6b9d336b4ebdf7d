"""The cyclic code in training: gloo, CPU, several buckets, a fixed projection secret.

For each world size P and adversary count s, the last s ranks lie with each attack; the final
parameters must be within relative 1e-5 (in norm) of the adversary-free run, and the caught
ranks must be exactly the liars at every step.
"""

import math

import pytest

from test_training import run_job

pytestmark = pytest.mark.distributed

STEPS = 12
ATTACKS = ["reverse", "nan", "gaussian", "collude"]
# s = 1 at six ranks is trained by test_precision.py and the app tests.
CONFIGS = [(5, 2), (6, 2), (7, 3)]


@pytest.fixture(scope="module", params=CONFIGS, ids=[f"P{p}-s{s}" for p, s in CONFIGS])
def cyclic(request, tmp_path_factory):
    p, s = request.param
    names = [f"crc{s}_clean"] + [f"crc{s}_{a}" for a in ATTACKS]
    return p, s, run_job(tmp_path_factory.mktemp(f"crc{p}_{s}"), names, world=p, steps=STEPS)


def relative_distance(params, reference):
    diff = sum((a - b) ** 2 for pa, pb in zip(params, reference) for a, b in zip(pa, pb))
    norm = sum(b * b for pb in reference for b in pb)
    return math.sqrt(diff / norm)


def test_cyclic_training_under_attack_matches_the_clean_run(cyclic):
    p, s, runs = cyclic
    clean = runs[f"crc{s}_clean"]
    assert clean["global_step"] == STEPS and clean["faulty_counts"] == {}
    assert clean["hook_calls"] >= 1 + 3 * (STEPS - 1), "at least three buckets per step"
    for attack in ATTACKS:
        run = runs[f"crc{s}_{attack}"]
        assert run.get("error") is None, (attack, run.get("error"))
        assert run["finite"], attack
        assert relative_distance(run["params"], clean["params"]) <= 1e-5, attack
        assert run["faulty_counts"] == {str(r): STEPS for r in range(p - s, p)}, attack
        assert len({r["sha"] for r in run["ranks"]}) == 1, "every rank holds the same model"


def test_a_fixed_secret_makes_runs_reproducible(cyclic):
    p, s, runs = cyclic
    # reverse and nan liars are erased or located identically; the decoded sums agree bitwise.
    assert runs[f"crc{s}_reverse"]["sha"] == runs[f"crc{s}_nan"]["sha"]
