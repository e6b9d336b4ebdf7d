"""Sharded decoding at nine ranks (three groups; each shard decoded by three of the nine ranks).

The six-rank job (test_training.py) runs every attack; here the world is large enough that a
shard's decoders are not a whole group, and a decoder receives less than the parameter server.
"""

import pytest

from jobs import run_job
from scenarios import SCENARIOS

pytestmark = pytest.mark.distributed

NAMES = ["frc9_clean", "sharded9_clean", "sharded9_fixed_reverse", "sharded9_decoder_reverse", "sharded9_fixed_alie",
         "sharded9_rank0_reverse"]
LIAR = {"sharded9_rank0_reverse": "0"}  # the others: rank 4
STEPS = SCENARIOS["frc9_clean"].steps


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    return run_job("digits_job.py", tmp_path_factory.mktemp("sharded9"), NAMES)


@pytest.mark.parametrize("name", NAMES[1:])
def test_nine_ranks_sharded_train_bitwise_the_ps_model(nine, name):
    run = nine[name]
    assert run.get("error") is None, run.get("error")
    assert run["sha"] == nine["frc9_clean"]["sha"]
    assert len({r["sha"] for r in run["ranks"]}) == 1
    assert run["faulty_counts"] == ({} if name == "sharded9_clean" else {LIAR.get(name, "4"): STEPS})


def test_at_nine_ranks_every_decoder_receives_less_than_the_parameter_server(nine):
    sharded = max(r["exchange_bytes"]["received"] for r in nine["sharded9_clean"]["ranks"])
    ps = max(r["exchange_bytes"]["received"] for r in nine["frc9_clean"]["ranks"])
    assert sharded < 0.85 * ps, (sharded, ps)
