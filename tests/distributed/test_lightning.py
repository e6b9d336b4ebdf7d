"""Three ranks over gloo (FRC, s=1, r=3, PS on rank 0): DracoStrategy inside a Lightning run.

All scenarios run in one job (``lightning_job.py``), started once for the module; every
failure here is agreed by all ranks, so the job goes on to the next scenario. Reactive mode's
scenarios run in a second job on four ranks (``REACTIVE_SCENARIOS``).
"""

import json
import os
import subprocess
import sys

import pytest

from jobs import HERE, run_job

pytestmark = pytest.mark.distributed

SCENARIOS = ["logged_draco", "logged_ddp", "stages", "ps_outvoted_raise", "ps_outvoted_skip", "rank_dependent", "inconsistent_data", "unused_true",
             "hook_not_registered", "unused_default", "reentrant_frc", "reentrant_crc", "branch_ddp", "branch_draco",
             "branch_liar", "averaged_ddp", "averaged_draco", "reentrant_rank_1", "closure_before_step",
             "two_training_loaders", "resumed_inside_a_step", "float16_ddp", "float16_frc", "float16_crc",
             "accumulated_clean", "accumulated_poisoning", "unfrozen_later", "re_evaluating_optimizer",
             "asynchronous_checkpoints", "persistent_workers_after_fit", "reloaded_inconsistent",
             "before_transfer_clean", "before_transfer_liar", "before_transfer_crc_clean", "before_transfer_crc_liar"]
#: Run on four ranks (reactive mode needs groups of s+1 = 2 ranks and a helper outside each).
REACTIVE_SCENARIOS = ["reactive_64_clean", "reactive_64_liar", "reactive_before_transfer_clean",
                      "reactive_before_transfer_liar", "reactive_after_backward_clean", "reactive_after_backward_liar",
                      "reactive_averaged_ddp", "reactive_averaged_liar"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_job("lightning_job.py", tmp_path_factory.mktemp("lightning"), SCENARIOS)


@pytest.fixture(scope="module")
def reactive_runs(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIGHTNING_JOB_WORLD", "4")
        return run_job("lightning_job.py", tmp_path_factory.mktemp("lightning_reactive"), REACTIVE_SCENARIOS)


def test_faulty_counts_survive_validate_test_and_predict_on_the_same_trainer(runs):
    run = runs["stages"]
    assert run["global_step"] == 4
    for seen in run["ranks"]:
        assert seen["counts"] == {stage: {"2": 4} for stage in ("fit", "validate", "test", "predict")}


def test_traffic_counts_survive_validate_test_and_predict_on_the_same_trainer(runs):
    traffic = runs["stages"]["traffic"]
    calls, moved = traffic["fit"]
    assert calls == 4 and moved["sent"] > 0 and moved["received"] > 0
    assert all(seen == traffic["fit"] for seen in traffic.values())


def test_float16_with_a_grad_scaler_skips_overflowing_steps_and_trains_the_ddp_model(runs):
    """The scale starts where float16 overflows: the first steps' honest gradients are Inf on every replica.
    The scaler skips them and halves the scale, as under DDP; the liar changes nothing."""
    ddp = runs["float16_ddp"]
    assert ddp.get("error") is None and ddp["scale"] < 2.0**19, "the scale started too low to overflow"
    flat = lambda run: [x for p in run["params"] for x in p]  # noqa: E731
    for code in ("frc", "crc"):
        run = runs[f"float16_{code}"]
        assert run.get("error") is None and run["global_step"] == 8 and run["scale"] == ddp["scale"]
        assert flat(run) == pytest.approx(flat(ddp), rel=1e-5, abs=1e-7)
        # Named wherever a finite sum was decoded; at an overflowing step the cyclic code names nobody.
        assert set(run["faulty_counts"]) == {"2"}


def test_random_liars_poisoning_their_batches_lie_in_every_micro_batch_of_their_step(runs):
    run, clean = runs["accumulated_poisoning"], runs["accumulated_clean"]
    assert run.get("error") is None and run["global_step"] == 4
    planned: dict[str, int] = {}
    for liars in run["planned"]:
        for rank in liars:
            planned[str(rank)] = planned.get(str(rank), 0) + 1
    assert len(planned) > 1, "the draw should move the liar between steps"
    assert run["faulty_counts"] == planned and run["sha"] == clean["sha"]


def test_a_parameter_unfrozen_after_fit_started_is_refused_on_every_rank(runs):
    run = runs["unfrozen_later"]
    assert run["global_step"] == 2
    for seen in run["ranks"]:
        assert seen["error"]["type"] == "RuntimeError"
        assert ("parameters ['net.0.weight', 'net.0.bias'] got gradients but were not trained when fit started"
                " (requires_grad=False then" in seen["error"]["message"])


def test_an_optimizer_that_evaluates_its_closure_again_is_refused_on_every_rank_before_it_steps(runs):
    run = runs["re_evaluating_optimizer"]
    assert run["unchanged"], "LBFGS moves the parameters before its second evaluation: refused at setup"
    for seen in run["ranks"]:
        assert "step 0: the optimizer LBFGS evaluates its closure more than once per step" in seen["error"]["message"]


def test_asynchronous_checkpoint_io_writes_every_checkpoint_and_the_parameter_servers_state(runs):
    run = runs["asynchronous_checkpoints"]
    assert run.get("error") is None
    assert run["files"] == ["epoch=0-step=2.ckpt", "epoch=0-step=2.ckpt.ps", "epoch=0-step=4.ckpt",
                            "epoch=0-step=4.ckpt.ps"]
    assert run["steps_saved"] == [2, 4]


def test_batch_hooks_get_the_first_partitions_plain_batch(runs):
    run = runs["stages"]
    assert len(run["module_hooks"]) == 4 and len(run["callback_hooks"]) == 4
    for seen in run["module_hooks"]:
        # ``x, y = batch`` worked; the whole PartitionBatch was on the strategy, its first partition the hook's.
        assert seen == {"x": [8, 4], "y": [8], "whole": "PartitionBatch", "partitions": [0, 1, 2],
                        "first_is_hooks": True}
    assert all(seen == {"type": "list", "x": [8, 4]} for seen in run["callback_hooks"])
    assert run["after_fit_partition_batch"] is False


def test_colluders_outvoting_the_ps_raise_on_every_rank_and_blame_nobody(runs):
    run = runs["ps_outvoted_raise"]
    for seen in run["ranks"]:
        error = seen["error"]
        assert error["type"] == "DracoDecodeError" and error["suspects"] == [1, 2]
        assert "names the parameter server (rank 0), which is trusted" in error["message"]
        assert seen["faulty_counts"] == {}
    assert run["global_step"] == 0 and run["unchanged"]


def test_colluders_outvoting_the_ps_are_skipped_and_never_applied(runs):
    run = runs["ps_outvoted_skip"]
    assert run["global_step"] == 4 and run["unchanged"], "no decoded gradient of theirs reached the model"
    assert all(seen["skipped"] == 4 and seen["faulty_counts"] == {} for seen in run["ranks"])


def test_replicas_that_never_agree_get_the_data_hint(runs):
    for seen in runs["rank_dependent"]["ranks"]:
        assert seen["error"]["type"] == "DracoDecodeError"
        assert "where no liar is expected, that looks like inconsistent data or non-determinism" in seen["error"]["message"]


def test_holders_of_a_partition_with_different_data_are_refused_before_the_first_step(runs):
    for seen in runs["inconsistent_data"]["ranks"]:
        message = seen["error"]["message"]
        assert seen["error"]["type"] == "InconsistentDataError"
        assert "partition 0 (rank [0] loaded one batch, rank [1] loaded another, rank [2] loaded another)" in message
        assert "seed_everything" in message
    # Agreed: a script's first fit, which launched the ranks, would otherwise end them, and a caller that caught
    # the error could not fit again.
    assert runs["inconsistent_data"]["agreed"]


def test_unused_parameters_train_under_the_find_unused_name(runs):
    run = runs["unused_true"]
    assert run["global_step"] == 4 and all(seen["error"] is None for seen in run["ranks"])


def test_unused_parameters_error_names_the_draco_strategy(runs):
    error = runs["unused_default"]["error"]
    assert "strategy='draco_find_unused_parameters_true'" in error["message"]
    assert "ddp_find_unused" not in error["message"]
    assert all(seen["error"] == error for seen in runs["unused_default"]["ranks"]), "found on every rank at once"


def _largest_difference(first: dict, second: dict) -> float:
    pairs = zip((x for p in first["params"] for x in p), (x for p in second["params"] for x in p))
    return max(abs(a - b) for a, b in pairs)


def test_a_branch_only_some_partitions_reach_trains_as_under_ddp_and_the_liar_is_caught(runs):
    """find_unused_parameters with a head that only some batches reach (an expert no token was routed to)."""
    ddp, draco, liar = runs["branch_ddp"], runs["branch_draco"], runs["branch_liar"]
    for run in (ddp, draco, liar):
        assert run["global_step"] == 4 and all(seen["error"] is None for seen in run["ranks"])
    # The case DDP's one-forward search for unused parameters gets wrong unless it sees every partition:
    # a step where an earlier partition reached the head and the last did not.
    steps = [draco["used"][i : i + 3] for i in range(0, len(draco["used"]), 3)]
    assert any(any(used[:2]) and not used[2] for used in steps), steps
    assert _largest_difference(draco, ddp) < 1e-6
    assert liar["faulty_counts"] == {"1": 4} and liar["sha"] == draco["sha"]
    assert all(seen["faulty_counts"] == {} for seen in draco["ranks"])


@pytest.mark.parametrize("scenario, ranks", [("reentrant_frc", [0, 1, 2]), ("reentrant_crc", [0, 1, 2]),
                                             ("reentrant_rank_1", [1])])
def test_reentrant_checkpointing_is_refused_on_every_rank_before_any_gradient(runs, scenario, ranks):
    """Also where only some ranks' graphs hold one (it may depend on the data): all ranks raise it together."""
    run = runs[scenario]
    for seen in run["ranks"]:
        assert seen["error"]["type"] == "UnsupportedStepError"
        assert "use_reentrant=False" in seen["error"]["message"]
        assert seen["error"]["message"].endswith(f"(found on ranks {ranks})")
    assert run["unchanged"]


def test_stochastic_weight_averaging_recomputes_batchnorm_without_a_backward_as_under_ddp(runs):
    """The callback's last epoch only runs forwards: no gradient is exchanged and the averaged weights are DDP's."""
    ddp, draco = runs["averaged_ddp"], runs["averaged_draco"]
    assert all(seen["error"] is None for seen in draco["ranks"] + ddp["ranks"])
    assert draco["global_step"] == ddp["global_step"] == 7
    assert draco["steps_decoded"] == 6, "the forward-only step decodes nothing"
    assert _largest_difference(draco, ddp) < 1e-6


def test_values_logged_in_training_step_mean_what_they_mean_under_ddp(runs):
    """Each rank runs training_step once per partition; the logged step value is their mean, as DDP's
    sync_dist mean over ranks is (P = 3: every rank holds every partition)."""
    draco, ddp = runs["logged_draco"]["values"], runs["logged_ddp"]["values"]
    assert len(draco) == len(ddp) > 0
    for ours, theirs in zip(draco, ddp):
        assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs))


def test_a_backward_that_bypassed_the_draco_hook_fails_on_every_rank_before_the_step(runs):
    run = runs["hook_not_registered"]
    assert run["error"]["type"] == "RuntimeError" and "exchanged no bucket through DRACO's comm hook" in run["error"]["message"]
    assert all(r["error"] == run["error"] for r in run["ranks"]), "every rank raises, none is left waiting"
    assert run["unchanged"], "the unprotected all-reduce's gradient is never applied"


def test_a_closure_run_before_optimizer_step_is_refused_before_its_unchecked_step(runs):
    """An optimizer_step override that calls the closure, then optimizer.step(): the step's verdict would
    be lost (a liar unnamed; in reactive mode, unrepaired), so the step is refused on every rank."""
    run = runs["closure_before_step"]
    for seen in run["ranks"]:
        assert seen["error"]["type"] == "RuntimeError"
        assert "the step's backward ran before optimizer.step" in seen["error"]["message"]
        assert "optimizer.step(closure=optimizer_closure)" in seen["error"]["message"]
    assert run["unchanged"]


def test_several_training_loaders_are_refused_in_one_sentence(runs):
    run = runs["two_training_loaders"]
    for seen in run["ranks"]:
        assert seen["error"]["type"] == "ValueError"
        assert seen["error"]["message"].startswith("DracoStrategy trains from one training DataLoader, passed as it is"
                                                   " (got a dict of loaders' batches")
    assert run["unchanged"]


def test_a_checkpoint_taken_inside_a_step_resumes_to_the_uninterrupted_model(runs):
    """Validation after two batches of a three-batch step: the checkpoint holds two batches' progress and
    a loader position at the step's start. The resumed run restarts the step and ends bitwise equal, in the
    first epoch and in the second (before its first step, the position is already the second epoch's)."""
    run = runs["resumed_inside_a_step"]
    assert run["saved_at"] == [{"batches": 2, "loader": [{"epoch": epoch, "steps_trained": 0}]} for epoch in (0, 1)]
    assert run["steps"] == [4, 4, 4]  # two steps per epoch: 3 batches, then the last one
    assert run["same_model"] == [True, True]
    assert run["stepped"] == [4, 4, 4], "the logger's step count is the uninterrupted run's"
    assert run["faulty_counts"] == [{"1": 4}, {"1": 4}]  # the saved ledger's steps and the resumed fit's
    assert run.get("error") is None and run["validated"], "validating reads the weights of any code's checkpoint"


def test_forked_ranks_hand_who_was_caught_back_to_the_main_process(tmp_path):
    """start_method="fork" (as in a notebook): the main process's strategy reports what the ranks saw."""
    out = tmp_path / "main_process.json"
    job = subprocess.run([sys.executable, str(HERE / "launched_by_fork.py"), str(out), "fork"], cwd=tmp_path,
                         env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    seen = json.loads(out.read_text())
    full, reactive = seen["full"], seen["reactive"]
    assert full["launcher"] == reactive["launcher"] == "ResultCarryingLauncher"
    assert full["faulty_counts"] == {"1": 4} and full["first_caught"] == {"1": 0}
    assert full["steps_decoded"] == 4 and full["skipped"] == 0 and full["hook_calls"] >= 4
    assert full["exchange_bytes"]["sent"] > 0 and full["weights_trained"]
    assert reactive["faulty_counts"] == {"3": 4} and reactive["quarantined"] == [3]
    assert reactive["escalations"]["steps"] == 4 and reactive["escalations"]["groups"] >= 4


# -- data assignment across loaders and stages --------------------------------------------------------------------


def test_persistent_loader_workers_are_shut_down_when_fit_ends(runs):
    run = runs["persistent_workers_after_fit"]
    assert run.get("error") is None and run["global_step"] == 2
    assert run["workers_alive"] == 0, "DDP's are shut down by Lightning's teardown"


def test_a_reloaded_loader_is_checked_for_consistency_before_its_first_step(runs):
    """reload_dataloaders_every_n_epochs=1: rank 1's second-epoch data differ. Unchecked, rank 1 was named as a
    liar at every step of that epoch (and, where the PS's data differed, the PS said it was outvoted)."""
    run = runs["reloaded_inconsistent"]
    assert run["global_step"] == 2 and run["faulty_counts"] == {}
    for seen in run["ranks"]:
        assert seen["error"]["type"] == "InconsistentDataError"
        assert "partition 0 (ranks [0, 2] loaded one batch, rank [1] loaded another)" in seen["error"]["message"]


# -- the batch hooks Lightning runs before batch_to_device ---------------------------------------------------------


@pytest.mark.parametrize("code", ["frc", "crc"])
def test_on_before_batch_transfer_augments_each_partitions_plain_batch_alike_on_every_holder(runs, code):
    """The hook unpacks ``x, y = batch`` and adds noise, each rank seeding its own stream. Run once on the
    PartitionBatch it failed to unpack it; run per partition under the rank's own stream, holders of a
    partition trained on different data and the vote failed."""
    suffix = "" if code == "frc" else "_crc"
    clean, liar = runs[f"before_transfer{suffix}_clean"], runs[f"before_transfer{suffix}_liar"]
    for run in (clean, liar):
        assert all(seen["error"] is None for seen in run["ranks"]) and run["global_step"] == 4
        assert run["before_transfer"] == [["list", [8, 4]]] * 12, "once per partition and step, a plain batch"
    assert clean["faulty_counts"] == {} and liar["faulty_counts"] == {"2": 4}
    if code == "frc":
        assert liar["sha"] == clean["sha"]
    else:
        assert _largest_difference(liar, clean) < 1e-6


@pytest.mark.parametrize("case", ["64", "before_transfer"])
def test_reactive_recomputation_loads_batches_as_the_training_loop_does(reactive_runs, case):
    """A helper recomputes a group from its batches loaded by index. They must go through what Lightning
    does to a loaded batch before batch_to_device: precision="64-true"'s conversion to float64, the
    module's on_before_batch_transfer. Without them every fit was refused at its first step, blaming
    randomness in loader workers."""
    clean, liar = reactive_runs[f"reactive_{case}_clean"], reactive_runs[f"reactive_{case}_liar"]
    for run in (clean, liar):
        assert all(seen["error"] is None for seen in run["ranks"]) and run["global_step"] == 4
    assert clean["escalations"] == 0 and liar["escalations"] == 4
    assert clean["faulty_counts"] == {} and liar["faulty_counts"] == {"2": 4}
    assert liar["sha"] == clean["sha"]


def test_on_after_backward_sees_and_changes_the_decoded_gradient_in_reactive_mode(reactive_runs):
    """A callback reads the gradient's norm in on_after_backward and halves it. With a liar every step is
    escalated; the recomputed group's gradient used to be settled after the hook, which saw a provisional
    gradient (more than twice the clean norm here) and whose change was overwritten: the model was not the clean run's."""
    clean, liar = reactive_runs["reactive_after_backward_clean"], reactive_runs["reactive_after_backward_liar"]
    assert all(seen["error"] is None for seen in clean["ranks"] + liar["ranks"])
    assert liar["escalations"] == 4 and liar["faulty_counts"] == {"2": 4}
    assert liar["norms"] == clean["norms"] and len(clean["norms"]) == 4
    assert liar["sha"] == clean["sha"]


def test_stochastic_weight_averaging_runs_its_epoch_without_backward_in_reactive_mode(reactive_runs):
    """The callback's last epoch raises accumulate_grad_batches to run forwards only; reactive mode, which
    refuses accumulation, refused that epoch after the whole fit had trained."""
    ddp, liar = reactive_runs["reactive_averaged_ddp"], reactive_runs["reactive_averaged_liar"]
    assert all(seen["error"] is None for seen in ddp["ranks"] + liar["ranks"])
    assert liar["global_step"] == ddp["global_step"] == 7
    assert liar["steps_decoded"] == 6 and liar["faulty_counts"] == {"2": 6}
    assert _largest_difference(liar, ddp) < 1e-6
