"""The ledger of who lied: counts, first sightings, what is logged, when the run stops, the report."""

from lightning_draco.report import FaultLedger


def test_a_rank_is_announced_once_with_its_host_and_counted_at_every_step():
    ledger = FaultLedger(["a", "b", "c"], max_faulty_steps=None)
    first = ledger.record(4, {2}, skipped=False)
    assert len(first) == 1 and "rank 2 on host c" in first[0] and "step 4" in first[0]
    assert ledger.record(5, {2}, skipped=False) == []
    assert ledger.counts() == {2: 2} and ledger.first_caught == {2: 4} and ledger.steps == 2


def test_metrics_name_every_rank_ever_caught_and_the_skipped_steps():
    ledger = FaultLedger(["a", "b", "c"])
    ledger.record(0, {1}, skipped=False)
    ledger.record(1, set(), skipped=True)
    assert ledger.metrics(set()) == {"draco/caught": 0.0, "draco/skipped_steps": 1.0, "draco/times_caught/rank_1": 1.0}


def test_steps_with_news_are_always_logged_others_every_n():
    ledger = FaultLedger(["a"])
    assert ledger.should_log(7, {0}, False, every_n_steps=50) and ledger.should_log(7, set(), True, 50)
    assert not ledger.should_log(7, set(), False, 50) and ledger.should_log(50, set(), False, 50)
    assert ledger.should_log(3, set(), False, 0), "every_n_steps=0 logs every step"


def test_the_run_stops_once_a_rank_passes_max_faulty_steps():
    ledger = FaultLedger(["a", "b"], max_faulty_steps=1)
    ledger.record(0, {1}, skipped=False)
    assert ledger.stop_message() is None
    ledger.record(1, {1}, skipped=False)
    assert "ranks [1] were caught at more than max_faulty_steps=1 steps" in ledger.stop_message()
    assert FaultLedger(["a"], max_faulty_steps=None).stop_message() is None


def test_the_report_tabulates_rank_host_count_and_first_step():
    ledger = FaultLedger(["node-a", "node-b"])
    assert "No rank was caught" in ledger.summary()
    ledger.record(3, {1}, skipped=False)
    ledger.record(4, {1}, skipped=True)
    lines = ledger.summary().splitlines()
    assert lines[0] == "DRACO report: 1 steps decoded, 1 skipped.", "a skipped step was not decoded"
    assert lines[-1].split() == ["1", "node-b", "2", "3"]


def test_the_report_columns_line_up_under_their_headings_whatever_the_host_names_length():
    for host in ["vm", "a-much-longer-host-name"]:
        ledger = FaultLedger(["n0", host])
        for step in range(12):
            ledger.record(step, {1}, skipped=False)
        heading, row = ledger.summary().splitlines()[1:]
        for title, value in [("host", host), ("times caught", "12"), ("first at step", "0")]:
            # Host names align left under their heading; the numbers end where their heading ends.
            column = heading.index(title)
            at = row.index(value, column - len(value) if title != "host" else 0)
            assert (at == column) if title == "host" else (at + len(value) == column + len(title)), (heading, row)


def test_state_round_trips_through_a_checkpoint():
    ledger = FaultLedger(["a", "b"])
    ledger.record(2, {1}, skipped=True)
    restored = FaultLedger(["a", "b"])
    restored.load_state_dict({k: ({str(r): n for r, n in v.items()} if isinstance(v, dict) else v)
                              for k, v in ledger.state_dict().items()})  # JSON-like keys
    assert restored.counts() == {1: 1} and restored.first_caught == {1: 2} and restored.skipped_steps == 1


def test_a_rank_resumed_on_another_host_starts_its_count_afresh_and_keeps_its_history_in_the_report():
    """A node that corrupted gradients is replaced and the job resumes: the replacement is not stopped by
    max_faulty_steps (or quarantined) for what the old node did, and the report still names the old node."""
    before = FaultLedger(["a", "b", "c"], max_faulty_steps=1)
    before.record(0, {1}, skipped=False)
    before.record(1, {1, 2}, skipped=False)
    after = FaultLedger(["a", "fresh", "c"], max_faulty_steps=1)
    after.load_state_dict(before.state_dict())
    assert after.counts() == {2: 1} and after.stop_message() is None
    assert after.earlier == [(1, "b", 2, 0)] and after.steps == 2
    report = after.summary().splitlines()
    assert report[2].split() == ["2", "c", "1", "1"]
    assert report[3].split()[:4] == ["1", "b", "2", "0"] and "(before a resume; rank 1 now runs on fresh)" in report[3]
    # Nobody caught since: the old node is still in the report.
    quiet = FaultLedger(["a", "fresh", "c"])
    quiet.load_state_dict({**before.state_dict(), "times_caught": {1: 2}, "first_caught": {1: 0}})
    assert quiet.counts() == {} and "rank 1 now runs on fresh" in quiet.summary()
    # Resumed again (on the same hosts): the history stays, once.
    again = FaultLedger(["a", "fresh", "c"], max_faulty_steps=1)
    again.load_state_dict(after.state_dict())
    assert again.earlier == [(1, "b", 2, 0)] and again.counts() == {2: 1}
    # On the same host, the count goes on: the node is the one that lied.
    same = FaultLedger(["a", "b", "c"], max_faulty_steps=1)
    same.load_state_dict(before.state_dict())
    assert same.counts() == {1: 2, 2: 1} and same.earlier == [] and "[1]" in same.stop_message()


def test_a_checkpoint_without_host_names_keeps_its_counts():
    saved = FaultLedger(["a", "b"]).state_dict()
    saved.update(times_caught={1: 3}, first_caught={1: 0})
    del saved["hostnames"], saved["earlier"]
    ledger = FaultLedger(["a", "z"])
    ledger.load_state_dict(saved)
    assert ledger.counts() == {1: 3} and ledger.earlier == []


def test_a_rank_outvoted_as_a_decoder_is_not_said_to_have_sent_a_faulty_gradient_only():
    ledger = FaultLedger(["a", "b", "c"])
    [news] = ledger.record(3, {2}, skipped=False, decoders=frozenset({2}))
    assert "rank 2 on host c was outvoted as a decoder" in news and "or sent a faulty gradient, at step 3" in news


def test_the_caught_list_keeps_the_node_that_lied_before_a_requeue_onto_other_nodes():
    """What a run's summary records: the job was requeued and rank 1 now runs elsewhere, so ``counts`` (what
    max_faulty_steps and quarantine see) forgets it, but the node that lied is still listed, with its host."""
    before = FaultLedger(["a", "b", "c"])
    before.record(0, {1}, skipped=False)
    before.record(1, {1}, skipped=False)
    after = FaultLedger(["a", "d", "c"])
    after.load_state_dict(before.state_dict())
    after.record(2, {2}, skipped=False)
    assert after.counts() == {2: 1}
    assert after.caught() == [
        {"rank": 2, "host": "c", "times_caught": 1, "first_at_step": 2, "before_resume": False},
        {"rank": 1, "host": "b", "times_caught": 2, "first_at_step": 0, "before_resume": True},
    ]
    assert FaultLedger(["a"]).caught() == []


def test_a_catch_at_a_skipped_step_does_not_say_the_step_decoded():
    """Without a parameter server a liar can both lie and report a failure: the step is skipped (skip mode),
    and the liar, which every honest rank caught, is named."""
    [news] = FaultLedger(["a", "b"]).record(6, {1}, skipped=True)
    assert "rank 1 on host b sent a faulty gradient at step 6" in news and "the step was skipped" in news
    assert "decoded without it" not in news


def test_a_step_that_failed_and_stopped_the_fit_is_counted_as_failed_not_decoded():
    ledger = FaultLedger(["a", "b", "c"])
    ledger.record(0, set(), skipped=False)
    ledger.record(1, set(), skipped=True)
    (news,) = ledger.record(2, {1}, skipped=False, failed=True)
    assert "set aside and the step failed." in news
    assert ledger.summary().splitlines()[0] == "DRACO report: 1 steps decoded, 1 skipped, 1 failed."
    resumed = FaultLedger(["a", "b", "c"])
    resumed.load_state_dict(ledger.state_dict())
    assert resumed.failed_steps == 1
