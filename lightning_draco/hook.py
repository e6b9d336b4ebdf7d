"""The DRACO comm hook: coded gradients go to the parameter server, the decoded mean comes back.

It replaces DDP's all-reduce bucket by bucket. DDP launches buckets in index order on every
rank, and this hook finishes each bucket's collectives before it returns, so every rank issues
the same collectives in the same order and the parameter server holds one bucket at a time
(or, when a robust rule needs whole gradients, one step's gradient from every rank).
"""

import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco._seeding import generator
from lightning_draco.adversary import Adversary
from lightning_draco.codes import Code, DracoDecodeError

__all__ = ["DecodeStatus", "DracoHookState", "draco_hook"]


class DecodeStatus:
    """What the parameter server broadcasts about each bucket (first entry of the outcome vector)."""

    OK = 0
    FAILED = 1  # the vectors reveal more liars than the code tolerates
    NONFINITE = 2  # the honest vectors agree on a gradient with NaN or Inf in it


# Per-rank flags in the outcome vector.
_HONEST, _CAUGHT, _SUSPECT = 0, 1, 2


class DracoHookState:
    """State of ``draco_hook`` on one rank.

    The strategy calls ``begin_step`` before each syncing backward and reads the step's outcome
    (``caught``, ``failure``, ``nonfinite``) after it.
    """

    __slots__ = (
        "process_group",
        "code",
        "rank",
        "world_size",
        "ps_rank",
        "adversary",
        "liars",
        "scale",
        "check_finite",
        "secret",
        "step",
        "bucket",
        "calls",
        "caught",
        "failure",
        "nonfinite",
        "whole_step",
        "total_numel",
        "layout",
        "arrivals",
        "offset",
        "pending",
        "seconds",
        "_received",
        "_step_received",
    )

    def __init__(
        self,
        code: Code,
        rank: int,
        ps_rank: int,
        process_group: Optional[dist.ProcessGroup] = None,
        adversary: Optional[Adversary] = None,
        check_finite: bool = True,
        secret: int = 0,
        whole_step: bool = False,
        total_numel: int = 0,
    ):
        #: Process group of the exchange (``None``: the default group).
        self.process_group = process_group
        #: The gradient code; the parameter server decodes with it.
        self.code = code
        #: This process's rank, and the number of ranks (= the code's number of workers).
        self.rank = rank
        self.world_size = code.num_workers
        #: The trusted rank that decodes; it is also a worker.
        self.ps_rank = ps_rank
        #: Simulated Byzantine workers, or ``None``.
        self.adversary = adversary
        #: Ranks that lie at the current step (from ``adversary``).
        self.liars = frozenset()
        #: Factor this rank's bucket is multiplied by before it is sent: the strategy leaves the coded
        #: gradient divided by the rank's last non-zero encoding weight (see ``DracoStrategy._weighted_step``).
        self.scale = 1.0
        #: Whether a decoded gradient with NaN/Inf is reported as ``DecodeStatus.NONFINITE``.
        self.check_finite = check_finite
        #: The parameter server's secret: seeds the projections of codes that draw them. Never sent.
        self.secret = secret
        #: Current optimizer step, and the index of the next bucket within it.
        self.step = 0
        self.bucket = 0
        #: Number of buckets this hook has exchanged since construction.
        self.calls = 0
        #: Outcome of the current step, the same on every rank.
        self.caught = set()
        self.failure: Optional[DracoDecodeError] = None
        self.nonfinite = False
        #: Decode the whole gradient once per step (True) or each bucket as it comes (False).
        self.whole_step = whole_step
        #: Length of the whole flattened gradient (the sum of all buckets), for ``whole_step``.
        self.total_numel = total_numel
        #: ``whole_step``: each parameter's offset (by ``data_ptr``) in the step's vector, in the
        #: model's parameter order. Buckets arrive in an order DDP changes after the first step,
        #: so the PS lays the vector out by parameter: a rule with state (centred clipping's
        #: anchor) sees the same coordinate at the same place at every step and after a resume.
        self.layout: dict[int, int] = {}
        #: ``whole_step``: ``(offset in arrival order, offset in layout, numel)`` per parameter so far.
        self.arrivals: list[tuple[int, int, int]] = []
        #: ``whole_step``: where the next bucket goes in the step's vector, and the buckets waiting.
        self.offset = 0
        self.pending: list = []
        #: Wall seconds this rank spent in the exchange's collectives and (on the PS) decoding,
        #: accumulated since construction: for time breakdowns.
        self.seconds = {"communication": 0.0, "decode": 0.0}
        #: The parameter server's receive buffers, reused: one bucket (grows to the largest), or
        #: with ``whole_step`` one whole gradient (P x total_numel).
        self._received: Optional[Tensor] = None
        self._step_received: Optional[Tensor] = None

    @property
    def is_ps(self) -> bool:
        return self.rank == self.ps_rank

    def begin_step(self, step: int) -> None:
        """Reset the per-step outcome and choose this step's liars."""
        self.step, self.bucket = step, 0
        self.caught, self.failure, self.nonfinite = set(), None, False
        self.offset, self.pending, self.arrivals = 0, [], []
        if self.adversary is None:
            self.liars = frozenset()
        else:
            self.liars = self.adversary.faulty_ranks(
                step, self.world_size, self.ps_rank, self.code.num_adversaries
            )

    def receive_buffer(self, like: Tensor) -> Tensor:
        """A ``(world_size, numel)`` view into the reusable receive buffer."""
        need = self.world_size * like.numel()
        buf = self._received
        if buf is None or buf.numel() < need or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._received = torch.empty(need, dtype=like.dtype, device=like.device)
        return buf[:need].view(self.world_size, like.numel())

    def step_buffer(self, like: Tensor) -> Tensor:
        """The PS's ``(world_size, total_numel)`` buffer for a whole step's gradients."""
        buf = self._step_received
        if buf is None or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._step_received = torch.empty(
                self.world_size, self.total_numel, dtype=like.dtype, device=like.device
            )
        return buf

    def projection_generator(self, bucket: int, device: torch.device) -> torch.Generator:
        """Fresh randomness for this step and bucket, derived from the secret on the parameter server."""
        return generator(self.secret, self.step, bucket, device=device)


def draco_hook(state: DracoHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Replace the all-reduce of one gradient bucket by DRACO's coded exchange.

    The bucket holds this rank's coded gradient divided by ``state.scale`` (the strategy applies
    the encoding weights between per-partition backwards; see ``DracoStrategy._weighted_step``).

    0. Multiply the bucket by ``state.scale``: this rank's coded gradient.
    1. A simulated adversary replaces its outgoing vector (an omniscient one first learns the
       honest vectors' mean and spread, through two all-reduces every rank takes part in).
    2. ``gather``: every rank's vector reaches the parameter server (PS).
    3. The PS decodes: the sum of the ``P`` partition gradients and the ranks that lied,
       then divides by ``P`` so that, without liars, the result is plain averaging's.
       With ``whole_step`` the PS keeps gathering until DDP's last bucket of the step and
       decodes the whole gradient at once (rules such as Krum are defined on whole vectors).
    4. ``broadcast`` the decoded bucket(s) from the PS, then the outcome: status and per-rank flags.
    5. Every rank records the outcome (who was caught, a failed decode) for the strategy.

    Returns the future of the decoded bucket, written into ``bucket.buffer()``: completed at
    once, or with ``whole_step`` when the step's last bucket has been decoded.
    """
    buffer = bucket.buffer()
    index = state.bucket
    state.bucket += 1
    state.calls += 1
    coded = buffer if state.scale == 1.0 else buffer * state.scale
    outgoing = _outgoing(state, coded, index)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()

    if not state.whole_step:
        received = state.receive_buffer(buffer) if state.is_ps else None
        _gather(state, outgoing, received)
        _decode_and_share(state, [buffer], received, index)
        future.set_result(buffer)
        return future

    start = state.offset
    received = state.step_buffer(buffer)[:, start : start + buffer.numel()] if state.is_ps else None
    _gather(state, outgoing, received)
    if state.is_ps and state.layout:
        for param in bucket.parameters():  # the bucket's buffer holds its parameters' gradients in this order
            state.arrivals.append((start, state.layout[param.data_ptr()], param.numel()))
            start += param.numel()
        if start != state.offset + buffer.numel():
            raise RuntimeError(f"DDP bucket {index} holds {buffer.numel()} values but its parameters {start - state.offset}.")
    state.offset += buffer.numel()
    state.pending.append((buffer, future))
    if bucket.is_last():
        buffers = [b for b, _ in state.pending]
        whole = state.step_buffer(buffer)[:, : state.offset] if state.is_ps else None
        _decode_and_share(state, buffers, whole, index, _layout_order(state, buffer.device) if state.is_ps else None)
        for b, pending in state.pending:
            pending.set_result(b)
        state.pending, state.offset, state.arrivals = [], 0, []
    return future


def _layout_order(state: DracoHookState, device: torch.device) -> Optional[Tensor]:
    """Index into the arrival-ordered step vector giving it in ``state.layout`` order (None: no layout)."""
    if not state.layout:
        return None
    order = torch.empty(state.offset, dtype=torch.long)
    for arrived, placed, numel in state.arrivals:
        order[placed : placed + numel] = torch.arange(arrived, arrived + numel)
    return order.to(device)


def _outgoing(state: DracoHookState, buffer: Tensor, index: int) -> Tensor:
    """What this rank sends: its coded bucket, or what a simulated adversary puts in its place."""
    adversary = state.adversary
    if adversary is None:
        return buffer
    knowledge = {}
    if adversary.omniscient:
        # Simulation cost: the honest vectors' per-coordinate mean and std (or all of them), known to every rank.
        start = time.perf_counter()
        if adversary.wants("honest_vectors"):
            gathered = [torch.empty_like(buffer) for _ in range(state.world_size)]
            dist.all_gather(gathered, buffer.detach(), group=state.process_group)
            vectors = torch.stack(gathered)
            knowledge = {"honest_vectors": vectors}
            if adversary.wants("honest_mean") or adversary.wants("honest_std"):
                knowledge.update(honest_mean=vectors.mean(dim=0), honest_std=vectors.std(dim=0, unbiased=False))
        else:
            total = buffer.detach().clone()
            squares = buffer.detach() * buffer.detach()
            dist.all_reduce(total, group=state.process_group)
            dist.all_reduce(squares, group=state.process_group)
            mean = total / state.world_size
            knowledge = {"honest_mean": mean, "honest_std": (squares / state.world_size - mean * mean).clamp_min(0).sqrt()}
        state.seconds["communication"] += time.perf_counter() - start
    if state.rank not in state.liars:
        return buffer
    knowledge["liars"] = tuple(sorted(state.liars))
    knowledge["defence"] = lambda received: _simulated_defence(state, received, index)
    return adversary.corrupt(buffer, rank=state.rank, step=state.step, bucket=index, **knowledge)


def _simulated_defence(state: DracoHookState, received: Tensor, index: int) -> Optional[Tensor]:
    """The PS's result for ``received`` as a liar can compute it: its own copy of the code and rule,
    its own randomness in place of the PS's secret, the rule's state restored after (None: the
    decode fails). With whole-step aggregation this runs on one bucket: a proxy for the whole step."""
    rule = getattr(state.code, "aggregator", None)
    saved = rule.state_dict() if rule is not None else None
    try:
        gen = generator(state.adversary.seed, state.step, index, -2, device=received.device)
        return state.code.decode(received, generator=gen).total / state.world_size
    except DracoDecodeError:
        return None
    finally:
        if rule is not None:
            rule.load_state_dict(saved)


def _gather(state: DracoHookState, outgoing: Tensor, received: Optional[Tensor]) -> None:
    start = time.perf_counter()
    dist.gather(
        outgoing, list(received.unbind(0)) if state.is_ps else None, dst=state.ps_rank, group=state.process_group
    )
    state.seconds["communication"] += time.perf_counter() - start


def _decode_and_share(
    state: DracoHookState, buffers: list[Tensor], received: Optional[Tensor], index: int, order: Optional[Tensor] = None
) -> None:
    """On the PS, decode ``received`` into ``buffers`` (consecutive pieces of it); then share result and outcome.

    ``order``: decode ``received[:, order]`` instead, and put the result back in arrival order.
    """
    world, ps, group = state.world_size, state.ps_rank, state.process_group
    device = buffers[0].device
    outcome = torch.zeros(1 + world, dtype=torch.int32, device=device)
    error: Optional[DracoDecodeError] = None
    start = time.perf_counter()
    if state.is_ps:
        try:
            laid_out = received if order is None else received.index_select(1, order)
            result = state.code.decode(laid_out, generator=state.projection_generator(index, device))
            _check_verdict(state, result.faulty)
        except DracoDecodeError as err:
            error = err
            outcome[0] = DecodeStatus.FAILED
            outcome[1 + torch.tensor(err.suspects, dtype=torch.long)] = _SUSPECT
            for buffer in buffers:
                buffer.zero_()
        else:
            total = result.total.div_(world)
            if order is not None:
                total = torch.empty_like(total).index_copy_(0, order, total)
            offset = 0
            for buffer in buffers:
                buffer.copy_(total[offset : offset + buffer.numel()])
                offset += buffer.numel()
            if result.faulty:
                outcome[1 + torch.tensor(result.faulty, dtype=torch.long)] = _CAUGHT
            if state.check_finite and not bool(torch.isfinite(total).all()):
                outcome[0] = DecodeStatus.NONFINITE
    decoded = time.perf_counter()
    state.seconds["decode"] += decoded - start

    for buffer in buffers:
        dist.broadcast(buffer, src=ps, group=group)
    dist.broadcast(outcome, src=ps, group=group)
    state.seconds["communication"] += time.perf_counter() - decoded

    flags = outcome.tolist()
    status = flags[0]
    state.caught.update(r for r in range(world) if flags[1 + r] == _CAUGHT)
    if status == DecodeStatus.FAILED:
        # Rare: let every rank raise the PS's own words, at the cost of one more collective.
        carrier = [error]
        dist.broadcast_object_list(carrier, src=ps, group=group)
        if state.failure is None:
            state.failure = carrier[0].at(state.step, index)
    elif status == DecodeStatus.NONFINITE:
        state.nonfinite = True


def _check_verdict(state: DracoHookState, faulty: list[int]) -> None:
    """Raise ``DracoDecodeError`` for a verdict that at most ``s`` liars cannot produce.

    With more than ``s`` liars a code can be outvoted: ``s + 1`` colluders in the PS's group win
    the vote and name the (trusted) PS as the liar, or a decode names more than ``s`` ranks. Its
    sum is then not known to be the honest one, so it must be neither applied nor reported.
    """
    code, ps, s = state.code, state.ps_rank, state.code.num_adversaries
    blamed = sorted(set(faulty))
    if ps in blamed:
        outvoters = sorted(_sharing_a_partition(code, [ps]) - {ps} - set(blamed))
        raise DracoDecodeError(
            f"the decode names the parameter server (rank {ps}), which is trusted, as faulty: ranks {outvoters}"
            f" outvoted it, so more than s={s} ranks lied; the decoded gradient is not applied.",
            outvoters,
        )
    if len(blamed) > s:
        suspects = sorted(_sharing_a_partition(code, blamed) - {ps})
        raise DracoDecodeError(
            f"the decode names {len(blamed)} ranks {blamed} as faulty, more than s={s}: more than s ranks lied and"
            " the vote cannot be trusted; the decoded gradient is not applied.",
            suspects,
        )


def _sharing_a_partition(code: Code, ranks: list[int]) -> set[int]:
    """The ranks that compute at least one partition that one of ``ranks`` computes."""
    held = {p for rank in ranks for p in code.partitions(rank)}
    return {w for w in range(code.num_workers) if held.intersection(code.partitions(w))}
