"""Exchange without a parameter server: each shard of a bucket is decoded by 2s+1 ranks, and voted.

Traffic per rank is about ``2 (2s+1)`` buckets whatever ``P``, and no rank is trusted with
gradient values: with at most ``s`` liars in all (in any role), every shard has at least
``s+1`` honest decoders, and honest decoders compute identical bytes from their inputs (the
repetition code's vote picks the honest replica whatever a liar sends), so the copy that ``s+1``
decoders sent bit for bit is the one the parameter server would have computed.

Shard ``k`` of a bucket is its ``k``-th of ``P`` contiguous pieces; its decoders are ranks
``k, k+1, ..., k+2s (mod P)``, so rank ``j`` decodes shards ``j-2s, ..., j (mod P)``.
"""

from collections import Counter
from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco._bits import same_bytes
from lightning_draco.codes import DracoDecodeError
from lightning_draco.exchange import collectives
from lightning_draco.exchange.state import ExchangeState
from lightning_draco.exchange.verdict import CAUGHT, DecodeStatus, Verdict, decode

__all__ = [
    "Gathered", "ShardLayout", "ShardMajority", "agree_on_step", "decode_shard", "decoders_of", "gather_decoded",
    "record_failure", "scatter_to_decoders", "shard_ballot", "shard_bounds", "shard_layout", "shard_majority",
    "shards_of", "sharded_hook", "vote_shard",
]


def shard_bounds(numel: int, world: int) -> list[int]:
    """Offsets of the ``world`` contiguous shards of a bucket of ``numel`` values (``world + 1`` entries)."""
    return [k * numel // world for k in range(world + 1)]


def decoders_of(shard: int, world: int, num_adversaries: int) -> list[int]:
    """The ``2s+1`` ranks that decode ``shard``, in vote order."""
    return [(shard + t) % world for t in range(min(2 * num_adversaries + 1, world))]


def shards_of(decoder: int, world: int, num_adversaries: int) -> list[int]:
    """The shards ``decoder`` decodes, in the order it receives and sends them."""
    m = min(2 * num_adversaries + 1, world)
    return [(decoder - (m - 1) + u) % world for u in range(m)]


def sharded_hook(state: ExchangeState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Replace the all-reduce of one bucket by a decode spread over every rank, voted shard by shard.

    1. Cut the coded bucket into ``P`` contiguous shards.
    2. ``all_to_all``: every rank sends each decoder the shards it decodes (about ``(2s+1) b``
       values out and in, for a bucket of ``b``).
    3. Each rank decodes its ``2s+1`` shards exactly as the parameter server would.
    4. ``all_gather``: every rank receives every decoder's decoded shards and verdicts (status
       and the at most ``s`` ranks it caught: ``1 + s`` integers per shard, whatever ``P``).
    5. Per shard, keep the copy that at least ``s+1`` decoders sent bit for bit; a rank is caught
       when ``s+1`` decoders of a shard name it; a decoder whose copy lost is caught too.
    6. At the step's last bucket, one small all-reduce: any rank's failure fails the step everywhere
       (a liar can stop a run, not change it). Who was caught and whether the gradient is finite, every
       honest rank already found alike in step 5 (it voted the same copies), so a liar's report can
       neither frame an honest rank nor keep its own name out (``agree_on_step``).

    Returns a completed future of the voted mean, written into ``bucket.buffer()``.
    """
    setup = state.setup
    world, s, rank = setup.world_size, setup.code.num_adversaries, setup.rank
    coded = bucket.buffer()
    index = state.next_bucket()
    # 2. Every decoder gets its shards from every rank.
    received, layout = scatter_to_decoders(state, coded)
    bounds, length, held, _ = layout

    # 3. Decode this rank's shards.
    verdicts, start = [], 0
    for k in held[rank]:
        verdicts.append(decode_shard(state, received[:, start : start + length[k]], index))
        start += length[k]
    decoded = torch.cat([v.mean.to(coded.dtype) for v in verdicts]) if verdicts else coded.new_empty(0)
    if state.corrupt_decoded is not None:  # simulation: a liar lying as a decoder (exchange/adversarial.py)
        decoded = state.corrupt_decoded(decoded, index)

    # 4. Everyone receives every decoder's shards (padded to one length) and verdicts.
    ballots = torch.stack([shard_ballot(v.outcome, s) for v in verdicts])
    gathered = gather_decoded(state, decoded, ballots, layout)

    # 5. Vote each shard.
    for k in range(world):
        vote_shard(state, coded[bounds[k] : bounds[k + 1]], k, index, gathered)

    # 6. Agree on the step.
    if bucket.is_last():
        agree_on_step(state, coded.device, index)
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(coded)
    return future


class ShardLayout(NamedTuple):
    """How a bucket is cut: shard offsets and lengths, each rank's shards, each rank's width."""

    bounds: list[int]
    length: list[int]
    held: list[list[int]]
    sizes: list[int]


def shard_layout(numel: int, world: int, num_adversaries: int) -> ShardLayout:
    bounds = shard_bounds(numel, world)
    length = [bounds[k + 1] - bounds[k] for k in range(world)]
    held = [shards_of(j, world, num_adversaries) for j in range(world)]
    return ShardLayout(bounds, length, held, [sum(length[k] for k in held[j]) for j in range(world)])


def scatter_to_decoders(state: ExchangeState, coded: Tensor) -> tuple[Tensor, ShardLayout]:
    """One ``all_to_all``: this rank's shards of every rank's ``coded`` (``(P, width)``), and the layout."""
    setup = state.setup
    world, rank = setup.world_size, setup.rank
    layout = shard_layout(coded.numel(), world, setup.code.num_adversaries)
    bounds, _, held, sizes = layout
    outgoing = torch.cat([coded[bounds[k] : bounds[k + 1]] for j in range(world) for k in held[j]])
    incoming = coded.new_empty(world * sizes[rank])
    with collectives.timed(state, "all-to-all"):
        dist.all_to_all_single(incoming, outgoing, [sizes[rank]] * world, sizes, group=setup.process_group)
    collectives.count(state, sent=outgoing.numel() - sizes[rank], received=incoming.numel() - sizes[rank], like=coded)
    return incoming.view(world, sizes[rank]), layout


class Gathered(NamedTuple):
    """Every decoder's decoded shards and ballots for one bucket, and how the bucket was cut."""

    #: Per rank, its decoded shards end to end (padded to the widest rank's).
    copies: list[Tensor]
    #: Per rank, one ballot per shard it decodes (status, then what that shard's vote needs).
    outcomes: list[Tensor]
    layout: ShardLayout

    def ballot(self, decoder: int, shard: int) -> tuple[Tensor, Tensor]:
        """``decoder``'s decoded values of ``shard`` and its ballot on it."""
        _, length, held, _ = self.layout
        u = held[decoder].index(shard)
        offset = sum(length[k] for k in held[decoder][:u])
        return self.copies[decoder][offset : offset + length[shard]], self.outcomes[decoder][u]


def gather_decoded(state: ExchangeState, decoded: Tensor, ballots: Tensor, layout: ShardLayout) -> Gathered:
    """One ``all_gather`` of every decoder's decoded shards (padded to the widest), one of its ballots."""
    world = state.setup.world_size
    mine = torch.zeros(max(layout.sizes), dtype=decoded.dtype, device=decoded.device)
    mine[: decoded.numel()] = decoded
    copies = [torch.empty_like(mine) for _ in range(world)]
    collectives.all_gather(state, copies, mine)
    outcomes = [torch.empty_like(ballots) for _ in range(world)]
    collectives.all_gather(state, outcomes, ballots)
    return Gathered(copies, outcomes, layout)


def shard_ballot(outcome: Tensor, num_adversaries: int) -> Tensor:
    """A decoder's verdict on one shard in ``1 + s`` entries, whatever ``P``: the status, then the ranks
    it caught (``-1`` pads). A decode that names more than ``s`` ranks has failed, so ``s`` slots suffice."""
    ballot = torch.full((1 + num_adversaries,), -1, dtype=torch.int32, device=outcome.device)
    ballot[0] = outcome[0]
    caught = torch.nonzero(outcome[1:] == CAUGHT).flatten()[:num_adversaries]
    ballot[1 : 1 + caught.numel()] = caught.to(torch.int32)
    return ballot


def decode_shard(state: ExchangeState, received: Tensor, index: int) -> Verdict:
    """One shard decoded as the PS would (no trusted rank, no secret); empty shards are trivially fine."""
    if received.shape[1] == 0:
        outcome = torch.zeros(1 + state.setup.world_size, dtype=torch.int32, device=received.device)
        return Verdict(received.new_empty(0), outcome, None)
    verdict = decode(state, received, index)
    if verdict.mean is None:  # a failed decode sends zeros; its status says why
        verdict = verdict._replace(mean=received.new_zeros(received.shape[1]))
    return verdict


class ShardMajority(NamedTuple):
    """The copies of one shard its decoders sent, and the class that won the vote."""

    decoders: list[int]
    #: Per decoder, in vote order: (its decoded values of the shard, its ballot).
    ballots: list[tuple[Tensor, Tensor]]
    #: Positions in ``decoders`` of the winning class (at least ``s+1``, bitwise the same).
    winner: list[int]

    @property
    def verdict(self) -> Tensor:
        return self.ballots[self.winner[0]][1]


def shard_majority(
    state: ExchangeState,
    target: Tensor,
    shard: int,
    index: int,
    gathered: Gathered,
    same_ballot: Callable[[Tensor, Tensor], bool],
    agreeing_on: str,
) -> Optional[ShardMajority]:
    """Write into ``target`` the copy of ``shard`` that at least ``s+1`` of its decoders sent bit for bit
    with ballots ``same_ballot`` calls equal; note the decoders outvoted. ``None`` (and the step's
    failure, naming the decoders) when no such class exists: more than ``s`` ranks lied.

    ``gathered``: what ``gather_decoded`` returned for the bucket.
    """
    setup, step = state.setup, state.outcome
    s = setup.code.num_adversaries
    decoders = decoders_of(shard, setup.world_size, s)
    ballots = [gathered.ballot(j, shard) for j in decoders]
    classes: list[list[int]] = []
    for t, (values, ballot) in enumerate(ballots):
        for members in classes:
            other_values, other_ballot = ballots[members[0]]
            if same_ballot(ballot, other_ballot) and same_bytes(values, other_values):
                members.append(t)
                break
        else:
            classes.append([t])
    winners = [members for members in classes if len(members) >= s + 1]
    if not winners:
        record_failure(step, DracoDecodeError(
            f"no s+1={s + 1} of the decoders {decoders} of shard {shard} sent {agreeing_on}: more than"
            f" s={s} ranks lied.", decoders,
        ), index)
        return None
    winner = winners[0]
    target.copy_(ballots[winner[0]][0])
    step.decoders_outvoted.update(decoders[t] for t in range(len(decoders)) if t not in winner)
    return ShardMajority(decoders, ballots, winner)


def vote_shard(state: ExchangeState, target: Tensor, shard: int, index: int, gathered: Gathered) -> None:
    """Write into ``target`` the copy of ``shard`` that at least ``s+1`` of its decoders sent; record the rest.

    Copies agree when their values are the same bits and their statuses are the same; a rank is caught
    when ``s+1`` of the shard's decoders name it.
    """
    step, s = state.outcome, state.setup.code.num_adversaries
    vote = shard_majority(
        state, target, shard, index, gathered, lambda a, b: int(a[0]) == int(b[0]), "the same decoded values"
    )
    if vote is None:
        return
    named = Counter(int(r) for _, ballot in vote.ballots for r in ballot[1:].tolist() if r >= 0)
    step.caught.update(r for r, times in named.items() if times >= s + 1)
    status = int(vote.verdict[0])
    if status == DecodeStatus.FAILED:
        record_failure(step, DracoDecodeError(
            f"the decoders {[vote.decoders[t] for t in vote.winner]} of shard {shard} agree that the vectors"
            f" reveal more than s={s} liars; the decoded gradient is not applied.", [],
        ), index)
    elif status == DecodeStatus.NONFINITE:
        step.nonfinite = True


def record_failure(step, error: DracoDecodeError, index: int) -> None:
    if step.failure is None:
        step.failure = error.at(step.step, index)


def agree_on_step(state: ExchangeState, device: torch.device, index: int) -> None:
    """One all-reduce (sum) of ``[failed, nonfinite, caught flags..., outvoted flags...]``, after which any
    rank's failure fails the step on every rank: a liar can stop a run, not change it.

    Who was caught, and whether the gradient is finite, each rank takes from its own votes. Every rank voted
    every shard from the same gathered copies, so each honest rank found exactly what the other honest ranks
    (at least ``P - s >= s + 1`` of them) found, and only liars: a rank named by s+1 decoders of a shard (one
    of them honest), a decoder whose copy lost to s+1 equal copies (honest decoders compute the same bytes).
    The sum's other entries are not read (they are still sent: the traffic formulas count them): a liar may
    add any integer to them, 2 to frame an honest rank at s = 1, or a negative count to keep its own name out
    or to hide a NaN the honest ranks found.

    A step this rank found failed (more than s liars) names nobody: colluders that won one shard's vote name
    the honest member they outvoted, as through the parameter server.
    """
    setup, step = state.setup, state.outcome
    world = setup.world_size
    flags = torch.zeros(2 + 2 * world, dtype=torch.int32, device=device)
    flags[0] = int(step.failure is not None)
    flags[1] = int(step.nonfinite)
    for r in step.caught:
        flags[2 + r] = 1
    for r in step.decoders_outvoted:
        flags[2 + world + r] = 1
    collectives.all_reduce_sum(state, flags)
    if step.failure is not None:
        step.caught, step.decoders_outvoted = set(), set()
        return
    if int(flags[0]) != 0:
        record_failure(step, DracoDecodeError(
            "another rank found this step's decode failed (more than s ranks lied, or a liar reported a"
            " failure); every rank fails the step together.", [],
        ), index)
    step.caught |= step.decoders_outvoted
