"""Cyclic repetition code: any P >= 2s+1, real coded gradients, liars located under secret random
projections, and every accepted total certified by a parity check over all coordinates."""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from functools import lru_cache
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_draco._errors import described
from lightning_draco.codes import _triton, crc_triton, register_code
from lightning_draco.codes.base import Code, DecodeResult, DracoDecodeError, accumulation_dtype, each_block

# Unit roundoff of each wire dtype (half the distance from 1 to the next number).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# Rounding an honest coded row carries: each partition's gradient is added once and the running sum
# rescaled once (the Horner steps of the coded step), 2r roundings of one unit of the wire dtype at
# most, which add up like sqrt(2r) units of the row's norm; the parity check's own float32 (float64)
# accumulation adds about sqrt(P) units of that dtype. Honest rows' roundings are independent, so a
# parity row's misfit grows like the root of the sum of its weighted rows' squared norms. The floor
# is ROUNDING_SLACK times that: measured honest misfits (random, common-mode and spiky gradients,
# every dtype, P = 5..64) stay below 1/7 of it (tests/test_crc.py).
ROUNDING_SLACK = 3.0

# The parity rows and combination weights come from float64 solves of the code's matrix: exact to
# about 1e-14 of the rows for P <= 64 (measured), which a float64 wire would otherwise see as misfit.
CODE_ROUNDING = 1e-12

# Largest error of the decoded sum accepted per wire dtype, relative to its norm, from a lie kept
# under the parity floor (``CyclicRepetitionCode.hidden_error``): codes whose conditioning lets a
# lie below the floor move the sum by more are refused for that dtype when the Trainer is built.
# float32: the accuracy the decode promises; half precision: a few times the dtype's own rounding.
MAX_HIDDEN_ERROR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 0.02}

#: ``kernel=``: how the certifying passes run. "triton": one Triton pass reads the rows once (crc_triton.py;
#: on CPU tensors only in Triton's interpreter); "torch": torch products, per block of ``chunk_size`` on the
#: CPU; "auto": Triton on CUDA where it is installed, else torch.
KERNELS = ("auto", "triton", "torch")
# (device type, wire dtype) where the Triton certifying pass failed: the torch passes run there from then on.
_TRITON_FAILED: set[tuple[str, torch.dtype]] = set()

# Rounding of the float32 sketch itself, relative to a row's norm: the projection (blocks of 32K
# coordinates) misses the exact one by up to 3e-6 of the row (measured, d up to 2M).
_SKETCH_ROUNDING = 1e-5

# Gaussian projection columns per decode: liars are located jointly from all of them, so an error
# that happens to project small in one column is seen in the others.
PROJECTIONS = 2

# Length of one row of the projection's grid: the projection vector is the Kronecker product of a
# random vector over the grid's rows and one over its columns (see ``_Projection``).
GRID = 1024

# A suspect is named only when its miss of the codeword exceeds what rounding explains by this factor: an honest
# suspect is set aside (harmlessly) but never accused.
NAMING_MARGIN = 8.0

# Limits on the search for the growth and exposure over every set of s suspects (``_worst_sets``),
# of the suspect sets whose every set of s liars is tried (``_conditioning``), and of those liar sets.
EXHAUSTIVE_SETS = 3000
RANDOM_SETS = 256
EXPOSURE_SETS = 16
LIAR_SETS = 2000
# Up to this many sets of s suspects, every one is ranked in the sketch besides the located ones.
ALL_CANDIDATES = 64
# Up to this many sets of s suspects, the noise floor is measured as the least misfit over all of them
# (``_noise``); codes with more (among float32's accepted cells only P = 2s+1 with s >= 7) measure none.
NOISE_SETS = 3000
# The honest set passes within this many measured noise floors (non-deterministic kernels; as in the
# repetition code), and the measured floor counts only when it exceeds 1/NOISE_ENGAGE of the rounding
# floor: deterministic honest rows miss by under 1/7 of it, so it never engages where rounding explains all.
NOISE_MARGIN = 8.0
NOISE_ENGAGE = 4.0
# ... up to this relative misfit: replicas further apart are not rounding noise (TF32 and atomics give
# 1e-4..1e-3), and more than s liars must not widen the floor without bound.
MAX_NOISE = 1e-2
# Over fewer coordinates than this, the least misfit over every suspect set can fall far below the
# honest set's own (a minimum over sets of misfits with a few degrees of freedom each), and an honest
# set can fit the rounding floor by chance: measured noise certifies at MAX_NOISE there, and suspects
# are named only beyond MAX_NOISE.
SHORT_VECTOR = 16


class Verdict(NamedTuple):
    """The full-dimension check of one honest set.

    Attributes:
        total: ``b^T Y[H]``, the candidate sum of all partition gradients.
        misfit: per parity row, ``||N_t Y[H]||`` (parity rows ``N`` span the left null space of ``W[H]``).
        allowed: per parity row, the floor ``theta * sqrt(sum_i N_ti^2 ||Y_i||^2)``.
    """

    total: Tensor
    misfit: Tensor
    allowed: Tensor

    @property
    def ratio(self) -> float:
        """How far over (> 1) or under (<= 1) the floor the worst parity row is."""
        over = self.misfit / self.allowed.clamp_min(1e-300)
        return float(over.max()) if over.numel() else 0.0


class _Pass(NamedTuple):
    """What one certifying pass (``CyclicRepetitionCode._certify``) measured."""

    #: ``b^T Y[H]``.
    total: Tensor
    #: Per row of the check product (the ``s`` parity rows of ``H``, then each suspect's miss of the
    #: codeword through ``H``): the norm of that row of ``M Y``.
    misfits: Tensor
    #: ``(M Y)(M Y)^T`` (2s x 2s, float64): any check's misfit over all coordinates, without a pass;
    #: only for a pass asked for it.
    gram: Optional[Tensor]
    #: ``M``, the check rows as the pass applied them (2s x P, float64).
    checks: Tensor
    #: Every row's norm (only for the pass that measures them).
    norms: Optional[Tensor]
    #: The sketch, for the pass given projections.
    sketch: Optional[Tensor]


class _Floors(NamedTuple):
    """The two floors of a decode, relative to the rows' norms (``theta`` units)."""

    #: Honest sets pass when every parity misfit is under this (``_allowed``).
    certify: float
    #: Suspects are named beyond ``NAMING_MARGIN`` times this (plus the reach of hidden lies).
    name: float


class _Combiner(NamedTuple):
    """Everything the decode needs about one honest set ``H`` (all rows but the suspects)."""

    honest: list[int]
    #: ``b`` with ``b^T W[H] = 1^T`` (minimum norm): the total is ``b^T Y[H]``.
    weights: Tensor
    #: ``W W[H]^+`` (P x |H|): the codeword through the honest rows, at every row.
    reconstruct: Tensor
    #: s x |H|, orthonormal rows with ``N W[H] = 0``: an honest ``Y[H]`` has ``N Y[H] = 0``.
    parity: Tensor
    #: ``N`` squared, as host lists: the floors of an accepted set are plain Python (``_allowed_values``).
    parity_squares: list[list[float]]
    #: Per suspect, its row of ``W W[H]^+`` squared, as a host list (``_named``).
    suspect_squares: list[list[float]]


class _Mix(NamedTuple):
    """The rows of one certifying pass (``_mix``), as it applies them."""

    #: ``1 + 2s`` x P in the accumulation dtype, on the rows' device.
    applied: Tensor
    #: The check rows (all but the first) as applied, in float64 on the host: ``_Pass.checks``.
    checks: Tensor
    #: Per check row, whether it has a non-zero weight (an erased suspect's miss is all zeros).
    weighted: list[bool]


@register_code
class CyclicRepetitionCode(Code):
    """DRACO's cyclic code for ``P`` workers and ``s`` adversaries (``r = 2s + 1``, any ``P >= 2s + 1``).

    Worker ``i`` holds partitions ``i, i+1, ..., i+2s (mod P)`` and sends ``sum_j W[i, j] g_j``.

    Construction (real, so coded gradients travel in the gradients' own dtype). Let ``N = P`` for
    odd ``P`` and ``N = P + 1`` for even ``P``, and ``w = exp(2 pi i / N)``.

    1. ``Z``: the ``2s`` consecutive frequencies centred on ``N / 2``; they come in conjugate
       pairs, so ``g(x) = prod_{k in Z} (x - w^k)`` has real coefficients and degree ``2s``.
       Every multiple of ``g`` modulo ``x^N - 1`` vanishes on ``Z``: a cyclic code of length ``N``
       with ``2s`` consecutive zeros, hence minimum distance ``2s + 1`` (BCH bound).
    2. Column ``j`` of ``W`` (what partition ``j`` contributes to each worker) is a codeword
       supported on the workers that hold ``j``: ``g`` shifted to start at ``j - 2s``. For even
       ``P`` the code is shortened (position ``P`` of length ``N`` is a known zero): a window that
       wraps around is a combination of two adjacent shifts that cancels position ``P``.
    3. Columns are rescaled so that the all-ones vector lies in the row space of ``W``; any
       ``P - 2s`` rows of ``W`` span that row space, so the sum of all partition gradients is a
       combination of the rows of any ``P - s`` workers.

    Decoding ``Y = W G + E`` (at most ``s`` rows of ``E`` non-zero):

    0. First, in one pass that also measures every row's norm, certify (step 3) the previous
       decode's honest set: the common case, nobody lies or the same workers lie again, ends here.
    1. Sketch, one pass over ``Y``: ``V = Y F`` with ``F`` two columns of secret random numbers
       (Gaussian, Kronecker-structured, drawn fresh for every call from the parameter server's
       generator).
    2. Locate in the sketch: the error-locator polynomial from the syndromes (the DFT of ``V``
       at ``Z``) of both columns jointly (Peterson, least squares); its ``s`` smallest values
       name the suspects. Rows with non-finite values are erasures; very large rows are erased
       one by one when the others do not fit, so that a huge lie cannot hide a small one.
       Candidates are refined by re-ranking rows by their misfit and ordered by how well the
       other rows fit a codeword.
    3. Certify, over every coordinate: for the honest set ``H`` (all rows but the suspects), the
       parity rows ``N`` (``N W[H] = 0``) must leave ``||N_t Y[H]|| <= theta * sqrt(sum_i N_ti^2 ||Y_i||^2)``
       for each ``t``, where ``theta`` is the rounding floor of the wire dtype (or ``tolerance``
       for replicas that differ by more, e.g. non-deterministic kernels). No secret is needed:
       if at most ``s`` rows lie and ``N Y[H] = 0``, the lies in ``H`` form a codeword of weight
       at most ``2s`` with the suspects, hence are zero (minimum distance ``2s + 1``). A lie in
       ``H`` passes only by staying under the floor, which bounds how far it moves the total
       (``hidden_shift``). The next candidate is certified if one fails (a pass each, at most
       ``attempts``), then ``DracoDecodeError``: more than ``s`` workers lied.
    4. ``total = b^T Y[H]`` with ``b^T W[H] = 1^T``, computed in the certifying pass, with each
       suspect's miss of the codeword through ``H`` over every coordinate: a suspect is named when
       it misses by more than ``NAMING_MARGIN`` times its rounding plus twice what lies hidden
       under the floor could shift the codeword there (``_hidden_reach``): never for an honest one.

    Every pass reads ``Y`` blockwise in its own dtype, accumulating half precision in float32; the
    small solves run in float64. On CUDA (``kernel="triton"``, the default where Triton runs) each
    certifying pass is one Triton kernel that reads every row once (crc_triton.py). Without liars, or
    with the same liars as the previous call, the decode reads ``Y`` once. Which set is certified first
    is state (``state_dict``): a resumed run restores it, so that its decodes round exactly as the
    uninterrupted run's.
    """

    name = "crc"
    options = ("tolerance",)
    #: The ``kernel=`` choices (``KERNELS``).
    kernels = KERNELS

    def __init__(
        self,
        num_workers: int,
        num_adversaries: int,
        redundancy: Optional[int] = None,
        *,
        tolerance: Optional[float] = None,
        chunk_size: int = 1 << 15,
        attempts: int = 3,
        refinements: int = 8,
        kernel: str = "auto",
    ):
        super().__init__(num_workers, num_adversaries, redundancy)
        if tolerance is not None and not (isinstance(tolerance, (int, float)) and 0 <= tolerance < 1):
            raise ValueError(f"tolerance must be None or a number in [0, 1) (got {tolerance!r}).")
        if chunk_size < GRID or chunk_size % GRID:
            raise ValueError(f"chunk_size must be a positive multiple of {GRID} (got {chunk_size!r}).")
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1 (got {attempts!r}).")
        _triton.check_kernel(kernel, KERNELS)
        #: How the certifying passes run: see ``KERNELS``.
        self.kernel = kernel
        #: Relative disagreement between honest replicas of a partition's gradient beyond rounding
        #: (non-deterministic kernels); None: replicas agree up to the wire dtype's rounding.
        self.tolerance = None if tolerance is None else float(tolerance)
        self.chunk_size = int(chunk_size)
        self.attempts = int(attempts)
        self.refinements = int(refinements)
        self.length = num_workers if num_workers % 2 else num_workers + 1
        s, n = self.num_adversaries, self.length
        self.zeros = list(range((n + 1) // 2 - s, (n + 1) // 2 + s))
        self._matrix = self._build_matrix()
        self._combiners: OrderedDict[tuple[int, ...], _Combiner] = OrderedDict()
        # Per suspect set, live rows, accumulation dtype and device: the certifying pass's rows (``_Mix``),
        # built and copied to the device once rather than at every decode.
        self._mixes: OrderedDict[tuple, _Mix] = OrderedDict()
        self._reach: dict[tuple[int, ...], list[float]] = {}  # per suspect set: how far hidden lies move it
        self._total_reach: dict[tuple[int, ...], float] = {}  # per suspect set: how far hidden lies move the total
        # The previous decode's suspects: certified first, in the pass that measures the norms. Which
        # honest set is used decides the total's rounding, so it is state (``state_dict``).
        self._hint: Optional[tuple[int, ...]] = None
        # Whether the previous decode had to locate its liars: then the next one sketches in its first
        # pass. Speed only: the sketch is the same bits either way.
        self._located_last = False
        # Whether the previous decode had to measure noise: then the next one's first pass also takes the
        # checks' Gram matrix (else a pass that needs it is redone with it). Speed only.
        self._noisy_last = False
        # Every set of s suspects and its honest set's parity rows: what the noise floor is measured over.
        self._noise_sets: Optional[Tensor] = None
        self._noise_parity: Optional[Tensor] = None
        #: The honest rows' noise measured by the last decode (relative, in the floor's units): None where
        #: none was measured (the first honest set fit the rounding floor, no pass was clean enough to
        #: read it, or ``tolerance=0``). It raises the floor only above ``theta / NOISE_ENGAGE``.
        self.measured_floor: Optional[float] = None
        #: The floor the last decode's honest set was certified under: ``floor(dtype)``, or above it the
        #: measured noise's (``NOISE_MARGIN * measured_floor``, at most ``MAX_NOISE``).
        self.certified_floor: Optional[float] = None
        #: ``max ||b_H||_1 * max|W|`` (how much the combiner amplifies rounding) and the exposure (how far
        #: a lie under the floor moves the sum, per unit of floor), over the sets of s liars searched.
        self.growth, self.exposure = _conditioning(self)

    @classmethod
    def check(cls, num_adversaries: int, redundancy: int, num_workers: Optional[int] = None) -> None:
        super().check(num_adversaries, redundancy, num_workers)
        if redundancy != 2 * num_adversaries + 1:
            raise ValueError(
                f"code='crc' uses redundancy r = 2 * num_adversaries + 1 = {2 * num_adversaries + 1}"
                f" (got redundancy={redundancy})."
            )
        if num_workers is not None and num_workers < redundancy:
            raise ValueError(
                f"code='crc' needs at least 2 * num_adversaries + 1 = {redundancy} workers to tolerate"
                f" {num_adversaries} adversaries (got {num_workers})."
            )

    # -- construction -------------------------------------------------------------------------
    def _generator_polynomial(self) -> Tensor:
        """Real coefficients ``g_0 .. g_{2s}`` of ``prod_{k in Z} (x - w^k)``, lowest degree first."""
        n = self.length
        coefficients = torch.ones(1, dtype=torch.complex128)
        for k in self.zeros:
            root = complex(math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n))
            shifted = torch.zeros(len(coefficients) + 1, dtype=torch.complex128)
            shifted[1:] += coefficients
            shifted[:-1] -= root * coefficients
            coefficients = shifted
        return coefficients.real.clone()

    def _build_matrix(self) -> Tensor:
        p, n, s = self.num_workers, self.length, self.num_adversaries
        g = self._generator_polynomial()
        span = 2 * s

        def shift(start: int) -> Tensor:
            word = torch.zeros(n, dtype=torch.float64)
            for t in range(span + 1):
                word[(start + t) % n] = g[t]
            return word

        columns = []
        for j in range(p):
            start = (j - span) % p
            if n == p or start + span < p:
                word = shift(start)
            else:  # the window wraps past the known zero at position P: cancel it
                first, second = shift(start), shift(start + 1)
                word = second[p] * first - first[p] * second
            columns.append(word[:p] / word.abs().max())
        matrix = torch.stack(columns, dim=1)
        # Rescale columns so that 1^T is in the row space, along a well-conditioned direction of it:
        # dividing each column by its sum r_j makes 1^T the plain sum of the rows.
        r = matrix.sum(dim=0)
        if bool((r.abs() < 1e-8).any()):
            raise ValueError(f"code='crc' has no usable construction for P={p}, s={s}.")  # never seen for P <= 64
        return matrix / r

    def check_wire_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a dtype on the wire in which this (P, s) cannot promise the decoded sum's accuracy."""
        limit = MAX_HIDDEN_ERROR.get(dtype)
        if limit is None:
            raise ValueError(f"code='crc' supports float64, float32, bfloat16 and float16 gradients (got {dtype}).")
        error = self.hidden_error(dtype)
        if error > limit:
            wider = [name for name, d in (("float32", torch.float32), ("float64", torch.float64))
                     if d.itemsize > dtype.itemsize and self.hidden_error(d) <= MAX_HIDDEN_ERROR[d]]
            raise ValueError(
                f"code='crc' with P={self.num_workers}, s={self.num_adversaries} is too ill-conditioned for"
                f" {str(dtype).replace('torch.', '')} gradients: a lie kept under the rounding floor could move the"
                f" decoded sum by {error:.1e} of its norm, more than the {limit:g} allowed; use fewer adversaries,"
                f" {'/'.join(wider) + ' gradients, ' if wider else ''}or code='frc' with a redundancy that divides"
                " the world size."
            )

    def hidden_error(self, dtype: torch.dtype) -> float:
        """The most a lie under the parity floor moves the decoded sum, relative to the sum's norm.

        For rows of the size random partition gradients give (the sum's norm about ``sqrt(P)`` times
        a partition's) and buckets of at least ``GRID`` values: ``exposure * floor(dtype)`` with the
        short-bucket allowance of ``_allowed``, the exposure taken over the sets of ``s`` suspects
        and of ``s`` liars searched (see ``_conditioning``).
        """
        return self.exposure * self.floor(dtype) * (1.0 + math.sqrt(self.num_workers / GRID))

    def floor(self, dtype: torch.dtype) -> float:
        """``theta``: how far honest rows of ``dtype`` may miss the code, relative to their norms (``allowed``)."""
        if dtype not in UNIT_ROUNDOFF:
            raise ValueError(f"code='crc' supports float64, float32, bfloat16 and float16 gradients (got {dtype}).")
        wire, acc = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[accumulation_dtype(dtype)]
        # CODE_ROUNDING: the parity rows themselves are exact only to the float64 solves' rounding.
        theta = ROUNDING_SLACK * (math.sqrt(2 * self.redundancy) * wire + math.sqrt(self.num_workers) * acc)
        theta += CODE_ROUNDING
        return max(theta, self.tolerance or 0.0)

    # -- the code ---------------------------------------------------------------------------------
    def partitions(self, worker: int) -> list[int]:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}) (got {worker}).")
        return [(worker + t) % self.num_workers for t in range(2 * self.num_adversaries + 1)]

    @property
    def encoding_matrix(self) -> Tensor:
        return self._matrix

    def _combiner(self, suspects: tuple[int, ...]) -> _Combiner:
        """Combination weights, reconstruction and parity rows for the honest set ``not suspects``."""
        cached = self._combiners.get(suspects)
        if cached is not None:
            self._combiners.move_to_end(suspects)
            return cached
        honest = [i for i in range(self.num_workers) if i not in suspects]
        rank = self.num_workers - 2 * self.num_adversaries  # known exactly: numerical rank detection misjudges codes
        with _small_solves():
            u, sigma, vh = torch.linalg.svd(self._matrix[honest], full_matrices=True)
        pinv = vh[:rank].T @ torch.diag(1.0 / sigma[:rank]) @ u[:, :rank].T
        reconstruct, parity = self._matrix @ pinv, u[:, rank:].T.contiguous()
        combiner = _Combiner(
            honest,
            pinv.T @ torch.ones(self.num_workers, dtype=torch.float64),
            reconstruct,
            parity,
            parity.square().tolist(),
            reconstruct[list(suspects)].square().tolist(),
        )
        self._combiners[suspects] = combiner
        if len(self._combiners) > 1024:
            self._combiners.popitem(last=False)
        return combiner

    def hidden_shift(
        self, suspects: tuple[int, ...], norms: Tensor, dtype: torch.dtype, length: int, floor: Optional[float] = None
    ) -> float:
        """The most one worker of the honest set can move the total while its lie stays under the floor.

        A lie ``e`` in row ``l`` of ``H`` adds ``N[:, l] e`` to the parity misfit and ``b_l e`` to the
        total; it passes only if ``|N_tl| ||e||`` fits under every row's floor. ``floor``: the floor a
        decode certified under (``certified_floor``), if not the rounding floor of ``dtype``.
        """
        comb = self._combiner(suspects)
        allowed = _allowed(comb, norms, self.floor(dtype) if floor is None else floor, length)
        worst = 0.0
        for k in range(len(comb.honest)):
            column = comb.parity[:, k].abs()
            if not bool((column > 0).any()):
                return math.inf
            hidden = float((allowed[column > 0] / column[column > 0]).min())
            worst = max(worst, abs(float(comb.weights[k])) * hidden)
        return worst

    # -- decoding ---------------------------------------------------------------------------------
    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        self._check_received(received)
        p, s = self.num_workers, self.num_adversaries
        theta, length = self.floor(received.dtype), received.shape[1]
        self.measured_floor = self.certified_floor = None
        if s == 0:
            return DecodeResult(self._certify(received, (), []).total, [])
        # 1. The previous decode's honest set (at first, the last P - s workers), certified in the same
        #    pass that measures every row's norm: nobody lies, or the same workers lie again.
        hint = self._hint or tuple(range(s))
        gen = generator if generator is not None else torch.Generator(device=received.device).manual_seed(0)
        # Where the previous decode had to locate its liars (they move: random ranks, faults that strike
        # anywhere), the same pass also sketches, so that locating costs no pass of its own.
        projections = self._projections(received, gen, precise=False) if self._located_last else None
        first = self._certify(received, hint, [], measure=True, projections=projections, gram=self._noisy_last)
        norms = _exact_norms(received, first.norms)  # redone in float64 where squares over- or underflowed
        erased = [i for i, norm in enumerate(norms.tolist()) if not math.isfinite(norm)]
        if len(erased) > s:
            # At most s of these rows are liars', so an honest rank's gradient is non-finite: a partition
            # that overflowed (float16 under a GradScaler) or a model that diverged, which makes every
            # combination holding that partition non-finite. There is no finite sum to recover and no way
            # to tell which of these rows lied: the total is NaN and nobody is named, as when the
            # repetition code's honest replicas agree on NaN; the strategy skips the step (GradScaler)
            # or stops the run.
            return DecodeResult(torch.full((length,), math.nan, dtype=accumulation_dtype(received.dtype),
                                           device=received.device), [])
        floors = self._floors(theta, length)  # the rounding floor; above it, the noise measured in this decode
        if not erased:
            accepted = self._accept(first, hint, erased, norms, floors, length)
            if accepted is None:
                floors, accepted = self._accept_under_noise(received, first, hint, erased, norms, theta, length)
            if accepted is not None:
                self._located_last = False
                return accepted
        # 2. Locate in a sketch and certify the candidates, best first; then once more from a float64
        #    sketch with fresh secret numbers (lies too small for the float32 sketch to place).
        self._located_last = True
        closest: Optional[tuple[tuple[int, ...], float]] = None
        certified = set() if erased else {hint}
        for precise in (False, True):
            if precise or first.sketch is None:
                sketch = self._sketch(received, self._projections(received, gen, precise), precise)
            else:
                sketch = first.sketch
            # In float64 the sketch adds no rounding and honest rows miss by under 1/10 of the rounding
            # floor: locate against a tighter bar, so that lies just above it are ranked out.
            bar = theta / 8 if precise and floors.certify == theta else floors.certify + _SKETCH_ROUNDING
            for suspects in self._candidates(sketch, norms, erased, bar)[: self.attempts + precise]:
                if suspects in certified:
                    continue
                certified.add(suspects)
                result = self._certify(received, suspects, erased)
                accepted = self._accept(result, suspects, erased, norms, floors, length)
                if accepted is None and self.measured_floor is None:  # once per decode (see below)
                    floors, accepted = self._accept_under_noise(
                        received, result, suspects, erased, norms, theta, length
                    )
                if accepted is not None:
                    self._hint = suspects
                    return accepted
                # Against the rounding floor, whichever floor this set was tried under: comparable numbers.
                allowed = _allowed(self._combiner(suspects), norms, theta, length)
                ratio = Verdict(result.total, result.misfits[:s], allowed).ratio
                if closest is None or ratio < closest[1]:
                    closest = (suspects, ratio)
        if closest is None:
            closest = (hint, math.inf)
        measured = (
            "" if floors.certify == theta else f"; the noise measured among the rows allowed {floors.certify:.2g}"
        )
        raise DracoDecodeError(
            f"no {s} workers could be set aside so that the other {p - s} fit the code: the closest set"
            f" ({list(closest[0])}) leaves a parity misfit {closest[1]:.3g} times the floor"
            f" (theta={theta:.2g} of the rows' norms{measured}): more than s={s} workers are faulty, or honest"
            " replicas differ by more than rounding and noise explain (set tolerance).",
            list(range(p)),
        )

    def _accept(
        self, result: _Pass, suspects: tuple[int, ...], erased: list[int], norms: Tensor, floors: _Floors, length: int
    ) -> Optional[DecodeResult]:
        """The decode's result if the honest set ``not suspects`` fits the code under ``floors.certify``, else
        None. When it does, sets ``certified_floor``, and whether the next decode's first pass takes the
        Gram matrix (this one needed noise measured)."""
        s = self.num_adversaries
        comb = self._combiner(suspects)
        # Plain Python on the host's few numbers: as tensor operations these were most of a decode's host time.
        values, misfits = norms.tolist(), result.misfits.tolist()
        allowed = _allowed_values(comb, values, floors.certify, length)
        if not all(misfit <= most for misfit, most in zip(misfits[:s], allowed)):
            return None
        # A misfit over half the floor could be a lie whose reach the rows' norms stretch (``_tightening``): only
        # then is the total's norm read, so that neither an honest set nor a failing one pays for it.
        if not all(misfit <= most / 2 for misfit, most in zip(misfits[:s], allowed)):
            tighter = self._tightening(comb, suspects, result.total, allowed, floors.certify, length)
            allowed = [most * tighter for most in allowed]
            if not all(misfit <= most for misfit, most in zip(misfits[:s], allowed)):
                return None
        named = self._named(comb, values, suspects, erased, misfits[s:], floors.name, length, allowed)
        self.certified_floor = floors.certify
        self._noisy_last = self.measured_floor is not None
        return DecodeResult(result.total, named)

    def _tightening(
        self, comb: _Combiner, suspects: tuple[int, ...], total: Tensor, allowed: list[float], floor: float, length: int
    ) -> float:
        """The factor (1/2 to 1) the floor ``floor`` of ``comb``'s set is taken at, so that lies kept under it move
        ``total`` by at most ``exposure * floor`` of its norm: ``hidden_error`` under the rounding floor, the
        noise bound under a measured one.

        ``exposure`` is measured on rows of the size random partition gradients give. Rows of unequal sizes (a loss
        spike in one partition, or one partition alone non-zero) raise the floor of every parity row through the
        large rows it weighs, while the sum grows only by the spike: liars on small rows then hide lies up to 1.9
        times what the dtype check accepted (measured over every accepted float32 cell; at P = 21, s = 1 with a
        1e4x spike, 1.1e-5 of the sum in float32, over its 1e-5). At most halved: honest rows miss by under 1/7 of
        the rounding floor and by about one measured noise floor (certified at 8), so honest sets still pass
        where the sum cancels.
        """
        if suspects not in self._total_reach:
            self._total_reach[suspects] = float(_hidden_reach(comb, comb.weights.unsqueeze(0))[0])
        # The most lies under ``allowed`` move the total (``_hidden_reach``), against what the exposure permits.
        reach = self._total_reach[suspects] * math.sqrt(sum(most * most for most in allowed))
        # With the short-bucket margin ``allowed`` carries (``_allowed_values``): only the rows' sizes are corrected.
        margin = 1.0 + math.sqrt(len(comb.honest) / max(length, 1))
        permitted = self.exposure * floor * margin * float(torch.linalg.vector_norm(total, dtype=torch.float64))
        if not reach > permitted:
            return 1.0
        return max(0.5, permitted / reach)

    # -- the noise floor ----------------------------------------------------------------------------
    def _accept_under_noise(
        self, received: Tensor, result: _Pass, suspects: tuple[int, ...], erased: list[int], norms: Tensor,
        theta: float, length: int,
    ) -> tuple[_Floors, Optional[DecodeResult]]:
        """For a set that failed the rounding floor: honest rows may differ by more than rounding (non-
        deterministic kernels). Measure their noise in ``result``'s pass (``_measured``; sets
        ``measured_floor``), and accept the set if it fits under the floors that noise gives. Every clean
        pass reads the same least misfit, so a decode measures once. Returns the floors and the result."""
        self.measured_floor = self._measured(received, result, suspects, erased, norms, theta, length)
        floors = self._floors(theta, length, self.measured_floor)
        if floors.certify <= theta:
            return floors, None
        return floors, self._accept(result, suspects, erased, norms, floors, length)

    def _floors(self, theta: float, length: int, noise: Optional[float] = None) -> _Floors:
        """The floors to certify and name under, given the rounding floor ``theta`` and the measured noise.

        Noise above ``theta / NOISE_ENGAGE``: certify under ``NOISE_MARGIN`` noise floors (at most
        ``MAX_NOISE``), name beyond ``NAMING_MARGIN`` noise floors (an honest suspect misses by about one;
        the certifying floor has its own margin over the noise). Vectors shorter than ``SHORT_VECTOR``:
        certify measured noise at ``MAX_NOISE``, and name only beyond it, noise or not (unless
        ``tolerance=0``, which declares that rounding explains everything).
        """
        short = length < SHORT_VECTOR and self.tolerance != 0
        if noise is None or not noise > theta / NOISE_ENGAGE:
            return _Floors(theta, max(theta, MAX_NOISE) if short else theta)
        if short:
            return _Floors(max(theta, MAX_NOISE), max(theta, MAX_NOISE))
        return _Floors(max(theta, min(NOISE_MARGIN * noise, MAX_NOISE)), max(theta, noise))

    def _measured(
        self, received: Tensor, result: _Pass, suspects: tuple[int, ...], erased: list[int], norms: Tensor,
        theta: float, length: int,
    ) -> Optional[float]:
        """The honest rows' noise read from ``result``'s pass (``_noise``), or None where it cannot be read.

        Never with ``tolerance=0`` (replicas declared equal up to rounding), nor for codes with more than
        ``NOISE_SETS`` suspect sets; and only from a pass whose honest set could pass under the largest
        floor noise may set: one with a larger lie inside cannot be accepted anyway, and the rounding of
        that lie in the pass's checks would pollute the misfits the noise is read from. Its size is judged
        against rows no larger than the ``(s+1)``-th largest, some honest row's at most: a huge row cannot
        make itself look small. A pass without the Gram matrix is redone with it (same total and norms).
        """
        if self.tolerance == 0 or not self._noise_family_is_complete():
            return None
        s = self.num_adversaries
        comb = self._combiner(suspects)
        finite = torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))  # erased rows: no size
        bounded = finite.clamp(max=float(finite.sort(descending=True).values[s]))
        size = Verdict(result.total, result.misfits[:s], _allowed(comb, bounded, 1.0, length)).ratio
        if not size <= max(theta, MAX_NOISE):
            return None
        if result.gram is None:
            result = self._certify(received, suspects, erased, gram=True)
        return self._noise(result, suspects, erased, finite, length)

    def _noise(self, result: _Pass, suspects: tuple[int, ...], erased: list[int], norms: Tensor, length: int) -> float:
        """The honest rows' noise, relative to the floor's scale: the least, over every set ``T`` of ``s``
        suspects, of the worst misfit of ``H_T``'s parity rows (``Verdict.ratio`` at ``theta = 1``).
        ``norms``: the rows' norms, erased rows' as zero (outside every set kept).

        No pass: every such check is a combination of the checks ``M`` that ``result``'s pass applied
        (they span the left null space of ``W`` over the live rows), so its misfit over all coordinates
        is ``a^T (M Y)(M Y)^T a`` from that pass's Gram matrix. The coefficient of each suspect's miss is
        the check's own entry at that suspect, exactly, so a huge lie on a suspect adds nothing to the
        checks that set it aside.

        With at most ``s`` liars ``L``, ``H_L`` holds only honest rows, so the least misfit is at most
        the honest rows' own: liars cannot raise the floor. They can lower it, by cancelling honest noise
        in the checks they enter (knowing it), or at ``P = 2s + 1`` by copying another row: honest rows
        are then set aside (never to the total's harm) and may be named; a declared ``tolerance`` is the
        floor below which no measurement goes. Codes with more than ``NOISE_SETS`` suspect sets measure
        nothing (a search over some of them would let liars outside it raise the floor).
        """
        s = self.num_adversaries
        sets, parity = self._noise_family()
        if erased:  # only sets that hold every erased row: the pass's checks vanish on those rows
            keep = torch.stack([(sets == e).any(dim=1) for e in erased]).all(dim=0)
            sets, parity = sets[keep], parity[keep]
        if not len(sets):
            return 0.0
        checks, position = result.checks, list(suspects)
        own, misses = checks[:s], checks[s:]
        at_suspects = parity[:, :, position]  # (n, s, s): the coefficients of the suspects' misses
        on_own = (parity - at_suspects @ misses) @ own.T  # supported on H: a combination of its parity rows
        coefficients = torch.cat([on_own, at_suspects], dim=2)
        squared = torch.einsum("nta,ab,ntb->nt", coefficients, result.gram, coefficients)
        # Below its rounding, a^T G a is no measurement: where a lie sits in H the checks are lie-sized, and
        # the check that sets the lie aside keeps ~sqrt(eps) of it (float64 Gram sums over ``length``
        # coordinates, then this form): far above float64 rows' rounding floor, it would pass for noise.
        magnitude = torch.einsum("nta,ab,ntb->nt", coefficients.abs(), result.gram.abs(), coefficients.abs())
        rounding = (length + coefficients.shape[2]) * torch.finfo(torch.float64).eps * magnitude
        misfit = torch.where(squared > rounding, squared, torch.zeros_like(squared)).sqrt()
        honest_size = self.num_workers - s
        scale = (parity.square() @ norms.double().square()).sqrt() * (1.0 + math.sqrt(honest_size / max(length, 1)))
        ratio = torch.where(scale > 0, misfit / scale.clamp_min(1e-300), torch.zeros_like(misfit))
        worst = ratio.amax(dim=1)
        worst = worst[torch.isfinite(worst)]
        return float(worst.min()) if len(worst) else 0.0

    def _noise_family_is_complete(self) -> bool:
        """Whether the noise is measured over every set of ``s`` suspects (then liars cannot raise it)."""
        return math.comb(self.num_workers, self.num_adversaries) <= NOISE_SETS

    def _noise_family(self) -> tuple[Tensor, Tensor]:
        """``(sets, parity)``: every set of ``s`` suspects and, for each, orthonormal parity rows of its honest
        set written over all ``P`` workers, zeros at the suspects (``(n, s)`` and ``(n, s, P)``, from one
        batched SVD, kept for the code's lifetime)."""
        if self._noise_sets is None:
            p, s = self.num_workers, self.num_adversaries
            sets = torch.tensor(list(itertools.combinations(range(p), s)), dtype=torch.long).reshape(-1, s)
            honest = torch.stack([torch.tensor([i for i in range(p) if i not in row]) for row in sets.tolist()])
            with _small_solves():
                u = torch.linalg.svd(self._matrix[honest], full_matrices=True)[0]
            null = u[:, :, p - 2 * s :].transpose(1, 2)  # (n, s, P - s)
            parity = torch.zeros(len(sets), s, p, dtype=torch.float64)
            parity.scatter_(2, honest[:, None, :].expand(-1, s, -1), null)
            self._noise_sets, self._noise_parity = sets, parity
        return self._noise_sets, self._noise_parity

    def state_dict(self) -> dict:
        """The previous decode's suspects: which honest set the next decode certifies first (its rounding)."""
        return {"hint": list(self._hint) if self._hint is not None else None}

    def load_state_dict(self, state: dict) -> None:
        hint = state.get("hint")
        self._hint = tuple(hint) if hint is not None else None

    def _projections(self, received: Tensor, gen: torch.Generator, precise: bool) -> tuple[Tensor, Tensor]:
        """The secret numbers of one sketch: ``f[g * grid + j] = u[g] * v[j]`` (``PROJECTIONS`` columns).

        For any non-zero error ``e``, ``e . f = u^T E v`` is a non-zero polynomial of degree 2 in Gaussian
        variables, so it is zero with probability 0 and small only with small probability; drawing
        ``2 sqrt(d)`` numbers instead of ``d`` keeps it cheap. ``precise``: in float64 (else the
        accumulation dtype of ``received``).
        """
        d, device = received.shape[1], received.device
        acc = torch.float64 if precise else accumulation_dtype(received.dtype)
        grid = max(1, min(GRID, d))
        u = torch.randn(PROJECTIONS, -(-d // grid), generator=gen, device=gen.device, dtype=torch.float64)
        v = torch.randn(PROJECTIONS, grid, generator=gen, device=gen.device, dtype=torch.float64)
        return u.to(device, acc), v.to(device, acc)

    def _sketch(self, received: Tensor, projections: tuple[Tensor, Tensor], precise: bool = False) -> Tensor:
        """One pass: ``V = Y F`` (``P x k``, float64); ``precise``: in float64 (about 3x the time on the CPU)."""
        p, d = received.shape
        acc = torch.float64 if precise else accumulation_dtype(received.dtype)
        blocks = self._blocks(d, received.device, received.dtype)
        sketches: list[Optional[Tensor]] = [None] * len(blocks)

        def sketch_block(i: int) -> None:
            start, stop = blocks[i]
            sketches[i] = _sketched(received[:, start:stop].to(acc), projections, start, stop)

        each_block(sketch_block, len(blocks), received.device)
        return _in_order(sketches, p, received.device).cpu()

    def _triton_here(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether the certifying passes of ``dtype`` rows on ``device`` run the Triton kernel (``kernel``;
        a kernel that failed on this device type and dtype hands over to the torch passes for good)."""
        if self.kernel == "torch" or (device.type, dtype) in _TRITON_FAILED:
            return False
        return self.kernel == "triton" or (device.type == "cuda" and _triton.available(device))

    def _blocks(self, d: int, device: torch.device, dtype: torch.dtype) -> list[tuple[int, int]]:
        """The passes' blocks of coordinates: ``chunk_size`` (whole ``GRID`` rows) on the CPU, where they
        stay in cache; one block elsewhere (and for the Triton kernel, which keeps its blocks in registers).
        Every pass cuts the same blocks, so its products round alike."""
        if d == 0:  # an empty bucket: one empty block
            return [(0, 0)]
        grid = min(GRID, d)
        step = self.chunk_size if device.type == "cpu" and not self._triton_here(device, dtype) else d
        step = -(-step // grid) * grid
        return [(start, min(d, start + step)) for start in range(0, d, step)]

    def _applied_mix(self, suspects: tuple[int, ...], live: list[int], acc: torch.dtype, device: torch.device) -> _Mix:
        """``_mix`` for this pass, in ``acc`` on ``device`` (cached: a few dozen small operations and a copy
        to the device per decode otherwise)."""
        key = (suspects, tuple(live), acc, device)
        cached = self._mixes.get(key)
        if cached is not None:
            self._mixes.move_to_end(key)
            return cached
        host = _mix(self._combiner(suspects), suspects, live).to(acc)
        mix = _Mix(host.to(device), host[1:].double(), (host[1:] != 0).any(dim=1).tolist())
        self._mixes[key] = mix
        if len(self._mixes) > 1024:
            self._mixes.popitem(last=False)
        return mix

    def _certify(
        self,
        received: Tensor,
        suspects: tuple[int, ...],
        erased: list[int],
        measure: bool = False,
        projections: Optional[tuple[Tensor, Tensor]] = None,
        gram: bool = False,
    ) -> _Pass:
        """One pass: ``b^T Y[H]``; the norms of the checks ``M Y`` (the parity rows of ``H``, then each
        suspect's miss ``Y_i - (W W[H]^+ Y[H])_i``); with ``measure``, every row's norm; with
        ``projections``, the sketch ``_sketch`` would compute (bit for bit, from the same blocks); with
        ``gram``, the checks' Gram matrix, in float64 (a lie inside ``H`` makes the checks lie-sized, and
        float32 sums of their products would keep ~1e-7 of the lie's square: enough to fake noise in the
        sets that set the lie aside).

        The same products over the same blocks whatever the call: a set certified in one call or
        another gives the same total and the same norms, bit for bit, whoever lied and however.
        """
        p, d = received.shape
        device = received.device
        acc = accumulation_dtype(received.dtype)
        live = [i for i in range(p) if i not in erased]
        applied = self._applied_mix(suspects, live, acc, device)
        mix, checks_count = applied.applied, len(applied.weighted)
        rows = received
        if erased:  # a copy, only when some row is non-finite: 0 * NaN would poison the products
            rows = received.clone()
            rows[erased] = 0
        done = self._triton_pass(rows, mix, measure, gram)
        # After the Triton attempt: a pass where it fails is cut as every later pass will be.
        blocks = self._blocks(d, device, received.dtype)
        total = done.total if done is not None else torch.empty(d, dtype=acc, device=device)
        grams = torch.empty(len(blocks), checks_count, checks_count, dtype=torch.float64, device=device) if gram else None
        sketches: list[Optional[Tensor]] = [None] * len(blocks)

        def certify_block(i: int) -> None:
            start, stop = blocks[i]
            block = rows[:, start:stop].to(acc)
            out = mix @ block
            total[start:stop] = out[0]
            misfits[i] = torch.linalg.vector_norm(out[1:], dim=1)
            if grams is not None:
                checks = out[1:].double()
                torch.mm(checks, checks.t(), out=grams[i])
            if row_norms is not None:
                row_norms[i] = torch.linalg.vector_norm(block, dim=1)
            if projections is not None:  # of the rows as received (a NaN row sketches to NaN, as in ``_sketch``)
                sketches[i] = _sketched(block if rows is received else received[:, start:stop].to(acc),
                                        projections, start, stop)

        if done is None:
            # Each block's norms, checked for over- and underflow once after the pass: a check per block
            # would cost a host sync per block.
            misfits = torch.empty(len(blocks), checks_count, dtype=torch.float64, device=device)
            row_norms = torch.empty(len(blocks), p, dtype=torch.float64, device=device) if measure else None
            each_block(certify_block, len(blocks), device)
            # The norms on the host in one transfer: what follows is a few dozen operations on a few
            # numbers, each of which would be a kernel launch (and some a sync) on an accelerator.
            misfits, row_norms = _to_host(misfits, row_norms)
        else:  # one block (``_blocks``), its products in one read of the rows, its norms on the host
            misfits = done.check_norms[None].clone()
            row_norms = done.row_norms[None] if measure else None
            if grams is not None:
                checks = done.checks.double()
                torch.mm(checks, checks.t(), out=grams[0])
            if projections is not None:  # as ``_sketch`` computes it, bit for bit (the same one block)
                sketches[0] = _sketched(received.to(acc), projections, 0, d)
        sketch = _in_order(sketches, p, device) if projections is not None else None
        per_block = misfits.tolist()  # a few numbers: plain Python from here, no tensor operations
        redo = _inexact(per_block)
        # A check that is exactly zero in the accumulation dtype: either the block's checks are zero, or every
        # product underflowed (honest rows of zeros, a lie of 1e-45 to 1e-29 on them: a float32 product of it
        # and a weight rounds to zero or to a subnormal, its square to zero). Only float64 products tell them
        # apart, so such a block is measured again whatever its total (on a zero bucket the total is zero too,
        # and a lie on it is the only thing there is to see). A check row that is all zeros (an erased
        # suspect's miss) is zero by construction, not underflow.
        vanished = {i for i, norms in enumerate(per_block)
                    if any(v == 0 and w for v, w in zip(norms, applied.weighted))}
        for i in sorted(set(redo) | vanished):  # squares over- or underflowed: the misfits again, in float64
            again = _exact_checks(rows, mix, blocks[i], grams is not None)
            if again is not None:  # else the product gives the same NaN or Inf again
                misfits[i] = again[0].to(misfits.device)
                if grams is not None:
                    grams[i] = again[1]
        norms = row_norms.square().sum(dim=0).sqrt() if row_norms is not None else None
        return _Pass(total, misfits.square().sum(dim=0).sqrt(), grams.sum(dim=0).cpu() if grams is not None else None,
                     applied.checks, norms, sketch.cpu() if sketch is not None else None)

    def _triton_pass(self, rows: Tensor, mix: Tensor, measure: bool, gram: bool) -> Optional[crc_triton.Certified]:
        """``_certify``'s one block by the Triton kernel (crc_triton.py); None where it does not run. A
        kernel that fails is warned about once, and the torch passes take over on that device for good."""
        if not self._triton_here(rows.device, rows.dtype):
            return None
        try:
            return crc_triton.certify(rows.contiguous(), mix, measure, gram)
        except Exception as err:  # noqa: BLE001 - any failure to compile or launch: the torch passes
            _TRITON_FAILED.add((rows.device.type, rows.dtype))
            warnings.warn(
                f"CyclicRepetitionCode: the Triton certifying pass could not run on {rows.device.type}"
                f" ({described(err)}); the torch passes run instead (same guarantees, slower).",
                RuntimeWarning,
                stacklevel=4,
            )
            return None

    def _candidates(self, sketch: Tensor, norms: Tensor, erased: list[int], theta: float) -> list[tuple[int, ...]]:
        """Suspect sets to certify, best first: the located ones, ordered by how well the others fit.

        ``theta``: the floor in the sketch (the parity floor plus the sketch's own rounding).
        """
        p, s = self.num_workers, self.num_adversaries
        v = sketch.clone()
        v[erased] = 0.0
        scale = norms.clone()
        scale[erased] = 0.0
        fit = _SketchFit(v, scale, self._combiner)
        found: list[tuple[int, ...]] = []

        def add(suspects: tuple[int, ...]) -> None:
            for refined in (suspects, self._refine(fit, suspects, erased, theta)):
                if refined not in found:
                    found.append(refined)

        canonical = tuple(sorted(erased + [i for i in range(p) if i not in erased][: s - len(erased)]))
        add(self._locate(v, erased))
        for column in range(v.shape[1]):
            add(self._locate(v[:, column : column + 1], erased))
        # A huge lie drowns the syndromes of a small one in float64 rounding: erase the largest rows,
        # one more at a time, and locate the rest.
        magnitude = v.abs().amax(dim=1)
        largest = [i for i in torch.argsort(magnitude, descending=True).tolist() if i not in erased]
        for extra in range(1, s - len(erased) + 1):
            known = erased + largest[:extra]
            w = v.clone()
            w[known] = 0.0
            add(self._locate(w, known))
        if math.comb(p, s) <= ALL_CANDIDATES:  # few enough to rank every set by how well the rest fit
            found += [c for c in itertools.combinations(range(p), s) if set(erased) <= set(c)]
        # A fixed fill first, the located set itself right after it (in case the fill hides a small lie).
        found = list(dict.fromkeys(x for c in found for x in (self._canonical(fit, c, erased, theta), c)))
        fits = {c: fit.worst(c) for c in found + [canonical]}
        ordered = sorted(found, key=lambda c: fits[c])
        # Nobody visibly lies (the fixed set fits about as well as the best located one, at the noise
        # level): certify the fixed set first, so that the result and its rounding do not depend on
        # where the locator's noise happens to point.
        best = fits[ordered[0]] if ordered else math.inf
        if fits[canonical] <= max(8 * best, theta / 8):
            ordered = [canonical] + [c for c in ordered if c != canonical]
        elif canonical not in ordered:
            ordered.append(canonical)
        return ordered

    def _canonical(self, fit: "_SketchFit", suspects: tuple[int, ...], erased: list[int], theta: float) -> tuple[int, ...]:
        """``suspects`` with those that visibly fit the code swapped for the lowest-numbered rows that do.

        With fewer than s liars, the other suspects are whatever rows the locator's noise picked;
        a fixed choice keeps the result (and its rounding) independent of that noise, and lets the
        next decode find this one's set already certified in its first pass.
        """
        misfit = fit.row_misfits(suspects)
        visible = [i for i in suspects if i in erased or misfit[i] > theta]
        fill = [i for i in range(self.num_workers) if i not in visible][: self.num_adversaries - len(visible)]
        swapped = tuple(sorted(visible + fill))
        if swapped == suspects or fit.worst(swapped) > max(2 * fit.worst(suspects), theta / 8):
            return suspects
        return swapped

    def _locate(self, v: Tensor, erased: list[int]) -> tuple[int, ...]:
        """The ``s`` suspects: erased rows, then the positions where the error locator is smallest.

        The locator comes from the Hankel systems of every column of ``v`` at once (least squares),
        each column scaled to its largest syndrome, so an error hidden in one column is seen in another.
        """
        p, s, n = self.num_workers, self.num_adversaries, self.length
        padded = torch.zeros(n, v.shape[1], dtype=torch.complex128)
        padded[:p] = v.to(torch.complex128)
        syndromes = _dft_rows(tuple(self.zeros), n) @ padded  # (2s, k): T_m = v(w^{Z[m]})
        size = syndromes.abs().amax(dim=0)
        usable = size > 1e-13 * v.abs().amax(dim=0).clamp_min(1e-300)
        if not bool(usable.any()):
            return tuple(sorted(erased + [i for i in range(p) if i not in erased][: s - len(erased)]))
        syndromes = syndromes[:, usable] / size[usable]
        hankel = torch.cat(
            [torch.stack([syndromes[s + row - 1 - torch.arange(s), c] for row in range(s)]) for c in range(syndromes.shape[1])]
        )
        rhs = torch.cat([-syndromes[s : 2 * s, c] for c in range(syndromes.shape[1])])
        with _small_solves():
            locator = torch.linalg.lstsq(hankel, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        coefficients = torch.cat([torch.ones(1, dtype=torch.complex128), locator])
        magnitude = (_inverse_powers(p, n, s) @ coefficients).abs()
        order = [i for i in torch.argsort(magnitude).tolist() if i not in erased]
        return tuple(sorted(erased + order[: s - len(erased)]))

    def _refine(self, fit: "_SketchFit", suspects: tuple[int, ...], erased: list[int], theta: float) -> tuple[int, ...]:
        """Re-rank rows by their misfit to the codeword through the current honest set, a few times.

        Close or very unequal errors make the locator's ranking fragile near its s-th place.
        """
        s = self.num_adversaries
        for _ in range(self.refinements):
            misfit = fit.row_misfits(suspects)
            honest = [i for i in range(self.num_workers) if i not in suspects]
            if max(misfit[i] for i in honest) <= theta:
                break
            ranked = sorted((i for i in range(self.num_workers) if i not in erased), key=lambda i: -misfit[i])
            refined = tuple(sorted(erased + ranked[: s - len(erased)]))
            if refined == suspects:
                break
            suspects = refined
        return suspects

    def _named(
        self, comb: _Combiner, norms: list[float], suspects: tuple[int, ...], erased: list[int], misses: list[float],
        theta: float, length: int, allowed: list[float],
    ) -> list[int]:
        """The suspects that are faulty: non-finite, or off the codeword through ``H`` by ``NAMING_MARGIN``
        times what rounding explains, measured over every coordinate (an honest suspect is set aside,
        harmlessly, but never named). ``norms``, ``misses`` and ``allowed``: host lists, as is the arithmetic."""
        honest = [norms[i] * norms[i] for i in comb.honest]
        margin = NAMING_MARGIN * theta * (1.0 + math.sqrt(len(comb.honest) / max(length, 1)))
        # Liars inside H under the floor shift the codeword at the suspects too: an honest suspect can
        # then miss it by up to that much, and must not be named for it.
        if suspects not in self._reach:
            self._reach[suspects] = _hidden_reach(comb, comb.reconstruct[list(suspects)]).tolist()
        shift = 2.0 * math.sqrt(sum(most * most for most in allowed))
        named = set()
        for k, (i, miss) in enumerate(zip(suspects, misses)):
            rounding = math.sqrt(norms[i] * norms[i] + sum(w * q for w, q in zip(comb.suspect_squares[k], honest)))
            if not miss <= margin * rounding + self._reach[suspects][k] * shift:
                named.add(i)
        return sorted(named | set(erased))


class _SketchFit:
    """How well suspect sets fit the code in one sketch ``v`` (rows' scales ``scale``), each set computed once:
    locating asks again and again about the same few sets."""

    __slots__ = ("v", "scale", "combiner", "_rows", "_worst")

    def __init__(self, v: Tensor, scale: Tensor, combiner: Callable[[tuple[int, ...]], _Combiner]):
        self.v, self.scale, self.combiner = v, scale, combiner
        self._rows: dict[tuple[int, ...], list[float]] = {}
        self._worst: dict[tuple[int, ...], float] = {}

    def row_misfits(self, suspects: tuple[int, ...]) -> list[float]:
        """Each row's miss of the codeword through the others, relative to the rounding it can carry."""
        if suspects not in self._rows:
            comb, v, scale = self.combiner(suspects), self.v, self.scale
            codeword = comb.reconstruct @ v[comb.honest]
            room = scale + comb.reconstruct.abs() @ scale[comb.honest]
            self._rows[suspects] = ((v - codeword).abs().amax(dim=1) / room.clamp_min(1e-300)).tolist()
        return self._rows[suspects]

    def worst(self, suspects: tuple[int, ...]) -> float:
        """The worst parity row's misfit in the sketch, relative to its floor's scale."""
        if suspects not in self._worst:
            comb, v, scale = self.combiner(suspects), self.v, self.scale
            misfit = (comb.parity @ v[comb.honest]).norm(dim=1) / math.sqrt(v.shape[1])
            room = comb.parity.abs() @ scale[comb.honest]
            self._worst[suspects] = float((misfit / room.clamp_min(1e-300)).max()) if len(misfit) else 0.0
        return self._worst[suspects]


def _to_host(*tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """``tensors`` (float64; None passes through) on the CPU, in one transfer from an accelerator."""
    present = [t for t in tensors if t is not None]
    if not present or present[0].device.type == "cpu":
        return list(tensors)
    flat = torch.cat([t.flatten() for t in present]).cpu()
    out, offset = [], 0
    for t in tensors:
        out.append(None if t is None else flat[offset : offset + t.numel()].view(t.shape))
        offset += 0 if t is None else t.numel()
    return out


def _in_order(parts: list[Optional[Tensor]], p: int, device: torch.device) -> Tensor:
    """The blocks' sketches summed in block order (the same bits however the blocks were computed)."""
    sketch = torch.zeros(p, PROJECTIONS, dtype=torch.float64, device=device)
    for part in parts:
        sketch += part
    return sketch


def _sketched(block: Tensor, projections: tuple[Tensor, Tensor], start: int, stop: int) -> Tensor:
    """``block @ F[start:stop]`` in float64, ``F``'s columns built from ``projections`` (``u``, ``v``)."""
    u, v = projections
    grid = v.shape[1]
    first, last = start // grid, -(-stop // grid)
    f = (u[:, first:last, None] * v[:, None, :]).reshape(u.shape[0], -1)[:, : stop - start]
    return (block @ f.t()).double()


def _mix(comb: _Combiner, suspects: tuple[int, ...], live: list[int]) -> Tensor:
    """Rows of the certifying product, over all P workers: ``b`` (the total), the parity rows ``N``, and
    for each suspect ``e_i - (W W[H]^+)_i`` (its miss of the codeword through ``H``; zeros for a
    suspect that is not live). Always ``1 + 2s`` rows: the same product shape, so the same rounding
    of the total, whoever lied and however."""
    p = comb.reconstruct.shape[0]
    mix = torch.zeros(1 + len(comb.parity) + len(suspects), p, dtype=torch.float64)
    mix[0, comb.honest] = comb.weights
    mix[1 : 1 + len(comb.parity), comb.honest] = comb.parity
    for k, i in enumerate(suspects):
        if i in live:
            mix[1 + len(comb.parity) + k, comb.honest] = -comb.reconstruct[i]
            mix[1 + len(comb.parity) + k, i] = 1.0
    return mix


def _allowed_values(comb: _Combiner, norms: list[float], theta: float, length: int) -> list[float]:
    """Each parity row's floor: ``theta`` times the root of the sum of its weighted rows' squared norms.

    Over many coordinates the rows' independent roundings add in quadrature; over a few they can
    line up, by up to ``sqrt(|H|)`` (Cauchy-Schwarz) for one coordinate: short vectors get that margin.
    ``norms``: the host's list; plain Python (a few dozen numbers: each tensor operation would cost
    more than the arithmetic).
    """
    squares = [norms[i] * norms[i] for i in comb.honest]
    margin = 1.0 + math.sqrt(len(comb.honest) / max(length, 1))
    return [theta * math.sqrt(sum(w * q for w, q in zip(row, squares))) * margin for row in comb.parity_squares]


def _allowed(comb: _Combiner, norms: Tensor, theta: float, length: int) -> Tensor:
    """``_allowed_values`` of a tensor of norms, as a float64 tensor (one formula for both)."""
    return torch.tensor(_allowed_values(comb, norms.tolist(), theta, length), dtype=torch.float64)


@lru_cache(maxsize=64)
def _dft_rows(zeros: tuple[int, ...], n: int) -> Tensor:
    k = torch.tensor(zeros, dtype=torch.float64)
    positions = torch.arange(n, dtype=torch.float64)
    return torch.polar(torch.ones(len(zeros), n, dtype=torch.float64), 2 * math.pi * k[:, None] * positions[None, :] / n)


@lru_cache(maxsize=64)
def _inverse_powers(p: int, n: int, s: int) -> Tensor:
    inverse = torch.polar(torch.ones(p, dtype=torch.float64), -2 * math.pi * torch.arange(p, dtype=torch.float64) / n)
    return inverse[:, None] ** torch.arange(s + 1, dtype=torch.float64)[None, :]


def _inexact(norms: list[list[float]]) -> list[int]:
    """The blocks (rows of ``norms``) where a norm taken in float32 may have over- or underflowed: values
    beyond about 1e18 or below 1e-17 square outside float32's range, or the norm overflowed to Inf."""
    return [i for i, row in enumerate(norms) if any(v > 1e18 or 0 < v < 1e-17 for v in row)]


def _exact_norms(received: Tensor, norms: Tensor) -> Tensor:
    """Row norms, recomputed in float64 where the wire dtype's squares over- or underflowed."""
    for i, norm in enumerate(norms.tolist()):
        if math.isfinite(norm) and 1e-15 <= norm <= 1e15:
            continue
        row = received[i]
        if norm == 0 and not bool(row.any()):  # a row of zeros (the float32 squares of tiny values also give 0)
            continue
        if bool(torch.isfinite(row).all()):
            total = torch.zeros((), dtype=torch.float64, device=received.device)
            for start in range(0, row.numel(), 1 << 20):
                total += row[start : start + (1 << 20)].double().square().sum()
            norms[i] = total.sqrt()
    return norms


# Coordinates per float64 product when a block's checks are measured again (``_exact_checks``): the one block
# of the Triton pass is the whole bucket, whose float64 copy would double its memory at once.
EXACT_SPAN = 1 << 20


def _exact_checks(
    rows: Tensor, mix: Tensor, span: tuple[int, int], gram: bool
) -> Optional[tuple[Tensor, Optional[Tensor]]]:
    """The check rows' norms (and Gram matrix) over ``span``, from float64 products of the rows and the check
    rows as applied (``mix[1:]``): float64 holds every product of float32 (or narrower) values and weights
    exactly, with no underflow, so a lie of 1e-45 on a zero row shows. None where the rows are not finite."""
    checks_mix = mix[1:].double()
    count = checks_mix.shape[0]
    squares = torch.zeros(count, dtype=torch.float64, device=rows.device)
    product = torch.zeros(count, count, dtype=torch.float64, device=rows.device) if gram else None
    start, stop = span
    for first in range(start, stop, EXACT_SPAN):
        part = rows[:, first : min(stop, first + EXACT_SPAN)]
        # Rows of zeros add nothing: on a zero bucket only a liar's row (if any) is widened and multiplied.
        present = part.ne(0).any(dim=1).nonzero().flatten()
        if not len(present):
            continue
        part = part[present].double()
        if not bool(torch.isfinite(part).all()):
            return None
        checks = checks_mix[:, present] @ part
        squares += torch.linalg.vector_norm(checks, dim=1).square()
        if product is not None:
            product += checks @ checks.t()
    return squares.sqrt().cpu(), product


@contextlib.contextmanager
def _small_solves() -> Iterator[None]:
    """One thread for P x P linear algebra: threading it costs 20x when the cores are busy (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_CONDITIONING: dict[tuple[int, int], tuple[float, float]] = {}


def _conditioning(code: CyclicRepetitionCode) -> tuple[float, float]:
    """Growth and exposure, maximised over the sets of ``s`` suspects that ``_worst_sets`` searches.

    Exposure of a suspect set ``S``: lies ``x`` on a set ``L`` of ``s`` rows of ``H`` pass the check
    while ``||N_L x||`` stays under the floor, and move the sum by ``b_L . x``: at most
    ``||N_L^{-T} b_L||`` times the floor (``_hidden_reach``, maximised over ``L``). With rows of
    the size of ``||W_l|| g`` and a sum of ``sqrt(P) g``, relative to the sum that is the exposure
    times ``theta``. Sets ``S`` are scored first by the single-liar bound, then the worst few
    (and the contiguous ones, which the liars of the hint can aim at) by every liar set.
    """
    key = (code.num_workers, code.num_adversaries)
    if key not in _CONDITIONING:
        p, s = code.num_workers, code.num_adversaries
        matrix = code.encoding_matrix
        largest, row_norms = float(matrix.abs().max()), matrix.norm(dim=1)
        growths: dict[tuple[int, ...], float] = {}

        def single(suspects: tuple[int, ...]) -> float:
            comb = code._combiner(suspects)
            growths[suspects] = float(comb.weights.abs().sum()) * largest
            if not len(comb.parity):
                return 0.0
            reach = comb.parity.abs().amax(dim=0).clamp_min(1e-300)
            return float((comb.weights.abs() * row_norms[comb.honest] / reach).max())

        def multiple(suspects: tuple[int, ...]) -> float:
            comb = code._combiner(suspects)
            if not len(comb.parity):
                return 0.0
            floor = float((comb.parity.square() @ row_norms[comb.honest].square()).sqrt().norm())
            return float(_hidden_reach(comb, comb.weights.unsqueeze(0))[0]) * floor

        with _small_solves():
            sets = _worst_sets(p, s, single)
            worst = sorted(sets, key=single, reverse=True)[:EXPOSURE_SETS]
            worst += [tuple(sorted((start + t) % p for t in range(s))) for start in range(p)] if s else []
            exposure = max(multiple(c) for c in dict.fromkeys(worst)) / math.sqrt(p)
        _CONDITIONING[key] = (max(growths.values()), exposure)
        code._combiners.clear()
    return _CONDITIONING[key]


def _liar_sets(size: int, s: int) -> Tensor:
    """Sets of ``s`` positions among ``size`` honest rows: all when few, else the contiguous ones and 256 random."""
    if math.comb(size, s) <= LIAR_SETS:
        return torch.tensor(list(itertools.combinations(range(size), s)), dtype=torch.long).reshape(-1, s)
    gen = torch.Generator().manual_seed(size * 1000 + s)
    sets = [tuple((start + t) % size for t in range(s)) for start in range(size)]
    sets += [tuple(torch.randperm(size, generator=gen)[:s].tolist()) for _ in range(256)]
    return torch.tensor([sorted(x) for x in sets], dtype=torch.long)


def _hidden_reach(comb: _Combiner, targets: Tensor) -> Tensor:
    """For each row ``t`` of ``targets`` (over ``H``): ``max_L ||N_L^{-T} t_L||`` over liar sets ``L`` of ``H``.

    Lies ``x`` on ``L`` whose parity ``N_L x`` has norm at most ``a`` move ``t . x`` by at most this
    times ``a``. ``N_L`` (s x s) is invertible: at most ``2s`` errors cannot form a codeword.
    """
    s = comb.parity.shape[0]
    sets = _liar_sets(len(comb.honest), s)
    blocks = comb.parity[:, sets].permute(1, 2, 0)  # (n, s, s): row j holds N[:, L_j]^T
    values = targets[:, sets]  # (m, n, s)
    with _small_solves():
        solved = torch.linalg.solve(blocks.unsqueeze(0).expand(len(targets), -1, -1, -1), values)
    return solved.norm(dim=-1).amax(dim=1)


def _worst_sets(p: int, s: int, score) -> list[tuple[int, ...]]:
    """Every set of ``s`` workers when there are few (up to cyclic shifts for odd ``P``, whose ``W`` is
    circulant); else contiguous and spread blocks, random sets, and a local search from the worst."""
    if s == 0:
        return [()]
    if p % 2 and math.comb(p - 1, s - 1) <= EXHAUSTIVE_SETS:
        return [(0,) + rest for rest in itertools.combinations(range(1, p), s - 1)]
    if p % 2 == 0 and math.comb(p, s) <= EXHAUSTIVE_SETS:
        return list(itertools.combinations(range(p), s))
    gen = torch.Generator().manual_seed(p * 1000 + s)
    sets = [tuple(sorted((start + t) % p for t in range(s))) for start in range(p)]
    sets += [tuple(sorted({(start + t * (p // s)) % p for t in range(s)})) for start in range(p // s)]
    sets += [tuple(sorted(torch.randperm(p, generator=gen)[:s].tolist())) for _ in range(RANDOM_SETS)]
    sets = [x for x in dict.fromkeys(sets) if len(x) == s]
    scored = sorted(sets, key=score, reverse=True)
    for start in scored[:4]:  # move one worker at a time to a neighbour while the score increases
        current, best = start, score(start)
        improved = True
        while improved:
            improved = False
            for position, worker in enumerate(current):
                for moved in ((worker + 1) % p, (worker - 1) % p):
                    if moved in current:
                        continue
                    trial = tuple(sorted(current[:position] + (moved,) + current[position + 1 :]))
                    value = score(trial)
                    if value > best:
                        current, best, improved = trial, value, True
                        break
                if improved:
                    break
        sets.append(current)
    return sets
