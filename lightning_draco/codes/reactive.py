"""The repetition code in reactive mode: ``s+1`` replicas detect a lie, ``2s+1`` copies correct it.

``DracoStrategy(code="frc", redundancy_mode="reactive")`` splits the ``P`` ranks into groups of
``r = s+1`` (by default) that compute the same sum of ``r`` partition gradients. Among any
``s+1`` members at least one is honest, so when all of a group's copies are bitwise equal that
value is the honest one (``detect``). When they differ, ``2s+1-r`` ranks outside the group
(``helpers``) compute the group's sum too, and the ``2s+1`` copies are voted as the one-shot
repetition code votes a group (``settle``). The decoded total adds the groups' values in group
order, so it is bitwise the same whether a group was accepted at once or after a vote.

Everything here is pure torch on tensors: no process groups, no Lightning. The class is built by
``DracoConfig`` for ``redundancy_mode="reactive"``; it is not a code name of its own.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_draco._bits import bits_dtype, same_bytes
from lightning_draco.codes.base import Code, DecodeResult, DracoDecodeError, accumulation_dtype
from lightning_draco.codes.frc import FractionalRepetitionCode, _pair_equalities, noise_radius, relative_distances

__all__ = ["EscalationNeeded", "ReactiveRepetitionCode"]


class EscalationNeeded(DracoDecodeError):
    """Some group's replicas differ: its sum is known only after ``2s+1`` copies are voted."""


class ReactiveRepetitionCode(FractionalRepetitionCode):
    """Groups of ``r`` (``s+1 <= r <= 2s``, default ``s+1``) consecutive ranks; detect, then correct.

    Args:
        num_workers: ``P``, a multiple of ``r`` and at least ``2s+1`` (helpers come from other groups).
        num_adversaries: ``s``.
        redundancy: ``r``, the group size (default ``s+1``).
        tolerance: ``None``: replicas agree only bit for bit until the hardware shows honest noise
            (see ``detect``). A number: replicas within that relative distance also agree, and the
            escalation's vote uses it as the repetition code does (default there: 1e-5).
        learn_floor: whether the votes' noise floor widens detection (``noise_floor``).

    The noise floor (``noise_floor``) is measured by the escalation votes, whose ``2s+1`` copies hold
    an honest majority: the repetition code's estimate (median over copies of the distance to the
    ``s``-th nearest other) never exceeds the largest honest distance, whatever the liars send.
    ``s+1`` copies alone could not give it: a liar would set the floor to its own distance.
    """

    name = "frc"
    shardable = True
    supports_aggregation = False

    def __init__(
        self,
        num_workers: int,
        num_adversaries: int,
        redundancy: Optional[int] = None,
        *,
        tolerance: Optional[float] = None,
        chunk_size: int = 1 << 20,
        learn_floor: bool = True,
    ):
        super().__init__(num_workers, num_adversaries, redundancy, tolerance=tolerance, chunk_size=chunk_size)
        #: The honest noise floor the escalation votes measured (0: none seen, replicas bitwise equal).
        self.noise_floor = 0.0
        #: Whether votes update ``noise_floor``. Off where several decoders must reach the same verdict
        #: from their own copies of the code (sharded decoding): each would learn from its own shards.
        self.learn_floor = learn_floor
        # k escalated groups of 2s+1 copies each: the one-shot code's vote over k groups, reused as is
        # (one voter per k, made when first needed).
        self._voter_options = dict(tolerance=tolerance, chunk_size=chunk_size, batched=False, fused=False)
        self._voters: dict[int, FractionalRepetitionCode] = {}

    @classmethod
    def default_redundancy(cls, num_adversaries: int) -> int:
        return num_adversaries + 1

    @classmethod
    def check(cls, num_adversaries: int, redundancy: int, num_workers: Optional[int] = None) -> None:
        Code.check(num_adversaries, redundancy, num_workers)
        s, r = num_adversaries, redundancy
        if r < s + 1:
            raise ValueError(
                f"redundancy_mode='reactive' needs redundancy >= num_adversaries + 1 = {s + 1} (got redundancy={r}):"
                " with fewer replicas in a group, s liars could send the same lie and be believed."
            )
        if r > max(s + 1, 2 * s):
            raise ValueError(
                f"redundancy_mode='reactive' needs redundancy between s+1 = {s + 1} and 2s = {max(s + 1, 2 * s)}"
                f" (got redundancy={r}): with 2s+1 replicas every group already holds a majority, which is"
                " redundancy_mode='full'."
            )
        if num_workers is None:
            return
        if num_workers % r:
            raise ValueError(
                f"redundancy_mode='reactive' needs the group size r={r} to divide the number of ranks"
                f" ({num_workers}); use a world size that is a multiple of {r}."
            )
        if r < 2 * s + 1 and num_workers < 2 * s + 1:
            raise ValueError(
                f"redundancy_mode='reactive' needs at least 2s+1 = {2 * s + 1} ranks (got {num_workers}): a group whose"
                f" replicas disagree is recomputed by {2 * s + 1 - r} ranks outside it."
            )

    # -- who computes what ---------------------------------------------------------------------
    @property
    def num_helpers(self) -> int:
        """Ranks outside a group that recompute it when it escalates: ``2s+1-r``."""
        return 2 * self.num_adversaries + 1 - self.redundancy

    def helpers(self, group: int, step: int) -> list[int]:
        """The ranks that recompute ``group`` at ``step``: members of the next group, rotating with the step.

        ``2s+1-r <= r-1`` of them, so they fit in one group; each rank helps only the group before its
        own, so no rank recomputes two groups at a step. The rotation spreads the extra work over the
        next group's members.
        """
        r = self.redundancy
        following = ((group + 1) % self.num_groups) * r
        return [following + (step + t) % r for t in range(self.num_helpers)]

    def holders(self, group: int, step: int) -> list[int]:
        """The ranks whose copies of ``group``'s sum are voted: its members, then its helpers."""
        return self.members(group) + self.helpers(group, step)

    def helped_by(self, rank: int, step: int) -> Optional[int]:
        """The group ``rank`` recomputes at ``step`` if it escalates, or ``None``."""
        group = (self.group_of(rank) - 1) % self.num_groups
        return group if rank in self.helpers(group, step) and group != self.group_of(rank) else None

    # -- detection ----------------------------------------------------------------------------
    @property
    def detection_radius(self) -> float:
        """How far (relative) ``s+1`` replicas may differ and still agree without a vote.

        0 (bit for bit) until a vote has measured honest noise, unless the user set a tolerance; then
        the repetition code's radius: ``max(tolerance, min(8 * floor, 1e-2))``.
        """
        if self.noise_floor > 0:
            return noise_radius(self.tolerance, self.noise_floor)
        return self.tolerance if self.tolerance_declared else 0.0

    def detect(self, received: Tensor) -> list[bool]:
        """Per group, whether its members' vectors agree (``received``: ``(P, d)``).

        Bit for bit first (one comparison of each member with the first); a group that differs
        agrees only if every pair is finite and within ``detection_radius``, or, within a radius, if no
        member is finite: its honest member's value is then not finite either (an overflow that a
        GradScaler skips), and no vote could say more. An agreeing group's value is its first member's.
        """
        self._check_received(received)
        r = self.redundancy
        rows = received.view(self.num_groups, r, -1)
        bits = rows.view(bits_dtype(received))
        if received.device.type == "cpu":  # memcmp per member (same_bytes): no comparison tensor written
            agree = [all(same_bytes(bits[g, m], bits[g, 0]) for m in range(1, r)) for g in range(self.num_groups)]
        else:  # one batched comparison of every member with the first, one host sync
            agree = _pair_equalities(bits, tuple((0, m) for m in range(1, r))).all(dim=1).tolist()
        radius = self.detection_radius
        if radius > 0:
            for g in range(self.num_groups):
                if not agree[g]:
                    relative, finite = relative_distances(rows[g], self.chunk_size)
                    agree[g] = bool(finite.all()) and bool((relative <= radius).all()) or not bool(finite.any())
        return agree

    def total(self, values: list[Tensor]) -> Tensor:
        """The sum of the groups' values, added in group order (float32 accumulation for half precision)."""
        acc = accumulation_dtype(values[0].dtype)
        total = torch.zeros(values[0].shape, dtype=acc, device=values[0].device)
        for value in values:
            total.add_(value)
        return total

    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        """The total when every group agrees; ``EscalationNeeded`` naming the groups' members otherwise.

        This is what a simulated liar can compute of the defence (``adversarial.simulated_defence``):
        any difference it makes escalates and is voted away.
        """
        agree = self.detect(received)
        if not all(agree):
            suspects = [w for g, ok in enumerate(agree) if not ok for w in self.members(g)]
            raise EscalationNeeded("the replicas of some groups differ: they escalate.", suspects)
        rows = received.view(self.num_groups, self.redundancy, -1)
        return DecodeResult(self.total([rows[g, 0] for g in range(self.num_groups)]), [])

    # -- correction ---------------------------------------------------------------------------
    def vote(self, copies: Tensor, holders: list[int]) -> tuple[Tensor, list[int]]:
        """The value of one escalated group from its ``2s+1`` copies (``(2s+1, d)``, rows by ``holders``):
        ``vote_groups`` of that group alone."""
        values, faulty = self.vote_groups([copies], [holders])
        return values[0], faulty

    def vote_groups(self, copies: list[Tensor], holders: list[list[int]]) -> tuple[list[Tensor], list[int]]:
        """The values of a decode's escalated groups, each from its ``2s+1`` copies (rows by ``holders``).

        The one-shot code's vote over these groups together: in each, a bitwise class of ``s+1``
        copies wins; two such classes, or none even within the noise-floor radius, raise
        ``DracoDecodeError``. Together, so that the noise one group's honest copies show spares an
        honest copy that differs from another group's bitwise class (voted alone, that copy would be
        named: nothing in its own group shows the noise). Returns each group's winning value
        (accumulation dtype) and the holders whose copy differs from it. A tolerance vote's noise
        floor becomes ``noise_floor`` (replicas are not bitwise equal here).

        A group with ``s+1`` non-finite copies and no bitwise class is not voted: one of those copies is
        honest, so the group's value is not finite (an overflow that a GradScaler skips, or a diverged
        model), whatever the others sent. Its first non-finite copy is its value and nobody in it is
        named: honest copies that overflowed apart hold no common value to vote, and the step is not
        applied.
        """
        s = self.num_adversaries
        width = 2 * s + 1
        for group_copies, group_holders in zip(copies, holders):
            if group_copies.shape[0] != width or len(group_holders) != width:
                raise ValueError(f"an escalated group is voted over 2s+1 = {width} copies (got {group_copies.shape[0]}).")
        values: list[Optional[Tensor]] = [self._overflowed_value(group_copies) for group_copies in copies]
        voted = [i for i, value in enumerate(values) if value is None]
        faulty: list[int] = []
        if voted:
            won, faulty = self._vote_together([copies[i] for i in voted], [holders[i] for i in voted])
            for i, value in zip(voted, won):
                values[i] = value
        return values, faulty

    def _overflowed_value(self, copies: Tensor) -> Optional[Tensor]:
        """The value of a group whose ``2s+1`` copies hold ``s+1`` non-finite ones and no bitwise class of ``s+1``
        (its first non-finite copy, in the accumulation dtype); ``None`` for a group the vote settles."""
        need = self.num_adversaries + 1
        # A finite row sum proves its row finite (one cheap pass); only the others are checked entry by entry.
        suspects = (~torch.isfinite(copies.sum(dim=1))).nonzero().flatten().tolist()
        nonfinite = [m for m in suspects if not bool(torch.isfinite(copies[m]).all())]
        if len(nonfinite) < need:
            return None
        # Of 2s+1 copies at most one class of s+1 can be bitwise equal: the one-shot code's bitwise vote finds it.
        if self._voter(1)._vote(copies) is not None:
            return None
        return copies[nonfinite[0]].to(accumulation_dtype(copies.dtype))

    def _voter(self, groups: int) -> FractionalRepetitionCode:
        """The one-shot code that votes ``groups`` escalated groups together, each over its ``2s+1`` copies."""
        voter = self._voters.get(groups)
        if voter is None:
            width = 2 * self.num_adversaries + 1
            voter = self._voters[groups] = FractionalRepetitionCode(
                groups * width, self.num_adversaries, width, **self._voter_options)
        return voter

    def _vote_together(self, copies: list[Tensor], holders: list[list[int]]) -> tuple[list[Tensor], list[int]]:
        """``vote_groups`` of groups that the vote settles: the one-shot code's vote over them together."""
        s = self.num_adversaries
        width = 2 * s + 1
        voter = self._voter(len(copies))
        voter.measured_floor = None
        try:
            values, faulty = voter.parts(torch.cat(copies))
        except DracoDecodeError as error:
            groups = sorted({i // width for i in error.suspects}) or list(range(len(copies)))
            ranks = [holders[g] for g in groups]
            raise DracoDecodeError(
                f"the 2s+1 = {width} copies of one group's sum from ranks {ranks[0]} (members, then the ranks"
                f" that recomputed it) hold no value sent by s+1 = {s + 1} of them: more than s={s} of these ranks"
                " lied.",
                sorted({rank for group in ranks for rank in group}),
            ) from error
        floor = voter.measured_floor
        if self.learn_floor and floor is not None and 0 < floor < float("inf"):
            self.noise_floor = floor
        return list(values), sorted({holders[i // width][i % width] for i in faulty})

    def settle(self, values: dict[int, Tensor], copies: dict[int, Tensor], step: int) -> DecodeResult:
        """The total once the escalated groups are voted (together: ``vote_groups``).

        ``values``: the agreeing groups' values; ``copies``: each escalated group's ``(2s+1, d)`` copies,
        its members' rows then its helpers' (``holders``). Returns the total and the ranks caught.
        """
        escalated = sorted(copies)
        if not escalated:
            return DecodeResult(self.total([values[g] for g in range(self.num_groups)]), [])
        voted, faulty = self.vote_groups([copies[g] for g in escalated], [self.holders(g, step) for g in escalated])
        won = dict(zip(escalated, voted))
        ordered = [won[g] if g in won else values[g] for g in range(self.num_groups)]
        return DecodeResult(self.total(ordered), faulty)

    # -- what a resumed run must carry ----------------------------------------------------------
    def state_dict(self) -> dict:
        return {"noise_floor": self.noise_floor}

    def load_state_dict(self, state: dict) -> None:
        self.noise_floor = float(state.get("noise_floor", 0.0))

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, redundancy_mode='reactive')"
