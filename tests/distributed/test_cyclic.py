"""The cyclic code in training: gloo, CPU, several buckets, a fixed projection secret.

For each world size P and adversary count s (one job each), the last s ranks lie with each
attack; the final parameters must be within relative 1e-5 (in norm) of the adversary-free run,
and the caught ranks must be exactly the liars at every step.
"""

import math

import pytest

from jobs import run_job
from scenarios import CYCLIC, CYCLIC_ATTACKS, SCENARIOS, cyclic_name

pytestmark = pytest.mark.distributed

STEPS = SCENARIOS[cyclic_name(*CYCLIC[0], None)].steps


@pytest.fixture(scope="module", params=CYCLIC, ids=[f"P{p}-s{s}" for p, s in CYCLIC])
def cyclic(request, tmp_path_factory):
    p, s = request.param
    names = [cyclic_name(p, s, attack) for attack in [None, *CYCLIC_ATTACKS]]
    return p, s, run_job("digits_job.py", tmp_path_factory.mktemp(f"crc{p}_{s}"), names)


def relative_distance(params, reference):
    diff = sum((a - b) ** 2 for pa, pb in zip(params, reference) for a, b in zip(pa, pb))
    norm = sum(b * b for pb in reference for b in pb)
    return math.sqrt(diff / norm)


def test_the_clean_run_names_nobody_and_exchanges_several_buckets(cyclic):
    p, s, runs = cyclic
    clean = runs[cyclic_name(p, s, None)]
    assert clean.get("error") is None, clean.get("error")
    assert clean["global_step"] == STEPS and clean["faulty_counts"] == {}
    assert clean["hook_calls"] >= 1 + 3 * (STEPS - 1), "at least three buckets per step"


@pytest.mark.parametrize("attack", CYCLIC_ATTACKS)
def test_cyclic_training_under_attack_matches_the_clean_run(cyclic, attack):
    p, s, runs = cyclic
    clean, run = runs[cyclic_name(p, s, None)], runs[cyclic_name(p, s, attack)]
    assert run.get("error") is None, run.get("error")
    assert run["finite"]
    assert relative_distance(run["params"], clean["params"]) <= 1e-5
    assert run["faulty_counts"] == {str(r): STEPS for r in range(p - s, p)}
    assert len({r["sha"] for r in run["ranks"]}) == 1, "every rank holds the same model"


def test_a_fixed_secret_makes_runs_reproducible(cyclic):
    p, s, runs = cyclic
    # reverse and nan liars are erased or located identically; the decoded sums agree bitwise.
    assert runs[cyclic_name(p, s, "reverse")]["sha"] == runs[cyclic_name(p, s, "nan")]["sha"]
