"""Reactive redundancy in the exchange: detect in the hook, correct after the backward.

Groups of ``r = s+1`` ranks compute the same sum (``codes/reactive.py``). Per bucket, the hook
gathers every rank's vector to the PS as ``ps_hook`` does; the PS accepts each group whose
replicas agree and, if every group agrees, broadcasts the mean: the step costs what the one-shot
exchange costs. A group whose replicas differ is *pending*: the PS keeps its members' rows and
every rank learns which groups are pending (one small broadcast per bucket, before the values).

After the backward, ``settle`` completes the pending groups: their helpers (``2s+1-r`` ranks
outside the group, ``ReactiveRepetitionCode.helpers``) send the group's sum they recomputed for
each pending bucket, the PS votes the ``2s+1`` copies as the repetition code votes a group, adds
every group's value in group order (the sum is bitwise the one an agreeing step gives) and
broadcasts the corrected buckets and who lied.

Without a parameter server (``decode="sharded"``, ``reactive_sharded_hook``), each shard's
``2s+1`` decoders detect on their shard and the copies of their verdicts (values and pending
groups) are voted as sharded decoding votes; in ``settle`` the helpers send each decoder its
shards of what they recomputed, every decoder votes the pending groups on its shards, and the
decoded shards are voted again.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco.codes import DecodeResult
from lightning_draco.exchange import collectives
from lightning_draco.exchange.ps import share_from_ps
from lightning_draco.exchange.sharded import (
    Gathered,
    agree_on_step,
    decode_shard,
    gather_decoded,
    scatter_to_decoders,
    shard_ballot,
    shard_layout,
    shard_majority,
    vote_shard,
)
from lightning_draco.exchange.state import ExchangeState
from lightning_draco.exchange.verdict import DecodeStatus, judge, record

__all__ = ["Recompute", "reactive_ps_hook", "reactive_sharded_hook", "settle"]

#: ``recompute(group, buckets)``: this rank's sum of ``group``'s partition gradients, flattened in the
#: layout of each of ``buckets`` (bucket index -> flat vector of the bucket's dtype and length).
Recompute = Callable[[int, list[int]], dict[int, Tensor]]


def reactive_ps_hook(state: ExchangeState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Replace the all-reduce of one bucket: gather, accept the groups whose replicas agree, flag the others.

    1. ``gather`` every rank's coded bucket to the PS; every rank notes the bucket's parameters
       (the layout in which helpers will send a recomputed sum).
    2. The PS compares each group's replicas (``detect``) and forces the groups of quarantined ranks.
    3. ``broadcast`` the bucket's flags (status, then one per group): every rank learns the pending groups.
    4. No pending group: the PS broadcasts the mean (the groups' values in group order, over ``P``).
       Otherwise the PS keeps the disagreeing groups' rows and the others' values, and the bucket
       waits for ``settle``; the hook returns the rank's own vector, which ``settle`` replaces.
    """
    setup = state.setup
    code = setup.code
    coded = bucket.buffer()
    index = state.next_bucket()
    pending = state.outcome.pending
    pending.layout[index] = list(bucket.parameters())
    received = state.received_rows(setup.world_size, coded) if setup.is_ps else None
    collectives.gather(state, coded, received, dst=setup.ps_rank)
    groups = code.num_groups
    flags = torch.zeros(1 + groups, dtype=torch.int32, device=coded.device)
    mean = None
    if setup.is_ps:
        start = time.perf_counter()
        rows = received.view(groups, code.redundancy, -1)
        agree = code.detect(received)
        disagree = [g for g in range(groups) if not agree[g] or g in state.forced]
        if disagree:
            # ``received`` is reused by the next bucket: keep what the vote and the sum will need.
            pending.kept[index] = [rows[g].clone() if g in disagree else rows[g, 0].clone() for g in range(groups)]
            flags[1 + torch.tensor(disagree, dtype=torch.long)] = 1
        else:
            mean = code.total([rows[g, 0] for g in range(groups)]).div_(setup.world_size)
            if setup.check_finite and not bool(torch.isfinite(mean).all()):
                flags[0] = DecodeStatus.NONFINITE
        state.stats.seconds["decode"] += time.perf_counter() - start
    collectives.broadcast(state, flags, src=setup.ps_rank)
    values = flags.tolist()
    disagree = [g for g in range(groups) if values[1 + g]]
    if disagree:
        pending.groups[index] = disagree
    else:
        if setup.is_ps:
            coded.copy_(mean)
        collectives.broadcast(state, coded, src=setup.ps_rank)
        if values[0] == DecodeStatus.NONFINITE:
            state.outcome.nonfinite = True
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(coded)
    return future


def settle(state: ExchangeState, recompute: Recompute) -> dict[int, Tensor]:
    """Vote the step's pending groups; every rank gets each pending bucket's corrected mean.

    Called on every rank after the backward, whatever it holds (every rank knows the pending
    groups). Returns bucket index -> the corrected mean, laid out as the bucket (empty when no group
    was pending); the step's outcome gets who lied and, when a vote fails, the failure.

    1. Each helper of a pending group calls ``recompute`` once for all the group's pending buckets
       and sends the pieces to the PS in one message (bucket, then group order); a simulated liar
       corrupts them first (``state.corrupt_recomputed``).
    2. The PS votes each pending group's ``2s+1`` copies per bucket and sums every group in order.
    3. ``share_from_ps``: the corrected buckets and the outcome (caught ranks, or the failure).

    Without a parameter server the same happens shard by shard (``_settle_sharded``).
    """
    pending = state.outcome.pending
    if not pending:
        return {}
    setup, step = state.setup, state.outcome.step
    code = setup.code
    buckets = sorted(pending.groups)
    owed = _owed(state)
    mine = owed.get(setup.rank, [])
    pieces = _recomputed(state, recompute, mine)  # (helper, bucket, group) -> the helper's copy
    if sharded(state):
        return _settle_sharded(state, owed, pieces)
    if mine and not setup.is_ps:
        collectives.send(state, torch.cat([pieces[(setup.rank, index, g)] for index, g in mine]), dst=setup.ps_rank)

    like = {index: _like(pending.layout[index]) for index in buckets}
    verdict = None
    if setup.is_ps:
        for helper in sorted(owed):
            if helper == setup.rank:
                continue
            sizes = [like[index].numel() for index, _ in owed[helper]]
            message = like[owed[helper][0][0]].new_empty(sum(sizes))
            collectives.recv(state, message, src=helper)
            for (index, g), piece in zip(owed[helper], message.split(sizes)):
                pieces[(helper, index, g)] = piece

        def vote() -> DecodeResult:
            totals, faulty = [], set()
            for index in buckets:
                kept = pending.kept[index]
                copies = {
                    g: torch.cat([kept[g], torch.stack([pieces[(h, index, g)] for h in code.helpers(g, step)])])
                    for g in pending.groups[index]
                }
                values = {g: kept[g] for g in range(code.num_groups) if g not in copies}
                result = code.settle(values, copies, step)
                totals.append(result.total)
                faulty.update(result.faulty)
            return DecodeResult(torch.cat(totals), sorted(faulty))

        verdict = judge(state, vote, like[buckets[0]].device, trusted=setup.ps_rank)
    corrected = {index: torch.empty_like(like[index]) for index in buckets}
    outcome, error = share_from_ps(state, [corrected[index] for index in buckets], verdict)
    record(state, outcome, error, buckets[0])
    return corrected


def sharded(state: ExchangeState) -> bool:
    """Whether the step's pending groups were flagged by ``reactive_sharded_hook`` (no parameter server)."""
    return state.outcome.pending.sharded


def _owed(state: ExchangeState) -> dict[int, list[tuple[int, int]]]:
    """Helper -> the (bucket, group) pairs it recomputes and sends, in bucket then group order."""
    pending, code, step = state.outcome.pending, state.setup.code, state.outcome.step
    owed: dict[int, list[tuple[int, int]]] = {}
    for index in sorted(pending.groups):
        for g in pending.groups[index]:
            for helper in code.helpers(g, step):
                owed.setdefault(helper, []).append((index, g))
    return owed


def _recomputed(state: ExchangeState, recompute: Recompute, mine: list[tuple[int, int]]) -> dict:
    """This rank's copies of the groups it recomputes, keyed ``(rank, bucket, group)``: one ``recompute``
    per group for all its pending buckets; a simulated liar corrupts them (``state.corrupt_recomputed``)."""
    rank = state.setup.rank
    pieces: dict[tuple[int, int, int], Tensor] = {}
    for g in sorted({g for _, g in mine}):
        indices = [index for index, group in mine if group == g]
        computed = recompute(g, indices)
        for index in indices:
            value = computed[index]
            if state.corrupt_recomputed is not None:
                value = state.corrupt_recomputed(value, index)
            pieces[(rank, index, g)] = value
    return pieces


# -- without a parameter server ---------------------------------------------------------------------
def reactive_sharded_hook(state: ExchangeState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Replace the all-reduce of one bucket: each shard's ``2s+1`` decoders detect, their verdicts are voted.

    1. ``all_to_all`` as ``sharded_hook``: each decoder gets its shards of every rank's vector.
    2. Each decoder detects per group on each of its shards: all agree, the shard's mean; else zeros
       and the disagreeing groups flagged (a liar as decoder corrupts what it passes on).
    3. ``all_gather`` every decoder's shards and verdicts (``detection_ballot``: the status and one bit
       per group, ``1 + ceil(P / (31 r))`` ints).
    4. Per shard, the copy (values and verdict, bit for bit) that ``s+1`` decoders sent wins; the
       bucket's pending groups are those any shard's winning verdict flags, the same on every rank.
       A decoder keeps its received rows of a pending bucket for ``settle``.
    5. At the step's last bucket, the step's outcome is agreed (``sharded.agree_on_step``).
    """
    setup = state.setup
    code = setup.code
    world, rank = setup.world_size, setup.rank
    coded = bucket.buffer()
    index = state.next_bucket()
    pending = state.outcome.pending
    pending.sharded = True
    pending.layout[index] = list(bucket.parameters())
    received, layout = scatter_to_decoders(state, coded)
    bounds, length, held, _ = layout

    groups = code.num_groups
    values, verdicts, start = [], [], 0
    for k in held[rank]:
        began = time.perf_counter()
        columns = received[:, start : start + length[k]]
        status = DecodeStatus.OK
        agree = code.detect(columns) if length[k] else [True] * groups
        if all(agree):
            rows = columns.view(groups, code.redundancy, -1)
            mean = code.total([rows[g, 0] for g in range(groups)]).div_(world) if length[k] else columns.new_empty(0)
            if setup.check_finite and not bool(torch.isfinite(mean).all()):
                status = DecodeStatus.NONFINITE
        else:
            mean = columns.new_zeros(length[k])
        state.stats.seconds["decode"] += time.perf_counter() - began
        values.append(mean.to(coded.dtype))
        pending_groups = [g for g in range(groups) if not agree[g]]
        verdicts.append(detection_ballot(int(status), pending_groups, groups, coded.device))
        start += length[k]
    decoded = torch.cat(values) if values else coded.new_empty(0)
    if state.corrupt_decoded is not None:  # simulation: a liar lying as a decoder
        decoded = state.corrupt_decoded(decoded, index)
    gathered = gather_decoded(state, decoded, torch.stack(verdicts), layout)

    flagged: set[int] = set()
    for k in range(world):
        verdict = _vote_detection(state, coded[bounds[k] : bounds[k + 1]], k, index, gathered)
        if verdict is not None:
            flagged.update(pending_in(verdict))
    flagged.update(state.forced)
    if flagged:
        pending.groups[index] = sorted(flagged)
        pending.kept[index] = [received]
    if bucket.is_last():
        agree_on_step(state, coded.device, index)
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(coded)
    return future


#: Pending-group flags per int32 word of a detection ballot (the sign bit unused).
_FLAGS_PER_WORD = 31


def detection_ballot(status: int, pending: list[int], num_groups: int, device: torch.device) -> Tensor:
    """A decoder's detection verdict on one shard: the status, then one bit per group (set: pending).

    ``1 + ceil(num_groups / 31)`` int32 words: two words up to 31 groups (``P <= 62`` for ``s = 1``).
    """
    words = [int(status)] + [0] * -(-num_groups // _FLAGS_PER_WORD)
    for g in pending:
        words[1 + g // _FLAGS_PER_WORD] |= 1 << (g % _FLAGS_PER_WORD)
    return torch.tensor(words, dtype=torch.int32, device=device)


def pending_in(ballot: Tensor) -> list[int]:
    """The groups a detection ballot (``detection_ballot``) flags as pending."""
    words = ballot[1:].tolist()
    return [w * _FLAGS_PER_WORD + b for w, word in enumerate(words) for b in range(_FLAGS_PER_WORD) if word >> b & 1]


def _vote_detection(
    state: ExchangeState, target: Tensor, shard: int, index: int, gathered: Gathered
) -> "Tensor | None":
    """Write into ``target`` the shard's values that ``s+1`` of its decoders sent with the same verdict, bit
    for bit (the pending groups included); return that verdict, or ``None`` when no such class exists."""
    vote = shard_majority(state, target, shard, index, gathered, torch.equal, "the same values and verdict")
    if vote is None:
        return None
    if int(vote.verdict[0]) == DecodeStatus.NONFINITE:
        state.outcome.nonfinite = True
    return vote.verdict


def _settle_sharded(state: ExchangeState, owed: dict, pieces: dict) -> dict[int, Tensor]:
    """``settle`` without a parameter server: helpers' shards to the decoders, votes per shard, vote of the votes."""
    setup, pending, step = state.setup, state.outcome.pending, state.outcome.step
    code = setup.code
    world, s, rank = setup.world_size, code.num_adversaries, setup.rank
    buckets = sorted(pending.groups)
    like = {index: _like(pending.layout[index]) for index in buckets}
    layouts = {index: shard_layout(like[index].numel(), world, s) for index in buckets}

    def piece_of(vector: Tensor, index: int, decoder: int) -> Tensor:
        bounds, _, held, _ = layouts[index]
        return torch.cat([vector[bounds[k] : bounds[k + 1]] for k in held[decoder]])

    def size(index: int, decoder: int) -> int:
        return layouts[index].sizes[decoder]

    # 1. Each helper sends every decoder its shards of each copy it recomputed.
    mine = owed.get(rank, [])
    out_sizes = [sum(size(index, j) for index, _ in mine) for j in range(world)]
    in_sizes = [sum(size(index, rank) for index, _ in owed.get(h, [])) for h in range(world)]
    first = like[buckets[0]]
    outgoing = (
        torch.cat([piece_of(pieces[(rank, index, g)], index, j) for j in range(world) for index, g in mine])
        if mine else first.new_empty(0)
    )
    incoming = first.new_empty(sum(in_sizes))
    with collectives.timed(state, "all-to-all"):
        dist.all_to_all_single(incoming, outgoing, in_sizes, out_sizes, group=setup.process_group)
    collectives.count(
        state, sent=outgoing.numel() - out_sizes[rank], received=incoming.numel() - in_sizes[rank], like=first
    )
    received: dict[tuple[int, int, int], Tensor] = {}
    for h, chunk in zip(range(world), incoming.split(in_sizes)):
        parts = [size(index, rank) for index, _ in owed.get(h, [])]
        for (index, g), part in zip(owed.get(h, []), chunk.split(parts)):
            received[(h, index, g)] = part

    # 2. Each decoder votes the pending groups on its shards; 3. the decoded shards are voted.
    corrected = {}
    for index in buckets:
        kept = pending.kept[index][0]  # (P, this decoder's shards of the bucket)
        cut, length, held, _ = layouts[index]
        verdicts, start = [], 0
        for k in held[rank]:
            columns = slice(start, start + length[k])
            copies = {
                g: torch.cat([kept[code.members(g), columns]]
                             + [received[(h, index, g)][None, columns] for h in code.helpers(g, step)])
                for g in pending.groups[index]
            }
            values = {g: kept[g * code.redundancy, columns] for g in range(code.num_groups) if g not in copies}
            if length[k] == 0:
                verdicts.append(decode_shard(state, kept[:, columns], index))
            else:
                verdict = judge(state, lambda: code.settle(values, copies, step), kept.device)
                if verdict.mean is None:  # a failed vote sends zeros; its status says why
                    verdict = verdict._replace(mean=kept.new_zeros(length[k]))
                verdicts.append(verdict)
            start += length[k]
        decoded = torch.cat([v.mean.to(kept.dtype) for v in verdicts]) if verdicts else kept.new_empty(0)
        if state.corrupt_decoded is not None:
            decoded = state.corrupt_decoded(decoded, index)
        ballots = torch.stack([shard_ballot(v.outcome, code.num_adversaries) for v in verdicts])
        gathered = gather_decoded(state, decoded, ballots, layouts[index])
        target = torch.empty_like(like[index])
        for k in range(world):
            vote_shard(state, target[cut[k] : cut[k + 1]], k, index, gathered)
        corrected[index] = target
    agree_on_step(state, first.device, buckets[0])
    return corrected


def _like(layout: list[Tensor]) -> Tensor:
    """An empty flat vector shaped like a bucket of these parameters: their total length, dtype and device."""
    first = layout[0]
    return torch.empty(sum(p.numel() for p in layout), dtype=first.dtype, device=first.device)
