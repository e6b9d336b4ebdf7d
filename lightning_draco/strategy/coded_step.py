"""The coded step: this rank's coded gradient ``sum_j W[i, j] g_j`` from one forward per partition."""


from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.utils.checkpoint import CheckpointFunction

from lightning_draco._seeding import seeded_rng
from lightning_draco.codes import Code
from lightning_draco.codes.base import horner_order
from lightning_draco.data import PartitionBatch, partition_seed

__all__ = ["CodedStep", "UnsupportedStepError", "encoded", "uses_reentrant_checkpoint"]

#: The user's training step on one partition's batch; returns its output (a loss or a dict with one).
Forward = Callable[[Any], Any]


class UnsupportedStepError(ValueError):
    """A training step DRACO cannot train through correctly (found in the graphs of the first step)."""


class CodedStep:
    """Runs the user's training step once per partition this rank holds and prepares the backward.

    Args:
        code: the gradient code; ``rank``'s row of its encoding matrix gives the weights.
        rank: this rank.
        seed: seeds each partition's randomness (dropout, augmentation), the same on every holder.
        device: where the partition's random streams live.
        module: the trained model. Its buffers (BatchNorm's running statistics, spectral
            normalisation's power-iteration vectors, a quantization observer's range ...) keep what
            the forward of this rank's own partition left (partition ``rank``, the batch DDP's rank
            ``rank`` would get): once per step, as under DDP, not once per partition held. Every
            other partition's forward runs on copies (``_buffers_for``).
        broadcast_buffers: whether the PS's buffers are copied to every rank after each optimizer
            step (``DracoStrategy(broadcast_buffers=)``).

    Buffers a forward both moves and reads. Each partition ``j``'s forward starts from the buffers
    DDP's rank ``j`` would hold: the same values on every holder of ``j``, whatever else that holder
    ran before it, so the replicas of ``g_j`` agree. Right after the PS's buffers were copied to every
    rank (the first step, and every step with ``broadcast_buffers``) that is the buffers as this step
    began; between the copies (gradient accumulation's micro-batches, or ``broadcast_buffers=False``)
    it is what partition ``j``'s forward left the step before, which every holder keeps. The strategy
    says when the copies happen (``buffers_copied``).
    """

    def __init__(
        self,
        code: Code,
        rank: int,
        seed: int,
        device: torch.device,
        module: Optional[nn.Module] = None,
        broadcast_buffers: bool = True,
    ):
        self.rank = rank
        self.module = module
        self.broadcast_buffers = broadcast_buffers
        #: Set when other ranks recompute this rank's partitions from the step's start (reactive
        #: mode's helpers, ``Escalation``): that needs the buffers alike on every rank as each step begins.
        self.recomputed = False
        self.weights = code.coefficients(rank)
        self.seed = seed
        self.device = device
        #: Weights all 1 (the repetition code): the coded gradient is the gradient of the summed losses.
        self.summed = all(weight == 1.0 for weight in self.weights)
        #: Whether a step's graphs were searched for reentrant checkpoints: the first step's are (a model
        #: checkpoints alike at every step; searching every step would cost about 1 ms per thousand
        #: autograd nodes).
        self.graph_checked = False
        #: What the exchange multiplies the bucket by before it leaves (``encoded``): the weighted
        #: step leaves ``.grad`` holding the coded gradient divided by its last non-zero weight.
        self.scale = 1.0
        # The weighted partitions' gradients, added to ``.grad`` by ``add_side_gradients``.
        self._side: Optional[tuple[list[Tensor], list[Optional[Tensor]]]] = None
        # The model's buffers by place (module, name, qualified name), as the step began.
        self._slots: list[tuple[nn.Module, str, str]] = []
        # Their values as the step (or micro-batch) began: a partition's forward without a state of
        # its own starts from copies of them, and so does a helper's recomputation.
        self._start: list[Tensor] = []
        # Partition j (not this rank's) -> the buffers its forward left, the values DDP's rank j holds
        # until the PS's are copied to every rank again.
        self._states: dict[int, list[Tensor]] = {}
        self._replaying = False
        #: The partition whose forward (the user's ``training_step``) is running; None between them.
        self.running: Optional[int] = None
        # The collectives already warned about (``collective``): once each per run.
        self._warned: set[str] = set()

    def _begin(self) -> None:
        """As a step (or micro-batch) begins: where each partition's forward starts (see the class docs)."""
        if self.module is None or self._replaying:
            return
        slots = _buffer_slots(self.module)
        places = [(id(m), name) for m, name, _ in slots]
        if places != [(id(m), n) for m, n, _ in self._slots]:
            self._states.clear()
        self._slots = slots
        self._start = _copies([m._buffers[name] for m, name, _ in slots])

    def buffers_copied(self) -> None:
        """The PS's buffers were just copied to every rank (after an optimizer step, ``broadcast_buffers``):
        every partition's next forward starts from them, as DDP's ranks' would after such a copy."""
        self._states.clear()

    @contextmanager
    def _buffers_for(self, partition: int) -> Iterator[None]:
        """The forward of ``partition`` inside runs on its own copies of the model's buffers (none for
        this rank's own partition outside a recomputation): those it starts from are its state, or the
        step's start; what it leaves becomes its state; the model's buffers are put back after it.

        The buffer objects are swapped (``module._buffers``), never written into: a tensor an earlier
        forward's graph saved for its backward keeps its values, and a buffer a forward resizes (a
        quantization observer's) may take any shape in the copy."""
        if self.module is None or (partition == self.rank and not self._replaying):
            yield
            return
        slots = self._slots
        kept = [m._buffers.get(name) for m, name, _ in slots]
        state = None if self._replaying else self._states.pop(partition, None)
        for (module, name, _), value in zip(slots, state if state is not None else _copies(self._start)):
            module._buffers[name] = value
        try:
            yield
        finally:
            left = [m._buffers.get(name) for m, name, _ in slots]
            for (module, name, _), value in zip(slots, kept):
                module._buffers[name] = value
        if self._replaying:
            return
        self._states[partition] = left
        if not self.graph_checked and self.recomputed and not self.broadcast_buffers:
            moved = [qualified for (module, name, qualified), before, after in zip(slots, self._start, left)
                     if not _running_statistic(module, name) and _changed(before, after)]
            if moved:
                raise UnsupportedStepError(
                    f"redundancy_mode='reactive' with broadcast_buffers=False cannot recompute a group whose"
                    f" training forward moves buffers other than BatchNorm's running statistics ({moved}): a helper"
                    " recomputes the group's partitions from its own buffers, which without the PS's copy each"
                    " step differ from the members' (as DDP's ranks' do), so honest replicas could disagree. Pass"
                    " broadcast_buffers=True (the default), or use redundancy_mode='full'."
                )

    @contextmanager
    def replaying(self, module: Optional[nn.Module] = None) -> Iterator[None]:
        """Inside: the steps recompute other ranks' partitions (a helper's recomputation): every
        forward starts from copies of the buffers this rank's step began with, as the partition's
        holders' did, and the model's buffers and the partitions' states are left as they were.

        ``module``: the model, where the coded step was made without one (its buffers as they are now
        stand for the step's start)."""
        saved = self.module, self._slots, self._start
        if self.module is None and module is not None:
            self.module, self._slots = module, _buffer_slots(module)
            self._start = _copies([m._buffers[name] for m, name, _ in self._slots])
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False
            self.module, self._slots, self._start = saved

    @contextmanager
    def outside_forward(self) -> Iterator[None]:
        """Inside: collectives are not the user's step's (Lightning syncing a value logged as it is)."""
        running, self.running = self.running, None
        try:
            yield
        finally:
            self.running = running

    def collective(self, name: str) -> None:
        """The strategy's collective ``name`` (``all_gather``, ``reduce``, ``broadcast``, ``barrier``) is about
        to run. Called from inside a partition's forward, it is outside what DRACO decodes: refused where
        other ranks recompute partitions (reactive mode), warned about once otherwise.

        Every rank runs ``training_step`` once per partition it holds, so its k-th call of a collective
        meets the other ranks' k-th calls, made for other partitions: what it returns is not what DDP's
        would return, and what a liar sends through it reaches every rank unchecked. A recomputation runs
        ``training_step`` on a group's helpers only, so there the collective would wait, until the
        collective timeout, for ranks that never join it: at the very step a liar was caught."""
        if self.running is None:
            return
        if self.recomputed:
            raise UnsupportedStepError(
                f"training_step called the strategy's {name} (in partition {self.running}'s forward), which"
                " redundancy_mode='reactive' cannot run: when a group's replicas disagree, its helpers run training_step"
                " again on their own, and a collective inside it would wait for ranks that never join it until the"
                " collective timeout. Compute cross-rank values outside training_step (in a callback, on the decoded"
                " model), or use redundancy_mode='full'."
            )
        if name not in self._warned:
            self._warned.add(name)
            rank_zero_warn(
                f"training_step calls the strategy's {name} (self.all_gather, self.trainer.strategy.reduce, ...)."
                " DracoStrategy runs training_step once per partition a rank holds, so each call exchanges"
                " different partitions' values on different ranks (the model is not DDP's), and what a rank sends"
                " through it is not decoded: a liar can send anything there. DRACO checks the gradients only;"
                " compute cross-rank values outside training_step (in a callback, on the decoded model)."
            )

    def add_side_gradients(self) -> None:
        """Before the syncing backward, after Lightning zeroed the gradients: add the weighted partitions' share."""
        side, self._side = self._side, None
        if side is None:
            return
        for param, share in zip(*side):
            if share is not None:
                param.grad = share if param.grad is None else param.grad.add_(share)

    def _partition(self, batch: PartitionBatch, index: int, forward: Forward) -> tuple[Any, Tensor]:
        """The user's training step on one partition, under that partition's seeds; its output and loss."""
        partition = batch.partitions[index]
        with seeded_rng(partition_seed(self.seed, batch.epoch, batch.index, partition), self.device):
            with self._buffers_for(partition):
                self.running = partition
                try:
                    output = forward(batch.batches[index])
                finally:
                    self.running = None
        loss = loss_of(output)
        if loss is None:
            raise ValueError(
                "DracoStrategy needs training_step to return a loss (a tensor, or a dict with 'loss') for every"
                f" partition; it returned {output!r} for partition {partition}."
            )
        if not self.graph_checked and uses_reentrant_checkpoint(loss):
            raise UnsupportedStepError(
                "DracoStrategy cannot train through reentrant activation checkpointing (torch.utils.checkpoint with"
                " use_reentrant=True, found in training_step's graph): each checkpointed segment runs a backward of"
                " its own, so a parameter's gradient would be ready, and exchanged, once per partition instead of"
                " once per step. Pass use_reentrant=False to torch.utils.checkpoint.checkpoint (or"
                " checkpoint_sequential)."
            )
        return output, loss

    def summed_step(self, batch: PartitionBatch, forward: Forward) -> Any:
        """The training step's output, its loss the summed partition losses (with the mean loss's value).

        For weights all 1 (the repetition code): one forward per partition, one backward of the sum.

        Every holder of the group runs the same graphs in the same order, so the replicas of the
        coded gradient are bitwise equal, whatever the precision.
        """
        self._begin()
        coded: Optional[Tensor] = None
        losses = []
        first: Any = None
        for index in range(len(batch.partitions)):
            output, loss = self._partition(batch, index, forward)
            first = output if index == 0 else first
            coded = loss if coded is None else coded + loss
            losses.append(loss.detach())
        self.scale = 1.0
        self.graph_checked = True
        # The value is the mean partition loss (what the progress bar shows); the gradient is the coded one.
        # The rest of the output is the first partition's, whose batch the batch hooks receive.
        mean = torch.stack(losses).mean()
        return with_loss(first, coded + (mean - coded).detach())

    def weighted_step(
        self,
        batch: PartitionBatch,
        forward: Forward,
        params: list[Tensor],
        no_sync: Callable[[], ContextManager],
        scale_loss: Callable[[Tensor], Tensor] = lambda loss: loss,
        accumulate: int = 1,
    ) -> Any:
        """Rank i's coded gradient ``sum_j W[i, j] g_j`` with every ``g_j`` computed as its other holders do.

        ``params``: the trained parameters; ``no_sync``: DDP's context that keeps a backward from
        syncing; ``scale_loss``: the precision plugin's loss scaling; ``accumulate``: Lightning's
        gradient accumulation factor (each backward sees the loss divided by it, as Lightning's does).

        A weight inside the backward (``sum_j W[i, j] loss_j``) would scale the upstream gradient
        inside reduced-precision kernels (bf16 autocast, TF32), so each holder's copy of ``g_j`` would
        round differently. Instead each partition gets its own unweighted backward, and the weights
        are applied afterwards, in the parameters' dtype (Horner's rule, dividing by ``w_last``), the
        partitions taken in increasing ``|w|`` (the repetition code's equal weights: in their order), so
        that no step scales the running sum up (a float16 row would overflow on one rank alone, honest):

        1. Partitions ``0 .. k-1`` (non-zero weights only) run forward under ``no_sync`` and backward
           with ``torch.autograd.grad`` into a side buffer ``S``: before adding ``g_k``, ``S`` is
           multiplied by ``w_{k-1} / w_k``; at the end by ``w_{k-1} / w_last``.
        2. The last partition's forward is synced; Lightning's closure zeroes the gradients (when it
           would), then ``add_side_gradients`` adds ``S`` to ``.grad`` and the last backward runs,
           which fires the exchange: ``.grad`` holds ``sum_j w_j g_j / w_last`` (plus earlier
           micro-batches' share).
        3. ``encoded`` multiplies the bucket by ``w_last`` before it leaves.

        Every backward sees Lightning's loss normalisation (gradient accumulation) and scaling.
        The partitions' graphs live one at a time, not all at once.
        """
        self._begin()
        held = horner_order([(index, weight) for index, weight in enumerate(self.weights) if weight != 0.0])
        last_weight = held[-1][1]
        lowest = min(index for index, _ in held)  # the rank's first partition: its output is the step's
        side: Optional[list[Optional[Tensor]]] = None
        losses: dict[int, Tensor] = {}
        previous = last_weight
        first: Any = None
        loss: Optional[Tensor] = None
        for position, (index, weight) in enumerate(held):
            if side is not None:
                _scale_grads(side, previous / weight)
            previous = weight
            if position == len(held) - 1:
                output, loss = self._partition(batch, index, forward)
            else:
                with no_sync():
                    output, loss = self._partition(batch, index, forward)
                inner = loss / accumulate if accumulate > 1 else loss
                grads = torch.autograd.grad(scale_loss(inner), params, allow_unused=True)
                side = _writable(list(grads) if side is None else [_add(s, g) for s, g in zip(side, grads)])
            first = output if index == lowest else first
            losses[index] = loss.detach()
        self._side = None if side is None else (params, side)
        self.scale = last_weight
        self.graph_checked = True
        mean = torch.stack([losses[i] for i in sorted(losses)]).mean()
        # The rest of the output is the first partition's (the batch hooks' batch), as in ``summed_step``.
        return with_loss(first, loss + (mean - loss).detach())


def uses_reentrant_checkpoint(loss: Tensor) -> bool:
    """Whether ``loss``'s autograd graph holds a reentrant activation checkpoint (a node whose backward
    recomputes its segment and runs a backward of its own)."""
    stack = [loss.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if getattr(node, "_forward_cls", None) is CheckpointFunction:
            return True
        stack.extend(child for child, _ in node.next_functions)
    return False


def encoded(hook: Callable, coded_step: CodedStep) -> Callable:
    """``hook`` on the bucket multiplied by ``coded_step.scale``: the coded step's last weight, applied
    as the gradient leaves (see ``CodedStep.weighted_step``)."""

    def encoded_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        if coded_step.scale != 1.0:
            bucket.set_buffer(bucket.buffer() * coded_step.scale)
        return hook(state, bucket)

    return encoded_hook


def _scale_grads(grads: list[Optional[Tensor]], factor: float) -> None:
    """Multiply every gradient by ``factor`` in place (None stays None: it means zero)."""
    present = [g for g in grads if g is not None]
    if factor != 1.0 and present:
        torch._foreach_mul_(present, factor)


def _writable(side: list[Optional[Tensor]]) -> list[Optional[Tensor]]:
    """The side buffer with every entry safe to scale and add to in place, once each. ``autograd.grad``
    can return an expanded tensor (``p.sum()``'s gradient: every element one memory location), which
    in-place ops refuse, and one tensor for two parameters (``f(a + b)``), which they would scale twice;
    such entries are copied, in the parameter's own layout where it has one."""
    seen: set[int] = set()
    for i, grad in enumerate(side):
        if grad is None:
            continue
        expanded = any(stride == 0 and size > 1 for stride, size in zip(grad.stride(), grad.shape))
        if expanded or grad.data_ptr() in seen:
            side[i] = grad = grad.clone()
        seen.add(grad.data_ptr())
    return side


def _add(total: Optional[Tensor], term: Optional[Tensor]) -> Optional[Tensor]:
    if term is None:
        return total
    return term if total is None else total.add_(term)


def loss_of(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, dict):
        return output.get("loss")
    return None


def with_loss(output: Any, loss: Tensor) -> Any:
    if isinstance(output, dict):
        return {**output, "loss": loss}
    return loss


def _buffer_slots(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """Every place a buffer is registered in ``module``: (submodule, name, qualified name)."""
    return [
        (sub, name, f"{prefix}.{name}" if prefix else name)
        for prefix, sub in module.named_modules()
        for name, buffer in sub._buffers.items()
        if buffer is not None
    ]


def _copies(values: list[Tensor]) -> list[Tensor]:
    """Detached copies; a tensor registered in two places gets one copy, registered in both."""
    copied: dict[int, Tensor] = {}
    with torch.no_grad():
        for value in values:
            if id(value) not in copied:
                copied[id(value)] = value.detach().clone()
    return [copied[id(value)] for value in values]


def _running_statistic(module: nn.Module, name: str) -> bool:
    """A training norm layer's running statistics: moved by its training forward, never read by it."""
    return isinstance(module, _NormBase) and module.training and name in ("running_mean", "running_var",
                                                                          "num_batches_tracked")


def _changed(before: Tensor, after: Optional[Tensor]) -> bool:
    if after is None or before.shape != after.shape or before.dtype != after.dtype:
        return True
    return not torch.equal(before, after.to(before.device))
