"""The state a DRACO comm hook carries on one rank, in parts grouped by lifetime.

``ExchangeState`` holds four parts, each written by one party only:

- ``ExchangeSetup``: fixed once the strategy has built the code (the PS's secret aside, which a
  resume restores);
- ``StepOutcome``: reset by the strategy at the start of each optimizer step, filled by the hook
  as buckets are exchanged, read by the strategy after the backward;
- ``ExchangeStats``: accumulated by the collectives since the state was made;
- ``WholeStepAssembly`` (whole-step exchange only): where each bucket goes in the step's vector.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco._seeding import generator
from lightning_draco.codes import Code, DracoDecodeError

__all__ = ["ExchangeSetup", "ExchangeState", "ExchangeStats", "PendingGroups", "StepOutcome", "WholeStepAssembly"]


class ExchangeSetup:
    """What every exchange of the run shares."""

    __slots__ = ("process_group", "code", "rank", "world_size", "ps_rank", "check_finite", "secret", "timeout")

    def __init__(
        self,
        code: Code,
        rank: int,
        ps_rank: Optional[int],
        process_group: Optional[dist.ProcessGroup] = None,
        check_finite: bool = True,
        secret: int = 0,
        timeout: Optional[float] = None,
    ):
        #: Process group of the exchange (``None``: the default group).
        self.process_group = process_group
        #: The gradient code the decoders decode with.
        self.code = code
        #: This process's rank, and the number of ranks (= the code's number of workers).
        self.rank = rank
        self.world_size = code.num_workers
        #: The trusted rank that decodes in the parameter-server exchanges; it is also a worker. ``None``
        #: under sharded decoding, where no rank is trusted (any may be drawn to lie).
        self.ps_rank = ps_rank
        #: Whether a decoded gradient with NaN/Inf makes the step fail as ``StepOutcome.nonfinite``.
        self.check_finite = check_finite
        #: The parameter server's secret: seeds the projections of codes that draw them. Never sent.
        self.secret = secret
        #: The process group's collective timeout in seconds (``None``: not known here), which a failed
        #: collective's message reports.
        self.timeout = timeout

    @property
    def is_ps(self) -> bool:
        return self.rank == self.ps_rank

    def projection_generator(self, step: int, bucket: int, device: torch.device) -> torch.Generator:
        """The PS's fresh randomness for one step and bucket, derived from its secret."""
        return generator(self.secret, step, bucket, device=device)


class PendingGroups:
    """Reactive mode: the groups whose replicas disagreed at this step, until they are recomputed and voted.

    Filled by the reactive hooks bucket by bucket, read by the settlement after the backward
    (``exchange/reactive.py``). ``groups`` and ``layout`` are the same on every rank; ``kept`` is
    held where the disagreeing groups are decoded (the parameter server, or each shard's decoders).
    """

    __slots__ = ("groups", "layout", "kept", "sharded")

    def __init__(self) -> None:
        #: Bucket index -> the groups (ascending) whose replicas disagreed in it.
        self.groups: dict[int, list[int]] = {}
        #: Bucket index -> the bucket's parameters, in the order of its flat buffer (every bucket of the step).
        self.layout: dict[int, list[Tensor]] = {}
        #: Bucket index -> what a decoder keeps of the received rows. The PS: per group, the agreed value
        #: (one row) or, for a disagreeing group, its members' rows. A sharded decoder: one tensor, every
        #: rank's rows of the shards it decodes.
        self.kept: dict[int, list[Tensor]] = {}
        #: Whether the groups were flagged without a parameter server (``reactive_sharded_hook``).
        self.sharded = False

    def __bool__(self) -> bool:
        return bool(self.groups)

    @property
    def escalated(self) -> list[int]:
        """Every group that disagreed in some bucket, ascending."""
        return sorted({g for groups in self.groups.values() for g in groups})


class StepOutcome:
    """One optimizer step as the exchange saw it: the same on every rank once the step's buckets are done."""

    __slots__ = ("step", "buckets", "caught", "decoders_outvoted", "failure", "nonfinite", "pending")

    def __init__(self, step: int = 0):
        #: The optimizer step (``trainer.global_step``).
        self.step = step
        #: Buckets exchanged so far in this step; the next bucket's index.
        self.buckets = 0
        #: Ranks caught lying: sending a faulty coded gradient, or (sharded decoding) a decoded shard
        #: that the other decoders outvoted.
        self.caught: set[int] = set()
        #: Sharded decoding: the ranks caught lying as decoders (also in ``caught``).
        self.decoders_outvoted: set[int] = set()
        #: The first failed decode of the step (more liars than the code tolerates), or ``None``.
        self.failure: Optional[DracoDecodeError] = None
        #: Whether the honest ranks agree on a gradient with NaN or Inf in it.
        self.nonfinite = False
        #: Reactive mode: the groups to recompute and vote before the optimizer step.
        self.pending = PendingGroups()


class ExchangeStats:
    """What this rank spent on the exchange since the state was made, for time and traffic breakdowns."""

    __slots__ = ("calls", "seconds", "sent", "received")

    def __init__(self) -> None:
        #: Buckets the hook exchanged.
        self.calls = 0
        #: Wall seconds in the exchange's collectives, and in decoding.
        self.seconds = {"communication": 0.0, "decode": 0.0}
        #: Payload bytes this rank sent to and received from other ranks (its own share excluded).
        self.sent = 0
        self.received = 0


class WholeStepAssembly:
    """The PS's layout of a whole step's gradient, for rules defined on whole vectors (Krum, ...).

    Buckets arrive in an order DDP changes after the first step, so the step's vector is laid out
    by parameter, in the model's order: a rule with state (centred clipping's anchor) sees the
    same coordinate at the same place at every step and after a resume.
    """

    __slots__ = ("numel", "layout", "arrivals", "offset", "pending", "_received")

    def __init__(self, parameters: Iterable[Tensor]):
        parameters = list(parameters)
        dtypes = sorted({p.dtype for p in parameters}, key=str)
        if len(dtypes) > 1:
            raise ValueError(
                "aggregate_over='whole' needs every trained parameter in one dtype (got"
                f" {', '.join(map(str, dtypes))}); use aggregate_over='bucket'."
            )
        #: Length of the whole flattened gradient.
        self.numel = sum(p.numel() for p in parameters)
        #: Each parameter's offset in the step's vector, by ``data_ptr`` (DDP's buckets give parameters).
        offsets = itertools.accumulate((p.numel() for p in parameters), initial=0)
        self.layout = {p.data_ptr(): offset for p, offset in zip(parameters, offsets)}
        #: ``(offset in arrival order, offset in layout, numel)`` per parameter so far this step.
        self.arrivals: list[tuple[int, int, int]] = []
        #: Where the next bucket goes (arrival order), and the buckets waiting with their futures.
        self.offset = 0
        self.pending: list[tuple[Tensor, torch.futures.Future]] = []
        self._received: Optional[Tensor] = None

    def reset(self) -> None:
        self.arrivals, self.offset, self.pending = [], 0, []

    def received(self, world_size: int, like: Tensor) -> Tensor:
        """The PS's ``(world_size, numel)`` buffer for a whole step's gradients, reused."""
        buf = self._received
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._received = torch.empty(world_size, self.numel, dtype=like.dtype, device=like.device)
        return buf

    def place(self, bucket: dist.GradBucket, start: int) -> None:
        """Record where ``bucket``'s parameters, arriving at ``start``, belong in the layout."""
        position = start
        for param in bucket.parameters():  # the bucket's buffer holds its parameters' gradients in this order
            self.arrivals.append((position, self.layout[param.data_ptr()], param.numel()))
            position += param.numel()
        if position != start + bucket.buffer().numel():
            raise RuntimeError(
                f"DDP bucket {bucket.index()} holds {bucket.buffer().numel()} values but its parameters {position - start}."
            )

    def order(self, device: torch.device) -> Tensor:
        """Index into the arrival-ordered step vector that gives it in layout order."""
        order = torch.empty(self.offset, dtype=torch.long)
        for arrived, placed, numel in self.arrivals:
            order[placed : placed + numel] = torch.arange(arrived, arrived + numel)
        return order.to(device)


class ExchangeState:
    """The state of a DRACO comm hook on one rank (``register_comm_hook(state, hook)``).

    The strategy calls ``begin_step`` before each syncing backward and reads ``outcome`` after it.
    """

    __slots__ = (
        "setup", "outcome", "stats", "assembly", "corrupt_decoded", "corrupt_recomputed", "forced", "failed",
        "_received",
    )

    def __init__(self, setup: ExchangeSetup, assembly: Optional[WholeStepAssembly] = None):
        #: Fixed for the run: code, ranks, process group, the PS's secret.
        self.setup = setup
        #: The current step's outcome.
        self.outcome = StepOutcome()
        #: Calls, seconds and bytes since construction.
        self.stats = ExchangeStats()
        #: The whole-step exchange's layout (``None`` for per-bucket exchanges).
        self.assembly = assembly
        #: Simulation only: what this rank sends in place of its decoded shards (sharded decoding),
        #: set by the adversarial wrapper on a liar for the bucket being exchanged; ``None``: the truth.
        self.corrupt_decoded: Optional[Callable[[Tensor, int], Tensor]] = None
        #: Simulation only (reactive mode): what this rank sends in place of a group's sum it recomputed
        #: for bucket ``index`` (``corrupt_recomputed(value, index)``); ``None``: the truth.
        self.corrupt_recomputed: Optional[Callable[[Tensor, int], Tensor]] = None
        #: Reactive mode: groups recomputed and voted at every step whatever their replicas say
        #: (the groups of quarantined ranks), set by the strategy.
        self.forced: frozenset[int] = frozenset()
        #: The collective failure this rank hit (``collectives.CollectiveFailedError``, set where it is
        #: raised), for the strategy to raise as is where a communication thread's future could not carry it.
        self.failed: Optional[Exception] = None
        #: A reusable receive buffer (``received_rows``).
        self._received: Optional[Tensor] = None

    def begin_step(self, step: int) -> None:
        """Start a fresh ``outcome`` for optimizer step ``step``."""
        self.outcome = StepOutcome(step)
        if self.assembly is not None:
            self.assembly.reset()

    def next_bucket(self) -> int:
        """Count one more bucket exchanged; its index within the step."""
        index = self.outcome.buckets
        self.outcome.buckets += 1
        self.stats.calls += 1
        return index

    def received_rows(self, rows: int, like: Tensor) -> Tensor:
        """A ``(rows, numel)`` view into a reusable buffer of ``like``'s dtype and device."""
        need = rows * like.numel()
        buf = self._received
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._received = torch.empty(need, dtype=like.dtype, device=like.device)
        return buf[:need].view(rows, like.numel())
