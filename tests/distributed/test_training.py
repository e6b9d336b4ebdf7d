"""Six ranks over gloo, FRC r=3 s=1: the model trained under attack is the clean model.

The scenarios (``scenarios.py``) that the selected tests read run in one multi-process job
(``digits_job.py``), started once for the module: the job forks its ranks, and every rank runs the
scenarios in the same order. Each test
reads what the job recorded for the scenarios it names; one that the job could not finish fails
by name.
"""

from collections import Counter

import pytest
import torch

from jobs import run_job, selected_scenarios
from lightning_draco import Adversary
from scenarios import ADAPTIVE, ATTACKS, RESUMED, RULES, SCENARIOS, STEPS

pytestmark = pytest.mark.distributed
scenarios = pytest.mark.scenarios

WRECKING = ["reverse", "constant", "nan", "inf"]
TRAINING = (
    ["frc_clean", "none_clean", "frc_nodropout", "ddp_nodropout", "by_name", "frc_ps3_clean", "frc_ps3_reverse"]
    + [f"frc_fixed_{a}" for a in ATTACKS] + ["frc_random_all"]
    + [f"none_{a}" for a in WRECKING]
    + ["frc_two_liars_raise", "frc_two_liars_skip", "manual_optimization", "frc_threshold_logged"]
    + ["resume_ps0", "resume_ps3", "resume_clip_ps3", "frc_diverge_raise", "frc_diverge_skip"]
    + [f"agg_{rule}_reverse" for rule in RULES]
    + ["agg_krum_reverse_bucket", "detox_reverse", "none_alie", "agg_median_alie"]
    + [f"frc_fixed_{a}" for a in ADAPTIVE] + ["agg_median_clean", "agg_median_optimal_alie", "agg_median_label_flip"]
    + ["pre_nnm_krum_reverse", "pre_bucketing_median_reverse"]
    + ["sharded_clean", "sharded_overlap_clean", "frc_overlap_reverse", "sharded_two_liars_raise"]
    + ["sharded_fixed_all", "sharded_fixed_label_flip", "sharded_gradient_reverse", "sharded_decoder_reverse"]
    + ["reactive_clean", "reactive_fixed_all", "reactive_random_all", "reactive_fixed_label_flip",
       "reactive_two_liars_raise", "reactive_s2_reverse", "reactive_quarantine", "reactive_sharded_fixed_all",
       "reactive_sharded_random_all", "resume_reactive_ps3", "reactive_accumulation_scheduled"]
    + ["frc_gathering", "reactive_gathering"]
)
# Those that end with one model on every rank: not the refused, failed or resumed runs, nor plain DDP.
ONE_MODEL = [n for n in TRAINING if not SCENARIOS[n].resume and n not in (
    "frc_two_liars_raise", "sharded_two_liars_raise", "reactive_two_liars_raise", "manual_optimization",
    "ddp_nodropout", "frc_diverge_raise", "reactive_accumulation_scheduled", "reactive_gathering")]


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    return run_job("digits_job.py", tmp_path_factory.mktemp("job"), selected_scenarios(request, TRAINING))


@scenarios("{name}")
@pytest.mark.parametrize("name", ONE_MODEL)
def test_every_rank_ends_with_the_same_model(runs, name):
    assert len({r["sha"] for r in runs[name]["ranks"]}) == 1


@scenarios("frc_clean")
def test_the_hook_replaces_all_reduce_with_at_least_three_buckets(runs):
    run = runs["frc_clean"]
    assert run["global_step"] == STEPS
    assert run["steps_decoded"] == STEPS
    # The first step runs before DDP rebuilds its buckets; every later step exchanges >= 3 buckets.
    assert run["hook_calls"] >= 1 + 3 * (STEPS - 1)
    assert all(r["hook_calls"] == run["hook_calls"] for r in run["ranks"])


@scenarios("by_name", "frc_clean")
def test_strategy_by_name_runs_the_draco_hook(runs):
    assert runs["by_name"]["hook_calls"] >= STEPS
    assert runs["by_name"]["sha"] == runs["frc_clean"]["sha"]


@scenarios("{name}", "frc_clean")
@pytest.mark.parametrize("name", [f"frc_fixed_{a}" for a in ATTACKS] + ["frc_random_all"])
def test_model_under_attack_is_bitwise_the_clean_model(runs, name):
    run = runs[name]
    assert run["sha"] == runs["frc_clean"]["sha"]
    assert run["params"] == runs["frc_clean"]["params"]
    assert run.get("error") is None and run["skipped"] == 0


@scenarios("frc_fixed_{attack}")
@pytest.mark.parametrize("attack", ATTACKS)
def test_the_caught_rank_is_the_liar(runs, attack):
    assert runs[f"frc_fixed_{attack}"]["faulty_counts"] == {"4": STEPS}


@scenarios("frc_random_all")
def test_a_random_liar_under_every_attack_is_caught_at_every_step(runs):
    """The liar is drawn afresh each step (from the simulation's shared seed) and its attack rotates."""
    run = runs["frc_random_all"]
    counts = run["faulty_counts"]
    assert sum(counts.values()) == STEPS and len(counts) > 1 and "0" not in counts
    assert all(r["faulty_counts"] == counts for r in run["ranks"])


@scenarios("frc_ps3_reverse", "frc_ps3_clean")
def test_ps_on_another_rank(runs):
    assert runs["frc_ps3_reverse"]["sha"] == runs["frc_ps3_clean"]["sha"]
    assert runs["frc_ps3_reverse"]["faulty_counts"] == {"0": STEPS}


@scenarios("frc_nodropout", "ddp_nodropout")
def test_matches_plain_ddp_without_dropout(runs):
    """The parameters, and BatchNorm's running statistics too: they move once per step, with the rank's own
    partition (the batch DDP's rank would get), although each rank runs a forward per partition it holds."""
    draco, ddp = runs["frc_nodropout"], runs["ddp_nodropout"]
    assert len(draco["running"]) == len(ddp["running"]) == 2  # the MLP's BatchNorm: mean and variance
    for a, b in zip(draco["params"] + draco["running"], ddp["params"] + ddp["running"]):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-6, atol=1e-7)
    assert draco["accuracy"] == ddp["accuracy"]


@scenarios("none_clean", "none_{attack}")
@pytest.mark.parametrize("attack", WRECKING)
def test_plain_averaging_is_wrecked_by_one_liar(runs, attack):
    clean, attacked = runs["none_clean"], runs[f"none_{attack}"]
    assert clean["accuracy"] > 0.35
    assert not attacked["finite"] or attacked["accuracy"] < 0.2
    assert attacked["faulty_counts"] == {}


@scenarios("frc_two_liars_raise")
def test_raise_reaches_every_rank_with_step_bucket_and_suspects(runs):
    run = runs["frc_two_liars_raise"]
    for seen in run["ranks"]:
        error = seen["error"]
        assert error["type"] == "DracoDecodeError"
        assert error["step"] == 0 and error["bucket"] == 0 and error["suspects"] == [0, 1, 2]
        assert "group 0 (workers [0, 1, 2])" in error["message"]
    assert run["global_step"] == 0


@scenarios("frc_two_liars_skip")
def test_skip_skips_optimizer_and_scheduler_on_every_rank(runs):
    run = runs["frc_two_liars_skip"]
    lied, applied = (STEPS + 1) // 2, STEPS // 2  # the two liars agree on even steps only
    assert run["global_step"] == STEPS
    assert all(r["skipped"] == lied for r in run["ranks"])
    # StepLR(gamma=0.5) stepped only on the steps that were applied.
    assert run["lr"] == [pytest.approx(0.05 * 0.5**applied)]
    assert run["finite"]


@scenarios("manual_optimization")
def test_manual_optimization_is_refused(runs):
    for seen in runs["manual_optimization"]["ranks"]:
        assert seen["error"]["type"] == "ValueError"
        assert "DracoStrategy supports automatic optimization only" in seen["error"]["message"]


@scenarios("frc_gathering", "reactive_gathering")
def test_a_collective_inside_training_step_is_warned_about_and_refused_in_reactive_mode(runs):
    """Full mode trains (the liar named at both steps) and says the collective is outside the defence;
    reactive mode refuses at the first step on every rank, before a helper could wait in it."""
    full, reactive = runs["frc_gathering"], runs["reactive_gathering"]
    assert full.get("error") is None and full["global_step"] == 2 and full["faulty_counts"] == {"4": 2}
    assert any("training_step calls the strategy's all_gather" in w for w in full["warned"])
    assert reactive["global_step"] == 0
    for seen in reactive["ranks"]:
        assert seen["error"]["type"] == "UnsupportedStepError"
        assert "called the strategy's all_gather (in partition" in seen["error"]["message"]
        assert "redundancy_mode='reactive' cannot run" in seen["error"]["message"]
        assert "(found on ranks [0, 1, 2, 3, 4, 5])" in seen["error"]["message"]


@scenarios("frc_threshold_logged")
def test_caught_ranks_are_logged_and_the_threshold_stops_the_run(runs):
    run = runs["frc_threshold_logged"]
    # Caught at steps 0..5: the sixth catch exceeds max_faulty_steps=5 and every rank stops there.
    assert run["global_step"] == 6
    assert all(r["faulty_counts"] == {"5": 6} for r in run["ranks"])
    assert run["logged"]["caught"] == [1.0] * 6
    assert run["logged"]["rank_5"] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


@scenarios("resume_ps{ps}")
@pytest.mark.parametrize("ps", [0, 3])
def test_checkpoint_keeps_the_secret_away_from_workers_and_resume_restores_it(runs, ps):
    run = runs[f"resume_ps{ps}"]
    first, resumed = run["secrets"]
    assert first == resumed, "the resumed PS uses the saved secret, not the one it drew"
    # Rank 0 writes the checkpoint: it may hold the secret only when rank 0 is the PS.
    assert run["in_checkpoint"] == (ps == 0)
    assert run["sidecar"] == (ps != 0)
    if ps == 0:  # a fresh random liar each step: one catch per step
        assert sum(run["ledger"]["times_caught"].values()) == RESUMED and len(run["ledger"]["times_caught"]) > 1
    else:
        liar = str((ps + 2) % 6)
        assert run["ledger"]["times_caught"] == {liar: RESUMED} and run["faulty_counts"] == {liar: RESUMED}
    assert run["global_step"] == RESUMED and run["world_size"] == 6


@scenarios("{name}")
@pytest.mark.parametrize("name", ["resume_ps0", "resume_ps3", "resume_clip_ps3", "resume_reactive_ps3"])
def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_model(runs, name):
    run = runs[name]
    assert RESUMED // 2 < run["steps_per_epoch"] < RESUMED, "stopped inside the first epoch, resumed across its end"
    assert run["sha_resumed"] == run["sha_uninterrupted"]


@scenarios("resume_reactive_ps3")
def test_a_resumed_reactive_run_keeps_its_quarantine(runs):
    """Rank 5 lied at steps 0..2 only; quarantined before the stop (after half the steps), its group is
    still voted at every step of the resumed fit, and the ledger still holds its three catches. The escalation
    count goes on from the checkpoint's: every step escalated, for the lies and then for the quarantine."""
    run = runs["resume_reactive_ps3"]
    assert run["quarantined"] == [5] and run["ledger"]["times_caught"] == {"5": 3}
    assert run["escalations"]["steps"] == RESUMED and run["global_step"] == RESUMED


@scenarios("agg_{rule}_reverse", "none_reverse", "none_clean")
@pytest.mark.parametrize("rule", RULES)
def test_robust_rules_survive_one_liar_but_change_the_model(runs, rule):
    run = runs[f"agg_{rule}_reverse"]
    assert run["finite"] and run.get("error") is None
    assert run["accuracy"] > 0.2 > runs["none_reverse"]["accuracy"] or not runs["none_reverse"]["finite"]
    assert run["sha"] != runs["none_clean"]["sha"], "a robust rule is not the clean model"
    assert run["hook_calls"] == runs["none_clean"]["hook_calls"], "a whole-vector rule still exchanges every bucket"


@scenarios("agg_krum_reverse_bucket", "agg_krum_reverse")
def test_whole_vector_and_per_bucket_krum_are_different_rules(runs):
    assert runs["agg_krum_reverse_bucket"]["sha"] != runs["agg_krum_reverse"]["sha"]
    assert runs["agg_krum_reverse_bucket"]["finite"]


@scenarios("detox_reverse", "frc_clean")
def test_detox_votes_in_groups_then_aggregates(runs):
    # Two groups of three, a median across them (num_byzantine=0): the liar is outvoted inside its
    # group, and the median of two group sums is their mean: the FRC model, bitwise.
    run = runs["detox_reverse"]
    assert run["faulty_counts"] == {"4": STEPS}
    assert run["sha"] == runs["frc_clean"]["sha"]


@scenarios("frc_fixed_alie", "frc_clean", "agg_median_alie", "none_alie", "none_clean")
def test_alie_hurts_the_median_and_plain_averaging_not_draco(runs):
    assert runs["frc_fixed_alie"]["sha"] == runs["frc_clean"]["sha"]
    assert runs["agg_median_alie"]["sha"] != runs["none_clean"]["sha"]
    assert runs["none_alie"]["sha"] != runs["none_clean"]["sha"]


@scenarios("frc_diverge_raise", "frc_diverge_skip")
def test_honest_nan_is_not_blamed_on_honest_ranks(runs):
    """Every replica's loss turns NaN at step 3: all ranks stop with NonFiniteGradientError (raise),
    or skip every step from there (skip); only the simulated liar is ever caught."""
    for seen in runs["frc_diverge_raise"]["ranks"]:
        assert seen["error"]["type"] == "NonFiniteGradientError"
        assert "the honest ranks agree on a gradient with NaN or Inf" in seen["error"]["message"]
        # Up to step 3 the liar is caught; its -100 x NaN may equal the honest NaN bit for bit after that.
        assert set(seen["faulty_counts"]) == {"4"} and seen["faulty_counts"]["4"] >= 3
    skip = runs["frc_diverge_skip"]
    assert skip["global_step"] == STEPS and skip["finite"]
    assert all(r["skipped"] == STEPS - 3 for r in skip["ranks"])
    assert set(skip["faulty_counts"]) == {"4"} and skip["faulty_counts"]["4"] >= 3


@scenarios("frc_fixed_{attack}", "frc_clean")
@pytest.mark.parametrize("attack", ADAPTIVE)
def test_adaptive_and_data_attacks_are_caught_and_leave_the_clean_model(runs, attack):
    """Optimal ALIE/IPM search against FRC's vote and find nothing; mimic copies another group's
    vector; label flipping sends a genuine gradient of the wrong labels: the vote catches each."""
    run = runs[f"frc_fixed_{attack}"]
    assert run["faulty_counts"] == {"4": STEPS}
    assert run["sha"] == runs["frc_clean"]["sha"] and run.get("error") is None


@scenarios("agg_median_{attack}", "agg_median_clean")
@pytest.mark.parametrize("attack", ["optimal_alie", "label_flip"])
def test_adaptive_and_data_attacks_move_the_median(runs, attack):
    run = runs[f"agg_median_{attack}"]
    assert run["finite"] and run.get("error") is None
    assert run["sha"] != runs["agg_median_clean"]["sha"]


@scenarios("{name}")
@pytest.mark.parametrize("name", ["pre_nnm_krum_reverse", "pre_bucketing_median_reverse"])
def test_pre_aggregated_rules_train_through_the_strategy(runs, name):
    run = runs[name]
    assert run["finite"] and run.get("error") is None and run["accuracy"] > 0.2
    assert len({r["sha"] for r in run["ranks"]}) == 1


# -- sharded decoding (no parameter server) ---------------------------------------------------
@scenarios("sharded_fixed_{attack}", "sharded_clean", "frc_clean")
@pytest.mark.parametrize("attack", ["all", "label_flip"])
def test_sharded_decoding_under_attack_in_both_roles_is_bitwise_the_ps_clean_model(runs, attack):
    """``all``: every gradient attack in turn, one per step, sent as the coded gradient and as decoded shards."""
    run = runs[f"sharded_fixed_{attack}"]
    assert run.get("error") is None, run.get("error")
    assert run["sha"] == runs["frc_clean"]["sha"] == runs["sharded_clean"]["sha"]
    assert run["faulty_counts"] == {"4": STEPS}
    assert all(r["faulty_counts"] == {"4": STEPS} for r in run["ranks"]), "every rank reports the same liar"


@scenarios("sharded_{role}_reverse", "frc_clean")
@pytest.mark.parametrize("role", ["gradient", "decoder"])
def test_a_liar_in_one_role_only_is_named_and_changes_nothing(runs, role):
    run = runs[f"sharded_{role}_reverse"]
    assert run["sha"] == runs["frc_clean"]["sha"] and run["faulty_counts"] == {"4": STEPS}


@scenarios("sharded_two_liars_raise")
def test_more_than_s_sharded_liars_raise_on_every_rank(runs):
    run = runs["sharded_two_liars_raise"]
    assert run["error"]["type"] == "DracoDecodeError" and run["error"]["step"] == 0
    assert all(r["error"] is not None and r["error"]["type"] == "DracoDecodeError" for r in run["ranks"])


@scenarios("sharded_overlap_clean", "frc_overlap_reverse", "frc_clean")
def test_the_communication_thread_leaves_the_model_bitwise_unchanged(runs):
    assert runs["sharded_overlap_clean"]["sha"] == runs["frc_clean"]["sha"]
    assert runs["frc_overlap_reverse"]["sha"] == runs["frc_clean"]["sha"]
    assert runs["frc_overlap_reverse"]["faulty_counts"] == {"4": STEPS}


@scenarios("sharded_clean", "frc_clean")
def test_sharded_traffic_per_rank_stays_within_the_bound(runs):
    s, steps, item = 1, STEPS, 4
    sharded, ps = runs["sharded_clean"], runs["frc_clean"]
    d = sharded["numel"]
    busiest = max(r["exchange_bytes"]["received"] for r in sharded["ranks"]) / steps
    assert busiest <= (2 * (2 * s + 1) + 1) * d * item
    ps_in = max(r["exchange_bytes"]["received"] for r in ps["ranks"]) / steps
    assert ps_in >= (6 - 1) * d * item, "the PS receives every other rank's gradient"


# -- reactive redundancy (groups of s+1; a disagreeing group is recomputed by others and voted) ----------
@scenarios("reactive_clean", "reactive_{ranks}_all")
@pytest.mark.parametrize("ranks", ["fixed", "random"])
def test_reactive_mode_under_every_attack_trains_bitwise_the_reactive_clean_model(runs, ranks):
    clean, run = runs["reactive_clean"], runs[f"reactive_{ranks}_all"]
    assert run.get("error") is None and run["skipped"] == 0
    assert run["sha"] == clean["sha"] and run["params"] == clean["params"]
    assert clean["escalations"]["steps"] == 0, "nobody lies: no group is recomputed"
    # One liar per step: exactly its group escalates, at every step, and it alone is caught.
    assert run["escalations"]["steps"] == run["escalations"]["groups"] == STEPS
    if ranks == "fixed":
        assert run["faulty_counts"] == {"4": STEPS}
    else:
        assert sum(run["faulty_counts"].values()) == STEPS and "0" not in run["faulty_counts"]
    assert all(r["faulty_counts"] == run["faulty_counts"] and r["escalations"]["steps"] == STEPS for r in run["ranks"])


@scenarios("reactive_clean", "reactive_{ranks}_all", "reactive_sharded_{ranks}_all")
@pytest.mark.parametrize("ranks", ["fixed", "random"])
def test_reactive_sharded_decoding_under_every_attack_trains_bitwise_the_reactive_clean_model(runs, ranks):
    run = runs[f"reactive_sharded_{ranks}_all"]
    assert run.get("error") is None, run.get("error")
    assert run["sha"] == runs["reactive_clean"]["sha"]
    assert run["escalations"]["steps"] == STEPS
    if ranks == "fixed":
        expected = runs["reactive_fixed_all"]["faulty_counts"]
    else:  # no rank is trusted without a parameter server: rank 0 may be drawn too
        draw = Adversary(ranks="random", seed=3)
        expected = Counter(str(r) for step in range(STEPS) for r in draw.lying_ranks(step, 6, None, 1))
    assert all(r["faulty_counts"] == expected for r in run["ranks"]), "each step's drawn liar, named"


@scenarios("reactive_clean", "reactive_fixed_label_flip")
def test_reactive_mode_catches_a_liar_that_trains_on_flipped_labels(runs):
    run = runs["reactive_fixed_label_flip"]
    assert run["sha"] == runs["reactive_clean"]["sha"] and run["faulty_counts"] == {"4": STEPS}


@scenarios("reactive_fixed_all")
def test_reactive_mode_recomputes_only_on_the_helpers(runs):
    # Group 2 ({4, 5}) is recomputed by group 0's members in turn: rank 0 (the PS) at even steps, rank 1 at
    # odd; each time both of the group's partitions.
    partitions = [r["escalations"]["partitions"] for r in runs["reactive_fixed_all"]["ranks"]]
    assert partitions == [2 * ((STEPS + 1) // 2), 2 * (STEPS // 2), 0, 0, 0, 0]


@scenarios("reactive_s2_reverse", "frc_clean")
def test_reactive_mode_with_s_2_survives_liars_that_also_recompute_other_groups(runs):
    # With s=2 the reactive groups are three ranks, the one-shot code's groups for s=1: the same sums
    # added in the same order, so the adversary-free reactive model is the one-shot clean model.
    run = runs["reactive_s2_reverse"]
    assert run["sha"] == runs["frc_clean"]["sha"] and run["faulty_counts"] == {"1": STEPS, "3": STEPS}
    assert run["escalations"]["groups"] == 2 * STEPS


@scenarios("reactive_two_liars_raise")
def test_reactive_mode_more_than_s_liars_among_the_copies_raise_on_every_rank(runs):
    run = runs["reactive_two_liars_raise"]
    for seen in run["ranks"]:
        error = seen["error"]
        assert error["type"] == "DracoDecodeError" and error["step"] == 0
        assert "ranks [2, 3, 4]" in error["message"] and "more than s=1 of these ranks lied" in error["message"]
    assert run["global_step"] == 0


@scenarios("reactive_clean", "reactive_quarantine")
def test_a_quarantined_rank_has_its_group_voted_at_every_later_step(runs):
    run = runs["reactive_quarantine"]  # rank 5 lies at steps 0-2 only; quarantine_after=1
    assert run["quarantined"] == [5] and run["faulty_counts"] == {"5": 3}
    assert run["escalations"]["steps"] == STEPS, "caught twice by step 1, then forced at every step"
    assert run["sha"] == runs["reactive_clean"]["sha"]


@scenarios("reactive_accumulation_scheduled")
def test_reactive_mode_refuses_accumulation_a_callback_turns_on_before_any_step(runs):
    """GradientAccumulationScheduler sets accumulate_grad_batches after setup's check: refused at the first
    step as at setup, with a liar present and nobody named (not a vote failure blaming the honest)."""
    run = runs["reactive_accumulation_scheduled"]
    for seen in run["ranks"]:
        assert seen["error"]["type"] == "ValueError"
        assert seen["error"]["message"].startswith(
            "redundancy_mode='reactive' supports accumulate_grad_batches=1 only (got 2)")
    assert run["global_step"] == 0 and run["faulty_counts"] == {}
