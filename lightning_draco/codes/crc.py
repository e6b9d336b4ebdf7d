"""Cyclic repetition code: any P >= 2s+1, real coded gradients, Fourier decoding with a secret projection."""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lightning_draco.codes import register_code
from lightning_draco.codes.base import Code, DecodeResult, DracoDecodeError, accumulation_dtype

# Row b of _SIGN_TABLE holds the eight bits of byte b as +-1: random bytes become random signs.
_SIGN_TABLE = torch.tensor([[1.0 if (b >> k) & 1 else -1.0 for k in range(8)] for b in range(256)])

# Full precision: misfit of the projected rows to a codeword that rounding alone explains, relative
# to the largest projected value: about 10x the rounding of the float32 blockwise projection
# (about 3e-6 measured for 64K-entry blocks). Half precision uses HALF_ROUNDING_SLACK below.
RESIDUAL_TOLERANCE = {torch.float64: 1e-12, torch.float32: 5e-5}

# Largest combiner growth (see ``CyclicRepetitionCode.growth``) accepted per dtype on the wire:
# the decoded sum loses about growth * eps(dtype) of relative accuracy, and the checks that find
# liars weaken as the code's conditioning does. In half precision, codes beyond these limits let
# a liar sending another row's vector through in 0.5% to 9% of decodes (measured at P = 15..31,
# s = 1..2 for bfloat16, P = 24..31 for float16); within them, none in 200 decodes per code.
MAX_GROWTH = {torch.float64: 1e12, torch.float32: 1e7, torch.bfloat16: 6.0, torch.float16: 14.0}

# Independent projections per decode. A lie passes one projection's check only if its projected
# error falls within the tolerance by chance (about the tolerance's fraction of the time for an
# error as large as the rows); it must do so in every projection at once. Looser tolerances
# (half precision) take more.
PROJECTIONS = {torch.float64: 2, torch.float32: 2, torch.float16: 3, torch.bfloat16: 4}

# Half precision: the other rows' misfit to a codeword may be at most this many units of rounding
# (2^-9 for bfloat16, 2^-12 for float16) per summed partition, times the largest honest row norm.
# Measured honest misfits reach 0.7 (r = 3) and 0.53 (r = 15) of a unit per partition; a bound
# relative to the projected values instead let lies as large as the rows pass about 1 decode in 30.
HALF_ROUNDING_SLACK = 4.0
_UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


class _FitRule(NamedTuple):
    """How far the rows outside the suspects may miss a codeword and still fit it: one of two scales."""

    #: Full precision: times the largest projected codeword value of the column.
    relative: Optional[float]
    #: Half precision: times the largest honest row norm (rounding grows with the rows, not the projection).
    per_row_norm: Optional[float]

    def allowed(self, size: Tensor, largest_row: float) -> Tensor:
        """The misfit allowed per column, ``size`` being each column's largest codeword value."""
        if self.per_row_norm is not None:
            return torch.full_like(size, self.per_row_norm * largest_row)
        return self.relative * size

    def naming_floor(self, size: Tensor, largest_row: float) -> Tensor:
        """The least miss for which a suspect is named (a projection near zero makes ``size`` meaningless)."""
        if self.per_row_norm is not None:
            return self.allowed(size, largest_row)
        return self.relative * size.clamp_min(largest_row)

    def __str__(self) -> str:
        if self.per_row_norm is not None:
            return f"misfit at most {self.per_row_norm:.1e} of the largest row norm"
        return f"relative tolerance {self.relative:.1e}"


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

    1. Project: ``V = Y F`` with ``F`` a few (``PROJECTIONS``) columns of random signs drawn
       from the parameter server's secret generator, fresh for every call (workers cannot aim an
       error at the kernel of ``F``). Rows of ``V`` with non-finite or absurdly large values are
       erased first (set to zero).
    2. Syndromes: the DFT of one column ``v`` (padded with the known zero for even ``P``) at ``Z``.
    3. Error locator: least-squares solution of the ``s x s`` Hankel system of the syndromes
       (Peterson); the ``s`` positions where ``|locator|`` is smallest (erased rows first) are
       the suspects. No absolute threshold decides who is located.
    4. Check: in every column, the projected rows of the other ``P - s`` workers must be a
       codeword restricted to them; else steps 2-4 run on the next column, then on fresh
       projections, and at last ``DracoDecodeError`` is raised: more than ``s`` workers lied.
    5. Combine: ``b`` with ``b^T W[H] = 1^T`` over the honest set ``H``; ``total = b^T Y[H]``.
       Suspects whose projected value is off the reconstructed codeword are reported faulty.

    The two passes over the data (projection, combination) run in the wire dtype, blockwise,
    with float32 accumulation for half precision; the small solves run in float64.
    """

    name = "crc"

    def __init__(
        self,
        num_workers: int,
        num_adversaries: int,
        redundancy: Optional[int] = None,
        *,
        residual_tolerance: Optional[float] = None,
        chunk_size: int = 1 << 16,
        refinements: int = 8,
        attempts: int = 4,
    ):
        super().__init__(num_workers, num_adversaries, redundancy)
        self.residual_tolerance = residual_tolerance
        self.chunk_size = int(chunk_size)
        self.refinements = int(refinements)
        self.attempts = int(attempts)
        self.length = num_workers if num_workers % 2 else num_workers + 1
        s, n = self.num_adversaries, self.length
        self.zeros = list(range((n + 1) // 2 - s, (n + 1) // 2 + s))
        self._matrix = self._build_matrix()
        self._combiners: OrderedDict[tuple[int, ...], tuple[Tensor, Tensor]] = OrderedDict()
        self.growth = self._growth()

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

    def _growth(self) -> float:
        """How much the combiner amplifies rounding: ``max_H ||b_H||_1 * max|W|`` over erasure sets seen at setup."""
        worst = 0.0
        for suspects in self._probe_sets():
            b, _ = self._combiner(suspects)
            worst = max(worst, float(b.abs().sum()))
        return worst * float(self._matrix.abs().max())

    def _probe_sets(self) -> list[tuple[int, ...]]:
        p, s = self.num_workers, self.num_adversaries
        sets = [tuple(range(s)), tuple(range(0, 2 * s, 2))[:s], tuple(range(p - s, p))]
        if s:
            spread = max(p // s, 1)
            sets.append(tuple(sorted({(i * spread) % p for i in range(s)}))[:s])
        return [x for x in sets if len(x) == s]

    def check_wire_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a dtype on the wire in which this (P, s) cannot decode accurately."""
        limit = MAX_GROWTH.get(dtype)
        if limit is None:
            raise ValueError(f"code='crc' supports float64, float32, bfloat16 and float16 gradients (got {dtype}).")
        if self.growth > limit:
            raise ValueError(
                f"code='crc' with P={self.num_workers}, s={self.num_adversaries} amplifies rounding by"
                f" {self.growth:.3g}, more than {limit:g} allowed for {str(dtype).replace('torch.', '')}"
                " gradients: the decoded sum would be inaccurate; use fewer adversaries, float32/float64"
                " gradients, or code='frc'."
            )

    # -- the code ---------------------------------------------------------------------------------
    def partitions(self, worker: int) -> list[int]:
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker must be in [0, {self.num_workers}) (got {worker}).")
        return [(worker + t) % self.num_workers for t in range(2 * self.num_adversaries + 1)]

    @property
    def encoding_matrix(self) -> Tensor:
        return self._matrix

    def _combiner(self, suspects: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """For honest set H = not suspects: ``b`` (b^T W[H] = 1^T) and ``R`` (codeword from v[H]: c = R v[H])."""
        cached = self._combiners.get(suspects)
        if cached is not None:
            self._combiners.move_to_end(suspects)
            return cached
        honest = [i for i in range(self.num_workers) if i not in suspects]
        pinv = _pinv(self._matrix[honest], self.num_workers - 2 * self.num_adversaries)
        combiner = (pinv.T @ torch.ones(self.num_workers, dtype=torch.float64), self._matrix @ pinv)
        self._combiners[suspects] = combiner
        if len(self._combiners) > 1024:
            self._combiners.popitem(last=False)
        return combiner

    # -- decoding ---------------------------------------------------------------------------------
    def decode(self, received: Tensor, *, generator: Optional[torch.Generator] = None) -> DecodeResult:
        self._check_received(received)
        p, s = self.num_workers, self.num_adversaries
        acc = accumulation_dtype(received.dtype)
        if s == 0:
            return DecodeResult(self._combine(received, tuple(), acc), [])
        gen = generator if generator is not None else torch.Generator(device=received.device).manual_seed(0)
        rule = self._fit_rule(received.dtype)
        for attempt in range(self.attempts):
            # A located set that leaves the others off the code is retried under a fresh projection:
            # the locator's conditioning depends on the projected error values.
            projected, norms = self._project(received, gen, all_norms=rule.per_row_norm is not None)
            found = self._decode_projection(projected, norms, rule)
            if found is not None:
                suspects, faulty = found
                b, _ = self._combiner(suspects)
                return DecodeResult(self._combine(received, suspects, acc, b), faulty)
        raise DracoDecodeError(
            f"under {self.attempts} independent projections, no {s} workers could be set aside so that the"
            f" other {p - s} fit the code ({rule}): more than s={s} workers are"
            " faulty.",
            list(range(p)),
        )

    def _decode_projection(
        self, projected: Tensor, norms: Tensor, rule: _FitRule
    ) -> Optional[tuple[tuple[int, ...], list[int]]]:
        """Suspects and faulty workers from one set of projections (``P x k``), or None if no fit.

        The fit is checked per column under ``rule``. Naming a suspect also weighs the rows'
        norms: a projection can come out near zero by chance, and then its rounding is large next
        to it; an honest suspect must not be accused for that.
        """
        p, s = self.num_workers, self.num_adversaries
        finite = [i for i in range(p) if bool(torch.isfinite(projected[i]).all())]
        erased = [i for i in range(p) if i not in finite]
        magnitude = projected.abs().amax(dim=1)
        scale = max(float(magnitude[finite].median()), 1e-30) if finite else 1e-30
        erased += [i for i in finite if float(magnitude[i]) > 1e8 * scale]
        if len(erased) > s:
            raise DracoDecodeError(
                f"{len(erased)} workers ({sorted(erased)}) sent non-finite or absurdly large values, more than"
                f" s={s}.",
                sorted(erased),
            )
        v = projected.clone()
        v[erased] = 0.0
        largest_row = float(norms[[i for i in range(p) if i not in erased]].max())
        tried = set()
        for column in range(v.shape[1]):
            # A liar's error can cancel in one column by chance; it is then located from another.
            suspects = self._locate(v[:, column], erased, rule, largest_row)
            if suspects in tried:
                continue
            tried.add(suspects)
            named = self._check_fit(v, projected, norms, suspects, erased, rule)
            if named is not None:
                return suspects, named
        return None

    def _check_fit(
        self,
        v: Tensor,
        projected: Tensor,
        norms: Tensor,
        suspects: tuple[int, ...],
        erased: list[int],
        rule: _FitRule,
    ) -> Optional[list[int]]:
        """The faulty suspects if every column of the other rows fits a codeword, else None."""
        honest = [i for i in range(self.num_workers) if i not in suspects]
        _, reconstruct = self._combiner(suspects)
        codeword = reconstruct @ v[honest]
        size = codeword.abs().amax(dim=0).clamp_min(1e-300)
        residual = (codeword[honest] - v[honest]).abs().amax(dim=0)
        largest_row = float(norms[honest].max())
        if not bool((residual <= rule.allowed(size, largest_row)).all()):
            return None
        # A suspect's codeword value is extrapolated from the others, with their rounding amplified by
        # its row of the reconstruction: it is named only when it misses by more than the tolerance
        # (or ten times what the honest rows actually miss by) times that amplification. An honest
        # suspect is never accused; a liar whose projected error is that small is set aside all the same.
        bound = torch.maximum(10 * residual, rule.naming_floor(size, largest_row))
        amplification = reconstruct.abs().sum(dim=1).clamp_min(1.0)
        return [
            i
            for i in suspects
            if i in erased or bool(((projected[i] - codeword[i]).abs() > bound * amplification[i]).any())
        ]

    def _project(self, received: Tensor, gen: torch.Generator, all_norms: bool = False) -> tuple[Tensor, Tensor]:
        """``V = Y F`` (``P x k``) and the rows' norms, in float64; ``F`` random signs from ``gen``; one pass.

        The norms are measured on every block with ``all_norms``, else estimated from the first.
        """
        d = received.shape[1]
        device = received.device
        k = PROJECTIONS.get(received.dtype, 2)
        nbytes = (d + 7) // 8
        random_bytes = torch.empty(k, nbytes, dtype=torch.uint8, device=gen.device).random_(0, 256, generator=gen)
        random_bytes = random_bytes.to(device).long()
        acc = accumulation_dtype(received.dtype)
        table = _SIGN_TABLE.to(device=device, dtype=acc)
        v = torch.zeros(self.num_workers, k, dtype=torch.float64, device=device)
        squares = torch.zeros(self.num_workers, dtype=torch.float64, device=device)
        # Blocks bound the float32 accumulation error on the CPU; on accelerators the reduction is a
        # tree and small blocks only add kernel launches.
        step = self.chunk_size if device.type == "cpu" else d  # a multiple of 8: each block starts on a byte
        for start in range(0, d, step):
            stop = min(d, start + step)
            lanes = random_bytes[:, start // 8 : (stop + 7) // 8]
            signs = table.index_select(0, lanes.reshape(-1)).view(k, -1)[:, : stop - start]
            block = received[:, start:stop].to(acc)
            v += (block @ signs.t()).double()
            if all_norms:  # the misfit bound scales with the rows' norms: measure them all
                squares = squares + torch.linalg.vector_norm(block, dim=1).double().square()
            elif start == 0:  # the rows' scale, from the first block only: cheap, and enough for naming
                squares = torch.linalg.vector_norm(block, dim=1).double().square() * (d / (stop - start))
        return v.cpu(), squares.sqrt().cpu()

    def _fit_rule(self, dtype: torch.dtype) -> _FitRule:
        """``residual_tolerance`` if given; else per dtype: relative in full precision, per row norm in half."""
        if self.residual_tolerance is not None:
            return _FitRule(self.residual_tolerance, None)
        if dtype in _UNIT_ROUNDOFF:
            return _FitRule(None, HALF_ROUNDING_SLACK * _UNIT_ROUNDOFF[dtype] * self.redundancy)
        return _FitRule(RESIDUAL_TOLERANCE[dtype], None)

    def _locate(self, v: Tensor, erased: list[int], rule: _FitRule, largest_row: float) -> tuple[int, ...]:
        """The ``s`` suspects: erased rows, then the positions where the error locator is smallest."""
        p, s, n = self.num_workers, self.num_adversaries, self.length
        padded = torch.zeros(n, dtype=torch.complex128)
        padded[:p] = v.to(torch.complex128)
        k = torch.tensor(self.zeros, dtype=torch.float64)
        positions = torch.arange(n, dtype=torch.float64)
        basis = torch.polar(torch.ones(len(k), n, dtype=torch.float64), 2 * math.pi * k[:, None] * positions[None, :] / n)
        syndromes = basis @ padded  # T_m = v(w^{Z[m]})
        if float(syndromes.abs().max()) <= 1e-12 * max(float(v.abs().max()), 1e-300):
            return tuple(sorted(erased + [i for i in range(p) if i not in erased][: s - len(erased)]))
        hankel = torch.stack([syndromes[s + row - 1 - torch.arange(s)] for row in range(s)])
        rhs = -syndromes[s : 2 * s]
        locator = torch.linalg.lstsq(hankel, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)
        coefficients = torch.cat([torch.ones(1, dtype=torch.complex128), locator])
        inverse = torch.polar(torch.ones(p, dtype=torch.float64), -2 * math.pi * torch.arange(p, dtype=torch.float64) / n)
        powers = inverse[:, None] ** torch.arange(s + 1, dtype=torch.float64)[None, :]
        magnitude = (powers @ coefficients).abs()
        order = [int(i) for i in torch.argsort(magnitude) if int(i) not in erased]
        suspects = tuple(sorted(erased + order[: s - len(erased)]))
        # Close or very unequal errors make the locator's ranking fragile near its s-th place: if the
        # other rows do not fit a codeword, re-rank every row by its distance to the least-squares
        # codeword of the current honest set, a few times.
        for _ in range(self.refinements):
            honest = [i for i in range(p) if i not in suspects]
            _, reconstruct = self._combiner(suspects)
            codeword = reconstruct @ v[honest]
            distance = (v - codeword).abs()
            size = torch.tensor([float(codeword.abs().max()) or 1.0], dtype=torch.float64)
            if float(distance[honest].max()) <= float(rule.allowed(size, largest_row)):
                break
            ranked = sorted((i for i in range(p) if i not in erased), key=lambda i: -float(distance[i]))
            refined = tuple(sorted(erased + ranked[: s - len(erased)]))
            if refined == suspects:
                break
            suspects = refined
        return suspects

    def _combine(self, received: Tensor, suspects: tuple[int, ...], acc: torch.dtype, b: Optional[Tensor] = None) -> Tensor:
        """``total = b^T Y[H]``, one blockwise pass over the honest rows."""
        if b is None:
            b, _ = self._combiner(suspects)
        p, d = received.shape
        honest = [i for i in range(p) if i not in suspects]
        weights = b.to(device=received.device, dtype=acc)
        runs, first = [], 0  # contiguous runs of honest rows: [start, stop) and their weights' offset
        for i in range(p + 1):
            if i == p or i in suspects:
                if first < i:
                    offset = honest.index(first)
                    runs.append((first, i, weights[offset : offset + i - first]))
                first = i + 1
        total = torch.zeros(d, dtype=acc, device=received.device)
        # No accumulation error to bound here: larger blocks, fewer calls (one on accelerators).
        step = 4 * self.chunk_size if received.device.type == "cpu" else d
        for start in range(0, d, step):
            stop = min(d, start + step)
            block = total[start:stop]
            for lo, hi, w in runs:
                block.addmv_(received[lo:hi, start:stop].t().to(acc), w)
        return total


def _pinv(matrix: Tensor, rank: int) -> Tensor:
    """Pseudo-inverse of a matrix whose rank is known exactly (numerical rank detection misjudges codes)."""
    u, sigma, vh = torch.linalg.svd(matrix, full_matrices=False)
    return vh[:rank].T @ torch.diag(1.0 / sigma[:rank]) @ u[:, :rank].T
