"""Fractional repetition code: groups of r workers compute the same sum, the server takes a verified vote."""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from lightning_draco._bits import bits_dtype, same_bytes
from lightning_draco._errors import described
from lightning_draco.codes import _triton, frc_triton, register_code
from lightning_draco.codes.base import Code, DecodeResult, DracoDecodeError, accumulation_dtype


# The whole-vector vote's radius when no tolerance is given (relative; fp32 rounding of long sums).
DEFAULT_TOLERANCE = 1e-5
# Members within this many noise floors of each other agree, when the floor estimated from the
# replicas themselves (non-deterministic kernels) is above ``tolerance``.
NOISE_MARGIN = 8.0
# ... up to this relative distance: replicas further apart than that are not rounding noise (TF32 and
# atomics give 1e-4..1e-3), and a group with more than s liars must not widen its own radius.
MAX_NOISE = 1e-2
# Two members that each agree with s+1 members are at most three radii apart when at most s lie (each
# is within the radius of an honest member, and honest members are within the radius of each other);
# further apart than this many radii, the group holds two values and more than s liars.
RIVAL_RADII = 4.0


# -- the fused path: one compiled pass compares the members, one compiled pass sums the winners -----------
# Coordinates each comparison reduces before the rest is reduced eagerly. One reduction over the whole
# row, with only groups x pairs results, ran on an H200 as a few thread blocks walking the rows (8 ns per
# coordinate: 465x the mean at P = 15, d = 11.2M); pieces give groups x pairs x d / piece results to spread.
# On an H100 at P = 15, d = 11.2M the comparison took 1.4x the mean's time in pieces of 4,096, 2.2x in
# pieces of 16,384 and 2.9x in pieces of 262,144; at d = 100M every size took 0.8x to 1.3x.
_EQUALITY_PIECE = 1 << 12
#: ``kernel=``: how the fused decode runs. "triton": one Triton pass compares the members and sums the
#: likely winners (frc_triton.py; on CPU tensors only in Triton's interpreter); "compiled": two
#: ``torch.compile``-d passes, one for each; "auto": Triton where it runs (on CUDA where it is installed;
#: on the CPU only with ``TRITON_INTERPRET=1``), else the compiled passes.
KERNELS = ("auto", "triton", "compiled")


def _piece_equalities(body: Tensor, pairs: tuple[tuple[int, int], ...]) -> Tensor:
    """``(groups, len(pairs), pieces)`` for ``body`` of shape ``(groups, r, pieces, _EQUALITY_PIECE)``:
    whether members ``a`` and ``b`` of each group are equal bit for bit in each piece. Compiled, every
    pair's reduction shares one loop that reads each member once."""
    return torch.stack([(body[:, a] == body[:, b]).all(dim=-1) for a, b in pairs], dim=1)


def _block_equalities(
    bits: Tensor, pairs: tuple[tuple[int, int], ...], size: int, whole_blocks: Callable[..., Tensor] = _piece_equalities
) -> Tensor:
    """``(groups, len(pairs), blocks)``: whether members ``a`` and ``b`` of each group are equal bit for bit
    in each block of ``size`` coordinates (the last one may be shorter).

    ``bits`` is the ``(groups, r, d)`` integer view of the received rows; ``whole_blocks`` compares the
    whole blocks (``_piece_equalities``, or its compiled form), the few coordinates left over are compared here.
    """
    groups, _, d = bits.shape
    whole = d - d % size
    parts = []
    if whole:
        parts.append(whole_blocks(bits[:, :, :whole].unflatten(2, (whole // size, size)), pairs))
    if d % size:
        parts.append(_piece_equalities(bits[:, :, whole:].unsqueeze(2), pairs))
    return torch.cat(parts, dim=2) if parts else torch.ones(groups, len(pairs), 0, dtype=torch.bool, device=bits.device)


def _pair_equalities(
    bits: Tensor, pairs: tuple[tuple[int, int], ...], pieces: Callable[..., Tensor] = _piece_equalities
) -> Tensor:
    """``(groups, len(pairs))``: whether members ``a`` and ``b`` of each group are equal bit for bit, over
    the whole rows, compared in pieces of ``_EQUALITY_PIECE`` coordinates (``pieces``: see ``_block_equalities``)."""
    return _block_equalities(bits, pairs, _EQUALITY_PIECE, pieces).all(dim=-1)


def _ordered_sum(rows: Tensor, member: int, zero: Tensor) -> Tensor:
    """``((0 + rows[0, m]) + rows[1, m]) + ...`` in ``zero``'s dtype: the reference decode's additions, in order.

    ``zero`` is a 0-d tensor of +0.0 passed in at run time: a constant zero would be folded away by the
    compiler, and ``+0.0 + (-0.0)`` is ``+0.0``, which the reference returns.
    """
    total = zero
    for g in range(rows.shape[0]):
        total = total + rows[g, member].to(zero.dtype)
    return total


# Coordinates per piece when measuring how far a member is from its group's winner: few launches (each
# piece's squares are added in float64, so its length costs no accuracy).
_DISTANCE_STEP = 1 << 22
# ... after a first piece this long: a gross lie (-100x) is told from it, without a pass over the row.
# The Triton pass measures the same piece (frc_triton.PROBE), so that it can tell such a lie itself.
_DISTANCE_PROBE = frc_triton.PROBE
# A gross lie told by the Triton pass's own sums: beyond this relative margin over the reference's bar
# (the pass adds float32 squares in blocks of 512, at most ~3e-5 off, then in float64; the reference
# adds in float64), and only where the winner's squared norm is at least this (below, float32 squares
# that underflowed would shrink the bar): else the reference measures it.
_MEASURED_MARGIN = 1e-2
_MEASURED_LEAST = 1e-20


# Coordinates a float32 sum of squares runs over before the sums are added in float64: one sum over
# millions of coordinates drifts by up to a few percent on crafted data (a large square early in each
# vector lane absorbs the small ones after it: 3% over 4M coordinates, measured), one over 4,096 by
# ~2.4e-4 at most.
_NORM_ROW = 1 << 12


def _sq_norm(v: Tensor) -> float:
    """``||v||^2`` as a Python float (``_sq_norms``)."""
    return _sq_norms([v])[0]


def _sq_norms(pieces: list[Tensor]) -> list[float]:
    """Each piece's squared norm as a Python float, with one host sync for them all (and one more per piece
    redone). Squares in float32 (half precision widened) over rows of ``_NORM_ROW`` coordinates, the rows
    added in float64 (float64 pieces: float64 throughout); redone wholly in float64 where float32 squares
    overflowed or underflowed although the piece is finite."""
    if not pieces:
        return []
    squares = torch.stack([_row_squares(v) for v in pieces]).tolist()
    out = []
    for v, square in zip(pieces, squares):
        if (square == 0.0 or not math.isfinite(square)) and v.dtype != torch.float64 and bool(torch.isfinite(v).all()):
            square = float(torch.linalg.vector_norm(v, dtype=torch.float64)) ** 2
        out.append(square)
    return out


def _row_squares(v: Tensor) -> Tensor:
    """``v``'s sum of squares as a float64 scalar tensor, as ``_sq_norms`` takes it."""
    if v.dtype == torch.float64:
        return torch.linalg.vector_norm(v).square()
    whole = v.numel() - v.numel() % _NORM_ROW
    rows = [torch.linalg.vector_norm(v[:whole].reshape(-1, _NORM_ROW), dim=1, dtype=torch.float32)] if whole else []
    if v.numel() > whole or not rows:
        rows.append(torch.linalg.vector_norm(v[whole:], dtype=torch.float32).reshape(1))
    return (torch.cat(rows) if len(rows) > 1 else rows[0]).double().square().sum()


_KERNELS = {"pieces": _piece_equalities, "sum": _ordered_sum}
_COMPILED: dict[tuple, Callable] = {}
# (device type, dtype, kernel) where the fused path failed: from then on the next kernel "auto" allows
# runs there (Triton, then the compiled passes), or, where none is left, the reference path.
_FUSED_FAILED: set[tuple[str, torch.dtype, str]] = set()


def _compiled(name: str, *key) -> Callable:
    """``torch.compile`` of kernel ``name`` for ``key`` (device, dtype, ...), compiled once per key.

    Each key compiles its own copy of the function, so that dtypes and group layouts do not share
    (and exhaust) one function's recompilation budget; ``dynamic=True`` makes one kernel serve every
    bucket length (and, for the comparison, every number of groups: it is called only where both are
    at least 2, sizes that would otherwise each compile a variant; the sum unrolls its loop over the
    groups, so its key holds their number).
    """
    if (name, *key) not in _COMPILED:
        fn = _KERNELS[name]
        fresh = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
        _COMPILED[(name, *key)] = torch.compile(fresh, dynamic=True, fullgraph=True)
    return _COMPILED[(name, *key)]


@dataclass
class _Vote:
    """What the bitwise vote leaves for naming and for the tolerance vote.

    ``winners[g]`` gives, for block ``i`` (of ``chunk_size`` coordinates), the member whose block won;
    ``differs[g]``: the members of a wholly resolved group that differ from the winner somewhere;
    ``unresolved[g]``: the blocks where no single class of s+1 bitwise-equal members exists.
    """

    out: Tensor
    winners: dict[int, Callable[[int], int]] = field(default_factory=dict)
    differs: dict[int, set[int]] = field(default_factory=dict)
    unresolved: dict[int, list[slice]] = field(default_factory=dict)
    #: Per group, the Triton pass's measurements of its winner (``frc_triton.Compared.measured``), where
    #: the member it measured won in every group; else None.
    measured: Optional[list[tuple[float, list[float]]]] = None


def relative_distances(members: Tensor, chunk_size: int = 1 << 20) -> tuple[Tensor, Tensor]:
    """``(relative, finite)``: the members' pairwise distances ``||a - b|| / max(||a||, ||b||)`` (``(m, m)``
    float64 on the CPU, ``inf`` where either member has a NaN or Inf), and which members are finite.

    Block by block on the members' device: each difference is taken in the accumulation dtype (float32
    for float32 and half precision; exact where two members are within a factor 2 of each other, as
    noisy replicas are) and its squared norm (one ``dot`` per block) added in float64. Blocks whose float32
    squares over- or underflowed, or that hold a member under 1e-8 that is not all zeros, are redone in
    float64; a member is finite when its squared norm is.
    """
    m, d = members.shape
    acc = torch.float64 if members.dtype == torch.float64 else torch.float32
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    starts = list(range(0, d, chunk_size)) or [0]

    difference = torch.empty(min(d, chunk_size), dtype=acc, device=members.device)  # reused: no allocation per pair

    def measure(block: Tensor) -> Tensor:
        """Per block: the members' squared norms, then each pair's squared distance (``dot``: a third of
        ``vector_norm``'s time on the CPU, measured)."""
        out = difference[: block.shape[1]].to(block.dtype)
        squares = [torch.dot(block[i], block[i]) for i in range(m)]
        for i, j in pairs:
            torch.sub(block[i], block[j], out=out)
            squares.append(torch.dot(out, out))
        return torch.stack(squares)

    values = torch.stack([measure(members[:, start : start + chunk_size].to(acc)) for start in starts]).double()
    if acc == torch.float32:
        inexact = (values > 1e36) | ((values < 1e-34) & (values > 0)) | torch.isinf(values)
        # Members under 1e-8: a difference of 1e-8 of them has float32 squares that underflow, so a lie
        # among tiny gradients would read as distance 0. An all-zero member (frozen parameters) is exact.
        tiny = values[:, :m] < 1e-16
        for k, i in torch.nonzero(tiny).tolist():
            if bool(members[i, starts[k] : starts[k] + chunk_size].abs().amax() > 0):
                inexact[k, i] = True
        for k in torch.nonzero(inexact.any(dim=1)).flatten().tolist():
            block = members[:, starts[k] : starts[k] + chunk_size].to(torch.float64)
            values[k] = measure(block)  # a NaN or Inf member stays NaN or Inf
    totals = values.sum(dim=0).cpu()
    sq_norm, sq_pair = totals[:m], totals[m:]
    finite = torch.isfinite(sq_norm)
    sq_dist = torch.zeros(m, m, dtype=torch.float64)
    for (i, j), value in zip(pairs, sq_pair.tolist()):
        sq_dist[i, j] = sq_dist[j, i] = value
    norm, dist = sq_norm.sqrt(), sq_dist.sqrt()
    scale = torch.maximum(norm[:, None], norm[None, :]).clamp_min(1e-300)
    relative = torch.where(finite[:, None] & finite[None, :], dist / scale, torch.full_like(dist, math.inf))
    return relative.fill_diagonal_(0.0), finite


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
    2. Otherwise split the members into classes of bitwise-identical blocks. If exactly one class
       has at least ``s + 1`` members, its block is an honest replica's, bit for bit.
    3. Where no class reaches ``s + 1``, or several do (with ``r > 2s+1``, honest replicas of
       non-deterministic kernels can form two), the group is settled on whole vectors: ``a`` and
       ``b`` agree when both are finite and ``||a - b|| <= R * max(||a||, ||b||)``, the radius ``R``
       being ``tolerance`` (default 1e-5; or half precision's rounding unit, if larger: ``least_radius``)
       or, if larger, ``NOISE_MARGIN`` times the noise floor measured in this decode (at most
       ``MAX_NOISE``; see ``_noise_floor`` and ``_noise_floor_of``). The winner agrees with the
       most members, at least ``s + 1``; two such members more than ``RIVAL_RADII * R`` apart mean
       more than ``s`` liars (``DracoDecodeError``). A liar inside the radius can move its group's
       term by at most ``R`` (relative); it never makes the decode raise nor gets an honest member named.
    4. Sum the winners over groups (float32 accumulation for half precision).

    Naming. In a group settled on whole vectors, a member is named when it disagrees with at least
    ``s + 1`` members. In a group settled bit for bit, a member that differs from the winning value (an
    honest replica's) is spared only when its relative distance to it is within ``NOISE_MARGIN`` times
    the noise floor measured in this decode (at most ``MAX_NOISE``), or within ``tolerance`` when one is
    given explicitly; otherwise it is named. So with deterministic kernels (no noise anywhere, the
    default) every difference is a lie, a single flipped low bit included; with non-deterministic
    kernels the noise that groups show spares honest replicas that differ from a bitwise class. Where
    honest replicas agree within the radius that applies, no honest member is ever named, the decode
    never raises with at most ``s`` liars, and every liar farther than the radius from the honest values
    is named; a spared lie does not move a bitwise-settled group's term at all, and moves a
    whole-vector group's by at most ``R``. ``tolerance=0`` declares replicas bitwise equal: every
    member that differs anywhere is named, and no approximate agreement is accepted.

    What the data cannot tell apart: in a decode where the only difference is one member off a
    bitwise class (one group; or liars copying honest replicas in every noisy group), a noisy honest
    replica looks exactly like a liar with a small lie. Undeclared, it is named (as a flipped bit must
    be); give ``tolerance`` (the replicas' known spread) to spare it. The noise floor is measured over
    every group that is not unanimous, so that liar-free groups lend their noise to the others.

    On the CPU, blocks are compared and summed while they are in cache, so the decode reads the
    received data once, as a plain mean does. On accelerators (or with ``batched=True``) the
    common case, where every group has a whole-row majority, is settled first by one batched
    comparison and a single host sync; otherwise the block-wise vote runs, its blocks compared in one
    batch too (one more sync, not one per comparison). With ``fused`` (default:
    on CUDA) that comparison and the sum of the winners are one Triton pass (``kernel="triton"``, the
    default where Triton runs) or two ``torch.compile``-d passes (``kernel="compiled"``); results and named
    workers are the same as the block-wise vote's, bit for bit (but for the payload of a NaN widened from
    half precision), and where a kernel fails the next runs instead (Triton, the compiled passes, the
    block-wise vote), with a warning.
    """

    name = "frc"
    shardable = True
    options = ("tolerance",)
    #: The ``kernel=`` choices (``KERNELS``).
    kernels = KERNELS
    supports_aggregation = True

    def __init__(
        self,
        num_workers: int,
        num_adversaries: int,
        redundancy: Optional[int] = None,
        *,
        tolerance: Optional[float] = None,
        chunk_size: int = 1 << 20,
        batched: Optional[bool] = None,
        fused: Optional[bool] = None,
        kernel: str = "auto",
    ):
        super().__init__(num_workers, num_adversaries, redundancy)
        if tolerance is not None and not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 (got {tolerance!r}).")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 (got {chunk_size!r}).")
        _triton.check_kernel(kernel, KERNELS)
        #: Whether the user stated how far honest replicas may differ (then it also spares members
        #: that differ from a bitwise class by less); ``None`` means 1e-5 for the whole-vector vote only.
        self.tolerance_declared = tolerance is not None
        self.tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
        self.chunk_size = int(chunk_size)
        self.batched = batched
        self.fused = fused
        #: How the fused decode runs: see ``KERNELS``.
        self.kernel = kernel
        self._matrix: Optional[Tensor] = None
        #: The member the fused decode sums before the vote is known: the last decode's common winner,
        #: so that a liar that stays at some group's first member costs the extra pass once, not every step.
        self._likely_winner = 0
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
        vote = None
        kernel = self._fused_kernel(received) if d else None
        if kernel is not None:
            vote = self._fused_vote(rows, bits, acc, per_group, kernel)
        elif self.batched or (self.batched is None and received.device.type != "cpu"):
            # On accelerators each per-block comparison is a host sync; one batched comparison is cheaper.
            vote = self._batched_vote(rows, bits, acc, per_group)
        if vote is None:
            vote = self._blockwise_vote(rows, bits, acc, per_group)
        return vote.out, self._settle(rows, vote, acc, per_group)

    # -- the bitwise vote, three ways with one outcome ----------------------------------------
    def _fused_kernel(self, received: Tensor) -> Optional[str]:
        """How the fused decode runs on ``received`` ("triton" or "compiled"); None where it does not."""
        device = received.device.type
        if not (self.fused if self.fused is not None else device == "cuda"):
            return None
        kernels = [self.kernel]
        if self.kernel == "auto":
            kernels = ["triton", "compiled"] if _triton.available(received.device) else ["compiled"]
        return next((k for k in kernels if (device, received.dtype, k) not in _FUSED_FAILED), None)

    def _fused_vote(
        self, rows: Tensor, bits: Tensor, acc: torch.dtype, per_group: bool, kernel: str
    ) -> Optional[_Vote]:
        """The whole-row vote with compiled passes; None when some group needs the block-wise vote.

        With ``kernel="triton"`` steps 1 and 2 are one pass (frc_triton.py), which also measures the
        likely winner's norm and every member's distance to it over the first piece: a member that
        differs grossly is then named from those sums (``_measured_far``), with no further pass.

        1. One pass compares the members of every group bit for bit (all pairs at once for r <= 5:
           the pass reads every member anyway).
        2. Queued behind it before the host reads the comparison: one pass that sums, in group order,
           member ``m`` of every group, ``m`` the last decode's common winner (the first member at first).
        3. The vote. If ``m`` is in every group's winning class, that sum is bit for bit the sum of the
           winners the reference adds (each class is bitwise equal); otherwise the sum is redone with the
           first member that is in every class, or, where none is, the winners are added one by one, as
           the reference does.
        """
        r, device = self.redundancy, rows.device.type
        try:
            def compare(pairs: list[tuple[int, int]]) -> Union[Tensor, list[list[bool]]]:
                if kernel == "triton":  # every pair in one pass (no sum), then the ones asked for
                    every = self._first_pairs(pairs_first=True)
                    equal = frc_triton.compare_and_sum(rows, bits, None, acc, r - 1).equal
                    return [[same[every.index(pair)] for pair in pairs] for same in equal]
                # Compiled only where the groups and the pieces are at least 2: sizes 0 and 1 would each
                # compile a variant of their own (and exhaust the recompilation budget); eager there.
                compiled = rows.shape[0] >= 2 and bits.shape[2] >= 2 * _EQUALITY_PIECE
                pieces = _compiled("pieces", device, bits.dtype, tuple(pairs)) if compiled else _piece_equalities
                return _pair_equalities(bits, tuple(pairs), pieces)

            def winners_sum(m: int) -> Tensor:
                if kernel == "triton":
                    return frc_triton.compare_and_sum(rows, bits, m, acc, 0).total
                zero = torch.zeros((), dtype=acc, device=rows.device)
                # Keyed by the number of groups too: the sum's loop over groups is unrolled, so each count
                # is a graph of its own and would otherwise spend one function's recompilation budget.
                return _compiled("sum", device, rows.dtype, m, rows.shape[0])(rows, m, zero)

            pairs_first = r <= 5
            first = self._first_pairs(pairs_first)
            guess = self._likely_winner
            measured = None
            if kernel == "triton":
                # One pass: the comparison of the first pairs, the sum of the likely winners and what
                # naming a gross liar needs, together; one transfer brings what the host votes on.
                leaders = (r - 1 if pairs_first else 1) if first else 0
                one = None if per_group else guess
                queued, speculative, measured = frc_triton.compare_and_sum(rows, bits, one, acc, leaders, measure=one)
            else:
                # Both passes are queued before the host waits for the comparison: on a GPU the sum of the
                # likely winners (the first members, or the last decode's winners) runs while the host votes.
                queued = compare(first) if first else None  # r = 1: nothing to compare
                speculative = None if per_group else winners_sum(guess)
            classes = self._whole_row_vote(lambda pairs: queued if pairs == first else compare(pairs), pairs_first)
            if classes is None:
                return None
            common = set.intersection(*classes)
            if common:
                m = guess if guess in common else min(common)
                self._likely_winner = m
                if per_group:
                    out = rows[:, m].to(acc, copy=True)
                else:
                    out = speculative if m == guess else winners_sum(m)
                vote = self._whole_row_outcome(out, [m] * len(classes), classes)
                vote.measured = measured if m == guess else None
                return vote
        except Exception as err:  # noqa: BLE001 - any failure to compile or launch: the next kernel, same results
            _FUSED_FAILED.add((device, rows.dtype, kernel))
            after = self._fused_kernel(rows[:, 0])
            instead = "the block-wise decode runs instead" if after is None else (
                f"this decode runs block-wise and later ones with the {after} kernel")
            warnings.warn(
                f"FractionalRepetitionCode: the fused decode ({kernel} kernel) could not run on {device} for"
                f" {rows.dtype} ({described(err)}); {instead} (same results, slower).",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return self._winners_outcome(rows, classes, acc, per_group)

    def _batched_vote(self, rows: Tensor, bits: Tensor, acc: torch.dtype, per_group: bool) -> Optional[_Vote]:
        """The whole-row vote in eager torch: comparisons on views (no copies), one sync per round."""

        def compare(pairs: list[tuple[int, int]]) -> Tensor:
            return _pair_equalities(bits, tuple(pairs)).cpu()

        classes = self._whole_row_vote(compare, pairs_first=False)
        return None if classes is None else self._winners_outcome(rows, classes, acc, per_group)

    def _winners_outcome(self, rows: Tensor, classes: list[set[int]], acc: torch.dtype, per_group: bool) -> _Vote:
        """Each group's winner (the first member of its class), summed in group order as the reference does."""
        winners = [min(members) for members in classes]
        num_groups, d = rows.shape[0], rows.shape[2]
        chosen = rows[torch.arange(num_groups, device=rows.device), torch.tensor(winners, device=rows.device)]
        if per_group:
            out = chosen.to(acc)
        else:
            out = torch.zeros(d, dtype=acc, device=rows.device)
            for g in range(num_groups):
                out.add_(chosen[g])
        return self._whole_row_outcome(out, winners, classes)

    def _whole_row_outcome(self, out: Tensor, winners: list[int], classes: list[set[int]]) -> _Vote:
        vote = _Vote(out)
        for g, (w, members) in enumerate(zip(winners, classes)):
            vote.winners[g] = lambda i, w=w: w
            if len(members) < self.redundancy:
                vote.differs[g] = set(range(self.redundancy)) - members
        return vote

    def _sole_majority(self, size: int) -> bool:
        """A class of ``size`` members is a verified majority and the others are too few to form a second."""
        need = self.num_adversaries + 1
        return size >= need and self.redundancy - size < need

    def _whole_row_vote(
        self, compare: Callable[[list[tuple[int, int]]], Tensor], pairs_first: bool
    ) -> Optional[list[set[int]]]:
        """The common case: every group has a whole-row majority. Each group's winning class of members.

        ``compare(pairs)`` says, per group, which pairs of members are equal bit for bit (a tensor, or
        lists already on the host). First every
        member is compared with its group's first member (or, with ``pairs_first``, with every other
        member at once); the other pairs only if some group's first member is not in a sole majority.
        Returns None when some group needs the block-wise vote. The bookkeeping is plain Python on
        the one host copy of the comparisons: per-group tensor indexing cost more than the comparison
        itself on a GPU at d = 11.2M.
        """
        r = self.redundancy
        first = self._first_pairs(pairs_first)

        def compared(pairs: list[tuple[int, int]]) -> list[list[bool]]:
            found = compare(pairs)
            return found.tolist() if isinstance(found, Tensor) else found

        # A group whose first comparisons are all equal is unanimous (bitwise equality is transitive): the
        # usual case, settled without the pairwise table built below for the others.
        found = compared(first) if first else [[] for _ in range(self.num_groups)]
        classes: list[Optional[set[int]]] = [set(range(r)) if all(row) else None for row in found]
        split = [g for g, members in enumerate(classes) if members is None]
        equal = {g: [[a == b for b in range(r)] for a in range(r)] for g in split}

        def fill(pairs: list[tuple[int, int]], rows: list[list[bool]]) -> None:
            for g in split:
                for (a, b), same in zip(pairs, rows[g]):
                    equal[g][a][b] = equal[g][b][a] = same

        fill(first, found)
        others = [(a, b) for a in range(1, r) for b in range(a + 1, r)]
        if others and not pairs_first and not all(self._sole_majority(sum(equal[g][0])) for g in split):
            fill(others, compared(others))
        for g in split:
            leaders = [m for m in range(r) if self._sole_majority(sum(equal[g][m]))]
            if not leaders:
                return None
            classes[g] = {m for m in range(r) if equal[g][leaders[0]][m]}
        return classes

    def _first_pairs(self, pairs_first: bool) -> list[tuple[int, int]]:
        """The pairs the whole-row vote compares first: member 0 with the others, or, with
        ``pairs_first``, every pair."""
        r = self.redundancy
        return [(a, b) for a in range(1 if not pairs_first else r) for b in range(a + 1, r)]

    def _blockwise_vote(self, rows: Tensor, bits: Tensor, acc: torch.dtype, per_group: bool) -> _Vote:
        """The reference: per block of ``chunk_size`` coordinates, compare and sum while the block is in cache.

        Off the CPU (or with ``batched=True``) every comparison of two blocks would be a host sync, so
        there every block of every pair is compared in one batch first (one sync), and each block's
        classes are read from that: the same classes, so the same winners, sums and names.
        """
        num_groups, r, d = rows.shape
        out = torch.empty((num_groups, d) if per_group else (d,), dtype=acc, device=rows.device)
        vote = _Vote(out)
        block_winners: dict[int, list[int]] = {g: [] for g in range(num_groups)}
        differs: dict[int, set[int]] = {g: set() for g in range(num_groups)}
        batched = self.batched or (self.batched is None and rows.device.type != "cpu")
        pairs = tuple(self._first_pairs(pairs_first=True))
        where = {pair: k for k, pair in enumerate(pairs)}
        # [g][pair][block], one host sync; r = 1 compares nothing, so nothing to batch
        compared = _block_equalities(bits, pairs, self.chunk_size).tolist() if batched and pairs else None
        for index, start in enumerate(range(0, d, self.chunk_size)):
            block = slice(start, min(d, start + self.chunk_size))
            target, started = out[block], False
            for g in range(num_groups):
                if compared is None:
                    won = self._vote(bits[g, :, block])
                else:
                    won = self._vote_of(lambda a, b, g=g, i=index: compared[g][where[(min(a, b), max(a, b))]][i])
                if won is None:
                    vote.unresolved.setdefault(g, []).append(block)
                    block_winners[g].append(-1)
                    continue
                winner, members = won
                block_winners[g].append(winner)
                differs[g].update(m for m in range(r) if m not in members)
                if per_group:
                    out[g, block] = rows[g, winner, block]
                elif started:
                    # Group by group in a fixed order, whichever member won: the sum is bitwise the
                    # same whoever lied, since winners are bitwise the honest value. Added right after
                    # the group's vote, while the winner's block is still in cache.
                    target.add_(rows[g, winner, block])
                else:  # 0 + x, as summing from zero gives (-0.0 becomes +0.0), without a pass to zero
                    torch.add(rows[g, winner, block], 0.0, out=target)
                    started = True
            if not per_group and not started:
                target.zero_()
        for g in range(num_groups):
            if g not in vote.unresolved:
                vote.winners[g] = block_winners[g].__getitem__
                if differs[g]:
                    vote.differs[g] = differs[g]
        return vote

    def _vote(self, block: Tensor) -> Optional[tuple[int, list[int]]]:
        """The member of the one class of at least s+1 bitwise-equal blocks, and that class; else None."""
        return self._vote_of(lambda a, b: same_bytes(block[a], block[b]))

    def _vote_of(self, equal: Callable[[int, int], bool]) -> Optional[tuple[int, list[int]]]:
        """``_vote`` given ``equal(a, b)``, whether members ``a`` and ``b`` are bitwise equal in the block."""
        r, need = self.redundancy, self.num_adversaries + 1
        first = [0] + [m for m in range(1, r) if equal(m, 0)]
        classes = [first]
        if not self._sole_majority(len(first)):
            for m in range(1, r):
                if m in first:
                    continue
                for members in classes[1:]:
                    if equal(m, members[0]):
                        members.append(m)
                        break
                else:
                    classes.append([m])
        majorities = [members for members in classes if len(members) >= need]
        # None, or several (honest replicas of non-deterministic kernels, or more than s liars): the
        # whole-vector vote decides, and raises if they are too far apart to all hold honest members.
        return (majorities[0][0], majorities[0]) if len(majorities) == 1 else None

    # -- naming, and the groups that no bitwise class settles ---------------------------------
    def _settle(self, rows: Tensor, vote: _Vote, acc: torch.dtype, per_group: bool) -> list[int]:
        """The faulty workers; fills the unresolved blocks of ``vote.out`` with the whole-vector vote."""
        r = self.redundancy
        declared = self.least_radius(rows.dtype) if self.tolerance_declared else 0.0
        faulty: set[int] = set()
        band: list[tuple[int, float]] = []  # (worker, distance) that only the measured noise decides
        for g, members in sorted(vote.differs.items()):
            members = sorted(members)
            if self.tolerance == 0:  # replicas declared bitwise equal: any difference is a lie
                faulty.update(g * r + m for m in members)
                continue
            # Only under a finite tolerance is an infinite distance beyond it (tolerance=inf spares every member).
            gross = self._measured_far(vote, g, members) if math.isfinite(declared) else set()
            faulty.update(g * r + m for m in gross)
            members = [m for m in members if m not in gross]
            for m, distance in zip(members, self._distance_to_winner(rows[g], vote.winners[g], members) if members else []):
                if distance > max(declared, MAX_NOISE):  # beyond any radius
                    faulty.add(g * r + m)
                elif distance > declared or declared == 0:
                    band.append((g * r + m, distance))
        if not band and not vote.unresolved:
            return sorted(faulty)
        distances: dict[int, tuple[Tensor, Tensor]] = {}
        floor = self._noise_floor_of(rows, sorted(set(vote.differs) | set(vote.unresolved)), distances)
        self.measured_floor = floor
        # A bitwise class is an honest replica's value: a member that differs from it is spared only by
        # noise measured in this decode (or a declared tolerance); with none, any difference is a lie.
        spare = noise_radius(declared, floor)
        faulty.update(worker for worker, distance in band if spare == 0 or distance > spare)
        radius = self._radius(rows.dtype, floor)
        for g, blocks in sorted(vote.unresolved.items()):
            winner, agreeing = self._tolerance_vote(rows[g], g, radius, distances)
            for block in blocks:
                if per_group:
                    vote.out[g, block] = rows[g, winner, block]
                else:
                    vote.out[block] += rows[g, winner, block].to(acc)
            faulty.update(w for m, w in enumerate(self.members(g)) if not agreeing[m])
        return sorted(faulty)

    @staticmethod
    def _measured_far(vote: _Vote, g: int, members: list[int]) -> set[int]:
        """The members of group ``g`` that the Triton pass's own sums show to be beyond any radius: the
        reference (``_distance_to_winner``) would find each farther than twice the winner's norm over the
        first piece, which makes the distance infinite. Only where the sums say so by ``_MEASURED_MARGIN``
        and are finite and not underflowed; the other members are measured by the reference."""
        if vote.measured is None:
            return set()
        squares, spread = vote.measured[g]
        if not (math.isfinite(squares) and squares >= _MEASURED_LEAST):
            return set()
        bar = 4 * squares * (1 + _MEASURED_MARGIN)
        return {m for m in members if math.isfinite(spread[m]) and spread[m] > bar}

    def _distance_to_winner(
        self, members: Tensor, winner_of_block: Callable[[int], int], which: list[int]
    ) -> list[float]:
        """``||x_m - v|| / max(||x_m||, ||v||)`` for each member ``m`` in ``which``, ``v`` the group's winning value.

        In pieces (a first one of ``_DISTANCE_PROBE`` coordinates, then of ``_DISTANCE_STEP``), the
        winning value pieced from its blocks' winners, with the same operations whichever vote chose it, so
        that the fused and block-wise paths name the same members. Norms are taken in float32 per piece and
        added in float64 (a relative error of about 1e-4, far below the margins the radius is compared
        with; a piece whose squares overflow float32 is redone in float64). Infinite when a member or ``v``
        is not finite, and as soon as ``||x_m - v|| > 2 ||v||`` (then the distance exceeds 2/3, beyond any
        radius): a liar sending -100x costs the first piece, not a pass over its row.
        """
        d, size = members.shape[1], self.chunk_size
        step = max(size, _DISTANCE_STEP if members.device.type == "cpu" else 8 * _DISTANCE_STEP)  # fewer syncs
        spans = [(0, min(d, _DISTANCE_PROBE))] if d else []
        spans += [(a, min(d, a + step)) for a in range(_DISTANCE_PROBE, d, step)]

        def winning(start: int, stop: int) -> Tensor:
            parts = [(max(start, i * size), min(stop, (i + 1) * size), winner_of_block(i))
                     for i in range(start // size, (stop - 1) // size + 1)]
            if all(w == parts[0][2] for _, _, w in parts):
                return members[parts[0][2], start:stop]
            # the winning value pieced from its blocks' winners (honest replicas that differ)
            return torch.cat([members[w, lo:hi] for lo, hi, w in parts])

        wins = [winning(start, stop) for start, stop in spans]
        acc = accumulation_dtype(members.dtype)

        def difference(m: int, k: int) -> Tensor:
            start, stop = spans[k]
            return members[m, start:stop].to(acc) - wins[k].to(acc)  # exact when close (Sterbenz)

        # One host sync for the winner's norm and every member's first piece, which tells a gross lie.
        first = _sq_norms(wins + [difference(m, 0) for m in which]) if spans else []
        sq_win = sum(first[: len(wins)])
        distances = []
        for n, m in enumerate(which):
            sq_diff, far = 0.0, False
            for k in range(len(spans)):
                sq_diff += first[len(wins) + n] if k == 0 else _sq_norm(difference(m, k))
                if not math.isfinite(sq_diff) or sq_diff > 4 * sq_win:
                    far = True
                    break
            if far or not math.isfinite(sq_win):
                distances.append(math.inf)
                continue
            sq_norm = sum(_sq_norms([members[m, start:stop] for start, stop in spans]))
            scale = math.sqrt(max(sq_norm, sq_win))
            distance = math.sqrt(sq_diff) / max(scale, 1e-300)
            distances.append(distance if math.isfinite(distance) else math.inf)
        return distances

    def _pairwise(self, members: Tensor) -> tuple[Tensor, Tensor]:
        """``(r, r)`` relative distances (infinite for non-finite members), and finiteness."""
        return relative_distances(members, self.chunk_size)

    def _noise_floor(self, relative: Tensor, finite: Tensor) -> float:
        """One group's honest noise, estimated from its replicas so that at most ``s`` liars cannot inflate it.

        Each member's distance to its ``(r-s-1)``-th nearest other member, then the ``(s+1)``-th largest
        of those over the finite members. An honest member has at least ``r-s-1`` honest others, all
        within the honest spread ``D``, so its value is at most ``D``; among the ``s+1`` largest values
        one is an honest member's, so the estimate is at most ``D`` whatever the liars send. In a group
        without liars it is about the replicas' typical distance (for ``r = 2s+1``: the median of the
        ``s``-th nearest distances). Zero when fewer than ``s+1`` members are finite.
        """
        r, s = self.redundancy, self.num_adversaries
        values = relative.sort(dim=1).values[:, r - s - 1][finite]
        if values.numel() < s + 1:
            return 0.0
        floor = float(values.sort(descending=True).values[s])
        return floor if math.isfinite(floor) else 0.0

    def least_radius(self, dtype: torch.dtype) -> float:
        """The whole-vector vote's smallest radius: ``tolerance``, or one rounding unit of ``dtype``
        (relative) if larger (a non-deterministic reduction moves every coordinate by about that much;
        the default tolerance, 1e-5, is below half precision's resolution). 0 when ``tolerance`` is 0."""
        if self.tolerance == 0:
            return 0.0
        return max(self.tolerance, torch.finfo(dtype).eps)

    def _noise_floor_of(self, rows: Tensor, groups: list[int], distances: dict[int, tuple[Tensor, Tensor]]) -> float:
        """The decode's noise floor: the largest of ``groups``' estimates (``_noise_floor``).

        Only groups that are not unanimous are measured (the others hold no noise to measure). Each
        group's estimate is at most its honest spread, so liars cannot raise the floor past the largest
        honest spread; the groups without liars lend their noise to those with some.
        """
        if self.tolerance == 0:
            return 0.0
        floor = 0.0
        for g in groups:
            if g not in distances:
                distances[g] = self._pairwise(rows[g])
            floor = max(floor, self._noise_floor(*distances[g]))
        return floor

    def _radius(self, dtype: torch.dtype, floor: float) -> float:
        """The whole-vector vote's radius: ``max(least_radius, min(NOISE_MARGIN * floor, MAX_NOISE))``."""
        if self.tolerance == 0:
            return 0.0
        return noise_radius(self.least_radius(dtype), floor)

    def _tolerance_vote(
        self, members: Tensor, group: int, radius: float, distances: dict[int, tuple[Tensor, Tensor]]
    ) -> tuple[int, list[bool]]:
        """Vote on whole vectors that agree within ``radius``: (winner index, not-named flags).

        1. Members agree when both are finite and their relative distance is at most ``radius``
           (see ``_radius``: at least the honest spread when the noise floor is measured right).
        2. The winner is the member that agrees with the most others (at least ``s + 1`` with
           itself; else ``DracoDecodeError``), ties broken by the smaller total distance to those
           it agrees with, then by index. A liar can win only by agreeing with an honest member: its
           value is then within the radius of an honest one. Liars placed inside the radius of some
           honest replicas and outside another's do not make the decode raise.
        3. Two members that each agree with ``s + 1`` members but lie more than ``RIVAL_RADII`` radii
           apart cannot both be near honest ones with at most ``s`` liars: ``DracoDecodeError``.
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
        if group not in distances:
            distances[group] = self._pairwise(members)
        relative, finite = distances[group]
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
        supported = [m for m in range(r) if int(counts[m]) >= need]
        order = sorted(supported, key=lambda m: (-int(counts[m]), float(spread[m]), m))
        heads: list[int] = []
        for m in order:
            if all(float(relative[m, h]) > RIVAL_RADII * radius for h in heads):
                heads.append(m)
        if len(heads) > 1:
            far = max(float(relative[a, b]) for a in heads for b in heads)
            raise DracoDecodeError(
                f"group {group} (workers {workers}) holds {len(heads)} different values each sent by at least"
                f" s+1={need} members (up to {far:.2g} apart, relative; rounding noise explains {radius:.2g}):"
                f" more than s={s} of them are faulty.",
                workers,
            )
        named = [int((~agree[m]).sum()) >= need for m in range(r)]
        return heads[0], [not flag for flag in named]
