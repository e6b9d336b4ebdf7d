"""The exchange hooks on hand-made buckets in a six-rank gloo world (no DDP, no Lightning); a rank that
stalls or dies in a three-rank one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_draco.exchange.collectives import CollectiveFailedError, failure_message, timed


WORLD = 6
pytestmark = pytest.mark.distributed


def run_world(out: Path, device: str = "cpu") -> list[dict]:
    """What each rank of hook_world.py saw (``device``: where its reactive runs keep their buckets)."""
    env = {**os.environ, "HOOK_WORLD_DEVICE": device}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    script = Path(__file__).with_name("hook_world.py")
    world = subprocess.run([sys.executable, str(script), str(out), str(WORLD)], env=env, timeout=300)
    assert world.returncode == 0
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> list[dict]:
    return run_world(tmp_path_factory.mktemp("hooks"))


def test_every_rank_gets_the_exact_mean_and_the_traffic_the_formulas_give(seen):
    bucket, outcome = 10 * 8, (1 + WORLD) * 4  # float64 values; int32 status and flags
    for rank, ranks_view in enumerate(seen):
        result, mean, caught, buckets, sent, received = ranks_view["honest"]
        torch.testing.assert_close(result, mean, rtol=1e-12, atol=1e-12)
        assert caught == [] and buckets == 1
        if rank == 0:  # the PS receives every other rank's bucket and broadcasts result and outcome
            assert (sent, received) == ((WORLD - 1) * (bucket + outcome), (WORLD - 1) * bucket)
        else:
            assert (sent, received) == (bucket, bucket + outcome)


def test_a_liar_wrapped_around_the_exchange_is_corrected_and_caught_on_every_rank(seen):
    for ranks_view in seen:
        result, mean, caught = ranks_view["liar"]
        torch.testing.assert_close(result, mean, rtol=1e-12, atol=1e-12)
        assert caught == [WORLD - 1]


def test_sharded_decoding_gives_bitwise_the_parameter_servers_result_whoever_lies(seen):
    for ranks_view in seen:
        reference, runs = ranks_view["sharded"]
        for name in ("clean", "both", "gradient", "decoder", "rank0"):
            assert torch.equal(runs[name][0], reference), name


def test_sharded_decoding_names_liars_in_each_role_and_no_one_else(seen):
    for ranks_view in seen:
        runs = ranks_view["sharded"][1]
        assert runs["clean"][1:3] == ([], [])
        assert runs["both"][1:3] == ([4], [4])
        assert runs["gradient"][1:3] == ([4], []), "a liar only about its gradient decodes honestly"
        assert runs["decoder"][1:3] == ([4], [4]), "a liar only as a decoder is outvoted and named"
        assert runs["rank0"][1:3] == ([0], [0]), "rank 0 is no parameter server here: outvoted and named"


def test_a_liar_can_neither_keep_its_name_out_of_the_sharded_verdict_nor_frame_an_honest_rank(seen):
    """It withholds its own flags and raises an honest rank's when the ranks agree on the step."""
    assert all(ranks_view["lying_report"] == ([4], [4]) for ranks_view in seen)


def test_more_than_s_liars_fail_the_sharded_step_on_every_rank(seen):
    failures = [ranks_view["sharded"][1]["two"][3] for ranks_view in seen]
    assert all("more than s=1" in f or "lied" in f for f in failures), failures


def test_sharded_traffic_per_rank_is_the_formula_and_does_not_grow_with_p(seen):
    d, s, item = 53, 1, 8
    bounds = [k * d // WORLD for k in range(WORLD + 1)]
    length = [bounds[k + 1] - bounds[k] for k in range(WORLD)]
    sizes = [sum(length[(j - 2 * s + u) % WORLD] for u in range(2 * s + 1)) for j in range(WORLD)]
    verdicts = (2 * s + 1) * (1 + s) * 4  # status and the at most s ranks named, per shard
    for rank, ranks_view in enumerate(seen):
        sent, received = ranks_view["sharded"][1]["clean"][4:6]
        coded_out = (sum(sizes) - sizes[rank]) * item
        coded_in = (WORLD - 1) * sizes[rank] * item
        gathered = (WORLD - 1) * (max(sizes) * item + verdicts)
        agreement = (2 + 2 * WORLD) * 4
        assert sent == coded_out + gathered + agreement
        assert received == coded_in + gathered + agreement
        assert received <= (2 * (2 * s + 1) + 1) * d * item, "the issue's bound on the busiest rank"


def test_a_liar_telling_each_decoder_a_different_story_changes_nothing(seen):
    reference = seen[0]["sharded"][0]
    for ranks_view in seen:
        result, caught = ranks_view["equivocation"]
        assert torch.equal(result, reference) and caught == [4]


def test_the_communication_thread_gives_the_same_bytes(seen):
    reference = seen[0]["sharded"][0]
    for ranks_view in seen:
        assert all(torch.equal(result, reference) for result in ranks_view["overlapped"])


def test_too_many_liars_fail_the_step_on_every_rank_in_the_ps_words(seen):
    messages = {ranks_view["failure"][0] for ranks_view in seen}
    assert len(messages) == 1 and "more than s=1" in messages.pop()
    assert all(ranks_view["failure"][1] == 3 and ranks_view["failure"][2] for ranks_view in seen)


def test_the_coded_steps_last_weight_is_applied_as_the_bucket_leaves(seen):
    for ranks_view in seen:
        result, mean = ranks_view["encoded"]
        torch.testing.assert_close(result, mean, rtol=1e-12, atol=1e-12)


def test_the_whole_step_waits_for_the_last_bucket_and_lays_the_step_out_by_parameter(seen):
    for ranks_view in seen:
        pending, result, median = ranks_view["whole"]
        assert pending is False, "the first bucket's future completes only with the step's last"
        assert torch.equal(result, median)


# -- reactive redundancy -------------------------------------------------------------------------
def test_reactive_clean_step_is_one_shot_and_costs_one_flag_vector_more_than_nothing(seen):
    groups, d, item = WORLD // 2, 23, 4
    for rank, ranks_view in enumerate(seen):
        run = ranks_view["reactive"]["clean"]
        assert torch.equal(run["result"], run["clean"])
        assert run["pending"] == {} and run["asked"] == [] and run["caught"] == []
        flags = 2 * (1 + groups) * 4  # one flag vector per bucket
        if rank == 0:
            assert (run["sent"], run["received"]) == ((WORLD - 1) * (d * item + flags), (WORLD - 1) * d * item)
        else:
            assert (run["sent"], run["received"]) == (d * item, d * item + flags)


@pytest.mark.parametrize("name, liars", [("liar", [4]), ("low_bit", [3]), ("s2_liars_also_recompute", [1, 3])])
def test_reactive_escalation_gives_bitwise_the_clean_result_and_names_the_liars(seen, name, liars):
    clean = seen[0]["reactive"]["clean" if not name.startswith("s2") else "s2_clean"]["result"]
    for ranks_view in seen:
        run = ranks_view["reactive"][name]
        assert torch.equal(run["result"], clean), name
        assert run["caught"] == liars and run["failure"] == ""


def test_reactive_only_the_helpers_recompute_and_only_the_pending_buckets(seen):
    # s = 1, step 0: group 2 ({4, 5}) is recomputed by the next group's first member, rank 0.
    for rank, ranks_view in enumerate(seen):
        run = ranks_view["reactive"]["liar"]
        assert run["pending"] == {0: [2], 1: [2]}
        assert run["asked"] == ([(2, [0, 1])] if rank == 0 else [])
        low_bit = ranks_view["reactive"]["low_bit"]
        assert low_bit["pending"] == {1: [1]}, "one flipped bit: one group, one bucket"
    # s = 2: groups {0,1,2} and {3,4,5}; at step 0 group 0's helpers are ranks 3, 4 and group 1's are 0, 1.
    asked = {rank: ranks_view["reactive"]["s2_liars_also_recompute"]["asked"] for rank, ranks_view in enumerate(seen)}
    assert asked == {0: [(1, [0, 1])], 1: [(1, [0, 1])], 2: [], 3: [(0, [0, 1])], 4: [(0, [0, 1])], 5: []}


def test_reactive_more_than_s_liars_among_the_copies_fail_on_every_rank(seen):
    failures = {ranks_view["reactive"]["two_liars"]["failure"] for ranks_view in seen}
    assert len(failures) == 1
    failure = failures.pop()
    assert "more than s=1 of these ranks lied" in failure and "[2, 3, 4]" in failure


@pytest.mark.parametrize(
    "name, caught",
    [("sharded_clean", []), ("sharded_liar", [4]), ("sharded_gradient", [3]), ("sharded_decoder", [3]),
     ("sharded_s2_liars_also_recompute", [1, 3])],
)
def test_reactive_sharded_decoding_gives_bitwise_the_parameter_servers_result(seen, name, caught):
    reference = seen[0]["reactive"]["s2_clean" if "s2" in name else "clean"]["result"]
    for ranks_view in seen:
        run = ranks_view["reactive"][name]
        assert torch.equal(run["result"], reference), name
        assert run["caught"] == caught and run["failure"] == ""
    assert seen[0]["reactive"]["sharded_decoder"]["pending"] == {}, "a lying decoder is outvoted, nothing to recompute"
    assert seen[0]["reactive"]["sharded_decoder"]["outvoted"] == [3]


def test_reactive_sharded_more_than_s_liars_fail_on_every_rank(seen):
    assert all("more than s=1" in ranks_view["reactive"]["sharded_two_liars"]["failure"] for ranks_view in seen)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs it on one)")
def test_reactive_escalation_on_cuda_buckets_over_gloo_matches_the_cpu(seen, tmp_path):
    """Six ranks sharing a GPU over gloo, buckets on CUDA: the escalation's point-to-point messages
    (which gloo cannot take from device memory) give every run the CPU world's verdicts, and every run
    that the CPU world decodes to the clean total decodes on CUDA bitwise to the CUDA clean total.

    Across devices the means agree to one unit in the last place, not bit for bit: CUDA divides by a
    Python scalar by multiplying with its reciprocal (ATen's ``div_true_kernel_cuda``), the CPU divides."""
    on_cuda = run_world(tmp_path, "cuda")
    for rank in range(WORLD):
        runs, cpu_runs = on_cuda[rank]["reactive"], seen[rank]["reactive"]
        for name, run in runs.items():
            cpu = cpu_runs[name]
            assert (run["caught"], run["failure"], run["pending"]) == (cpu["caught"], cpu["failure"], cpu["pending"]), name
            if cpu["failure"]:  # a failed step's buckets hold nothing to compare
                continue
            torch.testing.assert_close(run["result"], cpu["result"], rtol=2**-23, atol=0, msg=name)
            reference = "s2_clean" if "s2" in name else "clean"
            if torch.equal(cpu["result"], cpu_runs[reference]["result"]):
                assert torch.equal(run["result"], runs[reference]["result"]), name


# -- a rank that stalls or dies: the others fail at once or at the timeout, saying which ---------------
TIMEOUT = 4


def failing_world(out: Path, mode: str, wrapper: str = "plain") -> tuple[list[dict], str]:
    """What ranks 0 and 1 of failing_world.py saw, and the world's combined output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH", "")])}
    script = Path(__file__).with_name("failing_world.py")
    world = subprocess.run([sys.executable, str(script), str(out), mode, str(TIMEOUT), wrapper], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert world.returncode == 0, world.stdout
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], world.stdout


def test_a_stalled_rank_fails_the_exchange_at_the_timeout_naming_rank_collective_and_timeout(tmp_path):
    seen, output = failing_world(tmp_path, "stall")
    ps = seen[0]
    assert ps["type"] == "CollectiveFailedError" and ps["cause"] in ("RuntimeError", "DistBackendError")
    assert ps["message"].startswith(
        f"rank 0: the gradient exchange's gather got no answer within the collective timeout ({TIMEOUT} s)"
    ), ps["message"]
    assert "the job fails instead of hanging" in ps["message"]
    # At the timeout, not for ever; and the wait counts as communication time.
    assert TIMEOUT * 0.9 <= ps["seconds"] < TIMEOUT + 60
    assert ps["communication"] >= TIMEOUT * 0.9
    # The worker waited for the PS's broadcast, which never came: it fails too, in its own words.
    assert seen[1]["type"] == "CollectiveFailedError" and seen[1]["message"].startswith("rank 1: the gradient exchange's")
    # Each line reached the log when it happened, not only with the exception.
    assert ps["message"] in output and seen[1]["message"] in output


def test_the_simulated_liars_own_collectives_fail_the_same_way(tmp_path):
    seen, output = failing_world(tmp_path, "stall", "omniscient")
    for rank, ps in enumerate(seen):
        assert ps["type"] == "CollectiveFailedError" and ps["recorded"], ps
        assert ps["message"].startswith(
            f"rank {rank}: the gradient exchange's all-reduce (simulated omniscient liars) got no answer within the"
            f" collective timeout ({TIMEOUT} s)"
        ), ps["message"]
        assert ps["message"] in output


def test_a_rank_whose_process_ends_fails_the_exchange_at_once_saying_a_peer_is_gone(tmp_path):
    # On the communication thread (overlap), where the failure is also recorded: DDP reads a failed future
    # back as a plain RuntimeError, and DracoStrategy.backward raises ``state.failed`` instead.
    seen, output = failing_world(tmp_path, "exit", "overlap")
    ps = seen[0]
    assert ps["type"] == "CollectiveFailedError" and ps["recorded"]
    assert ps["message"].startswith("rank 0: the gradient exchange's gather broke after"), ps["message"]
    assert "another rank's process ended or closed the connection" in ps["message"]
    assert ps["seconds"] < TIMEOUT * 0.9, "a peer that is gone is known before the timeout"
    assert ps["message"] in output


# -- the message and the context manager, single-process -----------------------------------
class _Setup:
    rank, timeout = 2, 10.0


class _Stats:
    def __init__(self):
        self.seconds = {"communication": 0.0}


class _State:
    def __init__(self):
        self.setup, self.stats, self.failed = _Setup(), _Stats(), None


def test_a_backend_error_becomes_one_logged_line_with_the_backend_error_as_cause(caplog):
    state = _State()
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation")
    with pytest.raises(CollectiveFailedError) as raised, caplog.at_level("ERROR"):
        with timed(state, "broadcast"):
            raise gloo
    assert raised.value.__cause__ is gloo and state.failed is raised.value
    message = str(raised.value)
    assert message == (
        "rank 2: the gradient exchange's broadcast got no answer within the collective timeout (10 s): a rank"
        " stalled or stopped answering; the job fails instead of hanging"
        " ([gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 10000ms for recv operation)"
    )
    assert [r.getMessage() for r in caplog.records] == [message]
    assert state.stats.seconds["communication"] > 0


def test_errors_that_are_not_the_backends_pass_through_unchanged(caplog):
    state = _State()
    with pytest.raises(ValueError, match="a bug of ours"):
        with timed(state, "gather"):
            raise ValueError("a bug of ours")
    failed = CollectiveFailedError("rank 1: logged already")
    with pytest.raises(CollectiveFailedError) as raised:
        with timed(state, "gather"):
            raise failed
    assert raised.value is failed and not caplog.records


@pytest.mark.parametrize(
    "error, timeout, expected",
    [
        (RuntimeError("Application timeout caused pair closure"), 30.0,
         "got no answer within the collective timeout (30 s)"),
        (RuntimeError("[pair.cc:589] Connection closed by peer [127.0.0.1]:41234"), 1800.0,
         "broke after 1.5 s: another rank's process ended or closed the connection (it failed, was killed, or"
         " reached the collective timeout (1800 s) first)"),
        (RuntimeError("Connection reset by peer"), None, "or reached the collective timeout first)"),
        (RuntimeError("[gloo/alltoallv.cc:138] inLengthPerRank[myRank] == outLengthPerRank[myRank]."), 5.0,
         "all-to-all failed after 1.5 s ([gloo/alltoallv.cc:138]"),
        (RuntimeError("ProcessGroupGloo::broadcast: invalid root rank: 5"), 5.0, "failed after 1.5 s (ProcessGroupGloo"),
        (RuntimeError("Timed out"), 1e6, "(1000000 s)"),
        (RuntimeError(""), 5.0, "(RuntimeError)"),
        (RuntimeError("first line\nsecond line"), 5.0, "(first line)"),
    ],
)
def test_the_message_says_timeout_or_lost_peer_from_the_backends_words(error, timeout, expected):
    message = failure_message(3, "all-to-all", 1.5, timeout, error)
    assert message.startswith("rank 3: the gradient exchange's all-to-all ")
    assert expected in message and "\n" not in message
    # Only a stalled or lost peer is said to be one: a call the backend refused (sizes, ranks) is a bug here.
    assert ("instead of hanging" in message) == ("failed after" not in message)


@pytest.mark.parametrize("error", [NotImplementedError("no gloo op"), torch.OutOfMemoryError("out of memory"),
                                   RecursionError("deep")])
def test_this_ranks_own_runtime_errors_are_not_called_collective_failures(error):
    state = _State()
    with pytest.raises(type(error)) as raised:
        with timed(state, "send"):
            raise error
    assert raised.value is error and state.failed is None
