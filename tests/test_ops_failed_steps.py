"""What a failed or disputed step tells the operator: who is named, and whether the model is said to diverge.

A step whose decode fails shows more than ``s`` liars: colluders may then have won another bucket's vote and
named the honest member they outvoted, so such a step names nobody (docs/codes.md, "More liars than s").
Without a parameter server every honest rank votes the same gathered copies and finds what the others find;
what a liar adds to the step's all-reduce of reports (any integer) must not change who is named, nor whether
the gradient is finite.
"""

import pytest
import torch

from lightning_draco.codes import DracoDecodeError, FractionalRepetitionCode
from lightning_draco.exchange import ExchangeSetup, ExchangeState, sharded
from lightning_draco.exchange.verdict import decode, record
from lightning_draco.report import FaultLedger

WORLD, S = 6, 1  # groups {0, 1, 2} and {3, 4, 5}


def _honest_rows(code):
    gradients = torch.randn(WORLD, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return code.encode(gradients)


def _colluders_outvote_rank_3(rows):
    """Ranks 4 and 5 send the same wrong vector: a verified majority of group 1 that names honest rank 3."""
    lie = rows.clone()
    lie[4] = lie[5] = -100 * rows[4]
    return lie


def _colluders_disagree(rows):
    """Ranks 4 and 5 send different wrong vectors: group 1 has no majority, the decode fails."""
    lie = rows.clone()
    lie[4], lie[5] = -100 * rows[4], torch.full_like(rows[5], 7.0)
    return lie


@pytest.mark.parametrize("failing_bucket_first", [False, True])
def test_a_step_whose_decode_failed_through_the_ps_names_no_honest_rank(failing_bucket_first):
    code = FractionalRepetitionCode(WORLD, S)
    state = ExchangeState(ExchangeSetup(code, rank=0, ps_rank=0))
    state.begin_step(7)
    rows = _honest_rows(code)
    buckets = [_colluders_outvote_rank_3(rows), _colluders_disagree(rows)]
    if failing_bucket_first:
        buckets.reverse()
    for index, received in enumerate(buckets):
        verdict = decode(state, received, index, trusted=0)
        record(state, verdict.outcome, verdict.error, index)
    assert state.outcome.failure is not None and "more than s=1 of them are faulty" in str(state.outcome.failure)
    assert state.outcome.caught == set(), "rank 3 is honest: ranks 4 and 5 outvoted it"
    # What the strategy then records under on_decode_failure="skip": the skipped step, nobody caught.
    ledger = FaultLedger([f"node{r // 3}" for r in range(WORLD)])
    assert ledger.record(7, state.outcome.caught, skipped=True) == []
    assert ledger.counts() == {} and "No rank was caught" in ledger.summary()


def test_a_liar_caught_in_a_step_that_decoded_is_still_named_through_the_ps():
    code = FractionalRepetitionCode(WORLD, S)
    state = ExchangeState(ExchangeSetup(code, rank=0, ps_rank=0))
    state.begin_step(2)
    rows = _honest_rows(code)
    lie = rows.clone()
    lie[4] = -100 * rows[4]
    for index, received in enumerate([rows, lie]):
        verdict = decode(state, received, index, trusted=0)
        record(state, verdict.outcome, verdict.error, index)
    assert state.outcome.failure is None and state.outcome.caught == {4}


def _agree(monkeypatch, mine, others):
    """Run ``sharded.agree_on_step`` on rank 0, whose local findings are ``mine``, the other ranks' flags
    summed into ``others``: ``{"failed": n, "nonfinite": n, "caught": {rank: n}, "outvoted": {rank: n}}``."""
    code = FractionalRepetitionCode(WORLD, S)
    state = ExchangeState(ExchangeSetup(code, rank=0, ps_rank=None))
    state.begin_step(5)
    step = state.outcome
    step.nonfinite = mine.get("nonfinite", False)
    step.caught = set(mine.get("caught", ()))
    if mine.get("failed"):
        sharded.record_failure(step, DracoDecodeError("no s+1=2 of the decoders agree", [3, 4, 5]), 0)
    summed = torch.zeros(2 + 2 * WORLD, dtype=torch.int32)
    summed[0], summed[1] = others.get("failed", 0), others.get("nonfinite", 0)
    for rank, times in others.get("caught", {}).items():
        summed[2 + rank] = times
    for rank, times in others.get("outvoted", {}).items():
        summed[2 + WORLD + rank] = times

    def all_reduce_sum(state, tensor):
        tensor += summed

    monkeypatch.setattr(sharded.collectives, "all_reduce_sum", all_reduce_sum)
    sharded.agree_on_step(state, torch.device("cpu"), 0)
    return step


def test_one_liar_saying_the_gradient_is_not_finite_does_not_make_the_honest_ranks_agree_on_it(monkeypatch):
    # Rank 4 alone reports a NaN; the five honest ranks found the step finite and caught rank 4.
    step = _agree(monkeypatch, {"caught": {4}}, {"nonfinite": 1, "caught": {4: 4}})
    assert not step.nonfinite, "the strategy would say the honest ranks agree on a NaN and the model diverged"
    assert step.caught == {4} and step.failure is None


def test_a_non_finite_gradient_the_honest_ranks_found_is_reported(monkeypatch):
    step = _agree(monkeypatch, {"nonfinite": True}, {"nonfinite": 4})
    assert step.nonfinite


def test_a_sharded_step_the_honest_ranks_found_failed_names_nobody(monkeypatch):
    # Colluders 4 and 5 outvoted rank 3 in one shard and failed another: every honest rank saw both.
    step = _agree(monkeypatch, {"failed": True, "caught": {3}}, {"failed": 3, "caught": {3: 3}})
    assert step.failure is not None and step.caught == set() and step.decoders_outvoted == set()


def test_a_failure_only_a_liar_reports_still_fails_the_step_and_keeps_the_liar_named(monkeypatch):
    # Rank 4 lied in its gradient (every honest rank caught it) and reported a failure nobody else found.
    step = _agree(monkeypatch, {"caught": {4}}, {"failed": 1, "caught": {4: 4}})
    assert step.failure is not None and "another rank found this step's decode failed" in str(step.failure)
    assert step.caught == {4}


@pytest.mark.parametrize("count", [2, 1000])
def test_a_liar_adding_more_than_one_to_the_agreement_cannot_frame_an_honest_rank(monkeypatch, count):
    # Rank 4 lied, every honest rank caught it; in the step's all-reduce it adds `count` reports against rank 1.
    step = _agree(monkeypatch, {"caught": {4}}, {"caught": {4: 4, 1: count}})
    assert step.caught == {4} and step.failure is None


@pytest.mark.parametrize("count", [-4, -1000])
def test_a_liar_subtracting_from_the_agreement_keeps_neither_its_name_nor_a_nan_out(monkeypatch, count):
    # Every honest rank caught rank 4 and found the gradient not finite; rank 4 sends negative counts for both.
    step = _agree(monkeypatch, {"caught": {4}, "nonfinite": True}, {"caught": {4: 4 + count}, "nonfinite": 4 + count})
    assert step.caught == {4} and step.nonfinite
