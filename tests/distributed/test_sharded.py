"""Sharded decoding at nine ranks (three groups; each shard decoded by three of the nine ranks).

The six-rank job (test_training.py) runs every attack; here the world is large enough that a
shard's decoders are not a whole group, and a decoder's traffic is below the parameter server's.
"""

import pytest

from test_training import run_job

pytestmark = pytest.mark.distributed

STEPS = 8
NAMES = ["frc_clean", "sharded_clean", "sharded_fixed_reverse", "sharded_decoder_reverse", "sharded_fixed_alie"]


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    return run_job(tmp_path_factory.mktemp("sharded9"), NAMES, world=9, steps=STEPS)


@pytest.mark.parametrize("name", NAMES[1:])
def test_nine_ranks_sharded_train_bitwise_the_ps_model(nine, name):
    run = nine[name]
    assert run.get("error") is None, run.get("error")
    assert run["sha"] == nine["frc_clean"]["sha"]
    assert len({r["sha"] for r in run["ranks"]}) == 1
    assert run["faulty_counts"] == ({} if name == "sharded_clean" else {"4": STEPS})


def test_at_nine_ranks_every_decoder_receives_less_than_the_parameter_server(nine):
    sharded = max(r["exchange_bytes"]["received"] for r in nine["sharded_clean"]["ranks"])
    ps = max(r["exchange_bytes"]["received"] for r in nine["frc_clean"]["ranks"])
    assert sharded < 0.85 * ps, (sharded, ps)
