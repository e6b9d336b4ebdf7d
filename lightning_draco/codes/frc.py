"""Fractional repetition code: groups of r workers compute the same sum, the server takes a verified vote."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from lightning_draco._bits import bits_dtype
from lightning_draco.codes import register_code
from lightning_draco.codes.base import Code, DecodeResult, DracoDecodeError, accumulation_dtype


# Members within this many noise floors of each other agree, when the floor estimated from the group's
# own replicas (non-deterministic kernels) is above ``tolerance``.
NOISE_MARGIN = 8.0
# ... up to this relative distance: replicas further apart than that are not rounding noise (TF32 and
# atomics give 1e-4..1e-3), and a group with more than s liars must not widen its own radius.
MAX_NOISE = 1e-2


def relative_distances(members: Tensor, chunk_size: int = 1 << 20) -> tuple[Tensor, Tensor]:
    """``(relative, finite)``: the members' pairwise distances relative to the larger norm (``(m, m)``
    float64 on the CPU, ``inf`` where either member has a NaN or Inf), and which members are finite."""
    m = members.shape[0]
    sq_dist = torch.zeros(m, m, dtype=torch.float64)
    sq_norm = torch.zeros(m, dtype=torch.float64)
    finite = torch.ones(m, dtype=torch.bool)
    for start in range(0, members.shape[1], chunk_size):
        block = members[:, start : start + chunk_size].to(torch.float64)
        finite &= torch.isfinite(block).all(dim=1).cpu()
        sq_norm += (block * block).sum(dim=1).cpu()
        sq_dist += torch.cdist(block, block).pow(2).cpu()
    norm, dist = sq_norm.sqrt(), sq_dist.clamp_min(0).sqrt()
    scale = torch.maximum(norm[:, None], norm[None, :]).clamp_min(1e-300)
    relative = torch.where(finite[:, None] & finite[None, :], dist / scale, torch.full_like(dist, math.inf))
    relative.fill_diagonal_(0.0)
    return relative, finite


def noise_radius(tolerance: float, floor: float) -> float:
    """The relative distance within which replicas agree: ``tolerance``, or ``NOISE_MARGIN`` noise floors
    (at most ``MAX_NOISE``) when that is larger."""
    return max(tolerance, min(NOISE_MARGIN * floor, MAX_NOISE)) if math.isfinite(floor) else tolerance


@register_code
class FractionalRepetitionCode(Code):
    """DRACO's repetition code for ``P`` workers, ``s`` adversaries and redundancy ``r`` (``r | P``).

    Workers are split into ``P / r`` groups of ``r`` consecutive indices; group ``g`` holds
    partitions ``g*r .. g*r + r - 1`` and each of its members sends the sum of their gradients.

    Decoding, per group and per block of ``chunk_size`` coordinates:

    1. Compare every member with the first bit for bit; if at least ``s + 1`` agree (and the
       others are too few to form a second such class), the first member's block is honest:
       any ``s + 1`` members include an honest one, and honest members agree.
    2. Otherwise split the members into classes of bitwise-identical blocks. Exactly one class
       of at least ``s + 1`` members is the honest value; two such classes mean more than ``s``
       liars and raise ``DracoDecodeError``.
    3. Where no class reaches ``s + 1`` (replicas whose kernels are not deterministic), fall
       back to comparing whole vectors: ``a`` and ``b`` agree when both are finite and
       ``||a - b|| <= radius * max(||a||, ||b||)``, the radius being ``tolerance`` or, if larger,
       ``NOISE_MARGIN`` times the noise floor measured from the group's own replicas (see
       ``_tolerance_vote``). A liar inside the radius can move its group's term by at most twice
       the radius (relative); it never makes the decode raise nor gets an honest member named.
    4. Sum the winners over groups (float32 accumulation for half precision). Members that
       differ from their group's winner anywhere are reported as faulty.

    On the CPU, blocks are compared and summed while they are in cache, so the decode reads the
    received data once, as a plain mean does. On accelerators (or with ``batched=True``) the
    common case, where every group's first member is in its majority, is settled first by one
    batched comparison and a single host sync; otherwise the block-wise vote runs.
    """

    name = "frc"
    shardable = True
    options = ("tolerance",)
    supports_aggregation = True

    def __init__(
        self,
        num_workers: int,
        num_adversaries: int,
        redundancy: Optional[int] = None,
        *,
        tolerance: float = 1e-5,
        chunk_size: int = 1 << 20,
        batched: Optional[bool] = None,
    ):
        super().__init__(num_workers, num_adversaries, redundancy)
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 (got {tolerance!r}).")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {chunk_size!r}).")
        self.tolerance = float(tolerance)
        self.chunk_size = int(chunk_size)
        self.batched = batched
        self._matrix: Optional[Tensor] = None
        #: The noise floor the last tolerance vote measured (``None`` before any): read by the reactive mode.
        self.measured_floor: Optional[float] = None

    @classmethod
    def check(cls, num_adversaries: int, redundancy: int, num_workers: Optional[int] = None) -> None:
        super().check(num_adversaries, redundancy, num_workers)
        if redundancy < 2 * num_adversaries + 1:
            raise ValueError(
                f"redundancy must be at least 2 * num_adversaries + 1 = {2 * num_adversaries + 1}"
                f" to tolerate {num_adversaries} adversaries (got redundancy={redundancy})."
            )
        if num_workers is not None:
            if num_workers < redundancy:
                raise ValueError(
                    f"the number of workers ({num_workers}) must be at least the redundancy r={redundancy}."
                )
            if num_workers % redundancy:
                raise ValueError(
                    f"code='frc' needs the redundancy r={redundancy} to divide the number of workers"
                    f" ({num_workers}); use a world size that is a multiple of {redundancy}, or code='crc'."
                )

    @property
    def num_groups(self) -> int:
        return self.num_workers // self.redundancy

    def group_of(self, worker: int) -> int:
        return worker // self.redundancy

    def members(self, group: int) -> list[int]:
        return list(range(group * self.redundancy, (group + 1) * self.redundancy))

    def partitions(self, worker: int) -> list[int]:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}) (got {worker}).")
        return self.members(self.group_of(worker))

    @property
    def encoding_matrix(self) -> Tensor:
        if self._matrix is None:
            block = torch.ones(self.redundancy, self.redundancy, dtype=torch.float64)
            self._matrix = torch.block_diag(*([block] * self.num_groups))
        return self._matrix

    # -- decoding ---------------------------------------------------------------------------
    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        total, faulty = self._vote_groups(received, per_group=False)
        return DecodeResult(total, faulty)

    def parts(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> tuple[Tensor, list[int]]:
        """Each group's verified sum, ``(P / r, d)``: what a DETOX-style rule aggregates robustly."""
        return self._vote_groups(received, per_group=True)

    def _vote_groups(self, received: Tensor, per_group: bool) -> tuple[Tensor, list[int]]:
        """The vote; returns the sum of the group winners (or each group's winner) and the faulty workers."""
        self._check_received(received)
        received = received.contiguous()
        num_groups, r = self.num_groups, self.redundancy
        d = received.shape[1]
        rows = received.view(num_groups, r, d)
        bits = rows.view(bits_dtype(received))
        acc = accumulation_dtype(received.dtype)
        if self.batched or (self.batched is None and received.device.type != "cpu"):
            # On accelerators each per-block comparison is a host sync; one batched comparison is cheaper.
            whole = self._vote_all_at_once(bits)
            if whole is not None:
                winners, faulty = whole
                chosen = rows[torch.arange(num_groups, device=rows.device), torch.tensor(winners, device=rows.device)]
                if per_group:
                    return chosen.to(acc), faulty
                total = torch.zeros(d, dtype=acc, device=received.device)
                for g in range(num_groups):  # in group order, as the block-wise path adds them
                    total.add_(chosen[g])
                return total, faulty
        out = torch.empty((num_groups, d) if per_group else (d,), dtype=acc, device=received.device)
        faulty: set[int] = set()
        unresolved: dict[int, list[slice]] = {}

        for start in range(0, d, self.chunk_size):
            block = slice(start, min(d, start + self.chunk_size))
            winners = []
            for g in range(num_groups):
                winner = self._vote(bits[g, :, block], g, faulty)
                if winner is None:
                    unresolved.setdefault(g, []).append(block)
                else:
                    winners.append((g, winner))
            if per_group:
                for g, w in winners:
                    out[g, block] = rows[g, w, block]
            else:
                # Group by group in a fixed order, whichever member won: the sum is bitwise the same
                # whoever lied, since winners are bitwise the honest value.
                target = out[block]
                target.zero_()
                for g, w in winners:
                    target.add_(rows[g, w, block])

        for g, blocks in unresolved.items():
            winner, agreeing = self._tolerance_vote(rows[g], g)
            for block in blocks:
                if per_group:
                    out[g, block] = rows[g, winner, block]
                else:
                    out[block] += rows[g, winner, block].to(acc)
            group = self.members(g)
            faulty.difference_update(group)
            faulty.update(w for m, w in enumerate(group) if not agreeing[m])
        return out, sorted(faulty)

    def _sole_majority(self, size: int) -> bool:
        """A class of ``size`` members is a verified majority and the others are too few to form a second."""
        need = self.num_adversaries + 1
        return size >= need and self.redundancy - size < need

    def _vote_all_at_once(self, bits: Tensor) -> Optional[tuple[list[int], list[int]]]:
        """The common case in batched passes and at most two host syncs: every group has a whole-row majority.

        First every member is compared with its group's first member; only if some group's first
        member is not in a sole majority are the other pairs compared too. Returns each group's
        winning member and the faulty workers, or None when some group needs the block-wise vote.
        """
        r = self.redundancy
        equal = torch.eye(r, dtype=torch.bool).repeat(self.num_groups, 1, 1)

        def compare(pairs: list[tuple[int, int]]) -> None:
            if pairs:  # comparisons on views (no copies of the data), one sync for the lot
                same = torch.stack([(bits[:, a] == bits[:, b]).all(dim=1) for a, b in pairs], dim=1).cpu()
                for k, (a, b) in enumerate(pairs):
                    equal[:, a, b] = equal[:, b, a] = same[:, k]

        compare([(0, b) for b in range(1, r)])
        if not all(self._sole_majority(int(equal[g, 0].sum())) for g in range(self.num_groups)):
            compare([(a, b) for a in range(1, r) for b in range(a + 1, r)])
        winners, faulty = [], []
        for g in range(self.num_groups):
            sizes = equal[g].sum(dim=1)
            leaders = [m for m in range(r) if self._sole_majority(int(sizes[m]))]
            if not leaders:
                return None
            winners.append(leaders[0])
            faulty += [g * r + m for m in range(r) if not equal[g, leaders[0], m]]
        return winners, faulty

    def _vote(self, block: Tensor, group: int, faulty: set[int]) -> Optional[int]:
        """Index within the group of a member whose block at least s+1 members share, or None."""
        r, need = self.redundancy, self.num_adversaries + 1
        first = [0] + [m for m in range(1, r) if torch.equal(block[m], block[0])]
        classes = [first]
        if not self._sole_majority(len(first)):
            for m in range(1, r):
                if m in first:
                    continue
                for members in classes[1:]:
                    if torch.equal(block[m], block[members[0]]):
                        members.append(m)
                        break
                else:
                    classes.append([m])
        majorities = [members for members in classes if len(members) >= need]
        if len(majorities) > 1:
            workers = self.members(group)
            raise DracoDecodeError(
                f"group {group} (workers {workers}) holds {len(majorities)} different values each sent by at"
                f" least s+1={need} members: more than s={self.num_adversaries} of them are faulty.",
                workers,
            )
        if not majorities:
            return None
        winner = majorities[0]
        base = group * r
        faulty.update(base + m for m in range(r) if m not in winner)
        return winner[0]

    def _tolerance_vote(self, members: Tensor, group: int) -> tuple[int, list[bool]]:
        """Vote on whole vectors that agree within a radius: (winner index, not-named flags).

        1. Distances between members, relative to the larger norm. The honest noise floor is
           estimated from this group's own data: each member's distance to its ``s``-th nearest
           other member, and the median of those over the members: honest members have
           at least ``s`` honest neighbours, so with at most ``s`` liars the median never exceeds the
           largest honest distance, whatever the liars send.
        2. Members agree within ``max(tolerance, min(NOISE_MARGIN * floor, MAX_NOISE))``.
        3. The winner is the member that agrees with the most others (at least ``s + 1`` with
           itself; else ``DracoDecodeError``), ties broken by the smaller total distance to those
           it agrees with. A liar can win only by agreeing with an honest member: its value is then
           within the radius of an honest one. Liars placed inside the radius of some honest
           replicas and outside another's no longer make the decode raise.
        4. A member is named only if it disagrees with at least ``s + 1`` others: an honest one
           disagrees with at most the ``s`` liars.
        """
        r, s = self.redundancy, self.num_adversaries
        need = s + 1
        workers = self.members(group)
        if self.tolerance == 0:
            raise DracoDecodeError(
                f"group {group} (workers {workers}): no value is sent bit for bit by at least s+1={need} of its"
                f" {r} members, and tolerance=0 allows no approximate agreement: more than s={s} of them are"
                " faulty.",
                workers,
            )
        relative, finite = relative_distances(members, self.chunk_size)
        nearest = relative.sort(dim=1).values[:, s] if s else torch.zeros(r, dtype=torch.float64)
        floor = float(nearest[finite].median()) if bool(finite.any()) else math.inf
        self.measured_floor = floor
        radius = noise_radius(self.tolerance, floor)
        agree = (relative <= radius) & finite[:, None] & finite[None, :]
        counts = agree.sum(dim=1)
        best = int(counts.max())
        if best < need or radius == 0:
            raise DracoDecodeError(
                f"group {group} (workers {workers}): no value is shared, even within a relative distance of"
                f" {radius:.2g}, by at least s+1={need} of its {r} members: more than s={s} of them are faulty.",
                workers,
            )
        spread = torch.where(agree, relative, torch.zeros_like(relative)).sum(dim=1)
        winner = min((m for m in range(r) if int(counts[m]) == best), key=lambda m: float(spread[m]))
        named = [int((~agree[m]).sum()) >= need for m in range(r)]
        return winner, [not flag for flag in named]
