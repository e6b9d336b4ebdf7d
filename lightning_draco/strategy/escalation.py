"""Reactive mode, after the backward: recompute the groups whose replicas disagreed, vote, correct ``.grad``.

The exchange's reactive hook leaves the step's pending groups in ``state.outcome.pending``. Here,
on every rank, inside the same optimizer step:

1. a helper of a pending group (``ReactiveRepetitionCode.helpers``) loads the group's batches for
   this step by index (``DracoDataLoader.replay``), moves them as the group's members did, and
   computes the group's sum of partition gradients exactly as its members did: the same training
   step per partition under the same per-partition seeds, losses added in the same order, one
   backward (``torch.autograd.grad``, so DDP's hooks do not fire and ``.grad`` is untouched);
   honest copies are therefore bitwise equal to the members' honest ones. These forwards run on
   copies of the buffers the step began with (as the members' did: ``CodedStep.replaying``), the
   model's buffers and torchmetrics states are left as they were, and nothing is logged, so the
   model and its metrics are as if they never ran;
2. ``exchange.settle`` sends the copies to the decoder, which votes the ``2s+1`` copies and
   returns each pending bucket's corrected mean;
3. every rank writes the corrected mean into the ``.grad`` of the bucket's parameters, before the
   optimizer step (and before Lightning's gradient clipping, which runs inside that step).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_draco.codes.reactive import ReactiveRepetitionCode
from lightning_draco.data import DracoDataLoader, PartitionBatch
from lightning_draco.exchange import ExchangeState, settle
from lightning_draco.partition_logging import silenced_logging, unchanged_metrics
from lightning_draco.strategy.coded_step import CodedStep, loss_of

__all__ = ["Escalation"]

#: ``to_device(batch, partition, epoch, index)``: a loaded batch moved as the strategy moves a partition's.
ToDevice = Callable[[Any, int, int, int], Any]


class Escalation:
    """Recomputes pending groups on this rank when it is their helper, and applies the voted result.

    Counters (the first two are the same on every rank):

    - ``steps``: optimizer steps at which some group's replicas disagreed (or were forced);
    - ``groups``: group-steps recomputed and voted;
    - ``partitions``: partition forwards (and their share of a backward) this rank ran as a helper;
    - ``seconds``: this rank's wall time in the escalation, recomputing and exchanging.
    """

    def __init__(self, code: ReactiveRepetitionCode, coded_step: CodedStep, counts: Optional[dict] = None):
        self.code = code
        self.coded_step = coded_step
        coded_step.recomputed = True
        counts = counts or {}
        self.steps = int(counts.get("steps", 0))
        self.groups = int(counts.get("groups", 0))
        self.partitions = int(counts.get("partitions", 0))
        self.seconds = float(counts.get("seconds", 0.0))

    def run(
        self,
        state: ExchangeState,
        batch: PartitionBatch,
        loader: DracoDataLoader,
        to_device: ToDevice,
        forward: Callable[[Any], Any],
        module: nn.Module,
        params: list[Tensor],
        scale_loss: Callable[[Tensor], Tensor],
    ) -> None:
        """Settle the step's pending groups (every rank calls this after the backward; a no-op without them).

        ``forward``: the user's training step on one partition's batch (not through DDP); ``module``:
        the LightningModule (its buffers are left as they were); ``params``: the trained
        parameters; ``scale_loss``: the precision plugin's loss scaling, as the members' backward saw it.
        """
        pending = state.outcome.pending
        if not pending:
            return
        start = time.perf_counter()
        self.steps += 1
        self.groups += len(pending.escalated)

        def recompute(group: int, buckets: list[int]) -> dict[int, Tensor]:
            partitions = self.code.partitions(self.code.members(group)[0])
            epoch, step = batch.epoch, batch.index
            moved = [to_device(loader.replay(p, epoch, step), p, epoch, step) for p in partitions]
            grads = self._group_gradient(PartitionBatch(moved, partitions, batch.epoch, batch.index), forward, module,
                                         params, scale_loss)
            self.partitions += len(partitions)
            return {index: _flatten(grads, pending.layout[index]) for index in buckets}

        corrected = settle(state, recompute)
        for index, mean in corrected.items():
            _write_grads(pending.layout[index], mean)
        self.seconds += time.perf_counter() - start

    def _group_gradient(
        self,
        batch: PartitionBatch,
        forward: Callable[[Any], Any],
        module: nn.Module,
        params: list[Tensor],
        scale_loss: Callable[[Tensor], Tensor],
    ) -> dict[int, Tensor]:
        """The group's coded gradient by parameter (``id`` -> gradient), the model's buffers left as they were.

        Every partition's forward runs on copies of the buffers this rank's step began with (the PS's,
        copied to every rank after the last step), as it did on the group's members: the same graph
        from the same buffers, so the same bits, even for a forward that reads buffers it moves.
        """
        replaying = self.coded_step.replaying(module)
        with torch.enable_grad(), silenced_logging(module), unchanged_metrics(module), replaying:
            # The members' own path (CodedStep.summed_step).
            loss = loss_of(self.coded_step.summed_step(batch, forward))
            grads = torch.autograd.grad(scale_loss(loss), params, allow_unused=True)
        return {id(p): g for p, g in zip(params, grads) if g is not None}


def _flatten(grads: dict[int, Tensor], layout: list[Tensor]) -> Tensor:
    """The gradients of a bucket's parameters in its flat layout (a parameter without one: zeros, as DDP sends)."""
    return torch.cat([grads[id(p)].reshape(-1) if id(p) in grads else p.new_zeros(p.numel()) for p in layout])


def _write_grads(layout: list[Tensor], mean: Tensor) -> None:
    """Write a bucket's corrected mean into its parameters' ``.grad`` (a parameter DDP left without one keeps none)."""
    offset = 0
    with torch.no_grad():
        for param in layout:
            n = param.numel()
            if param.grad is not None:
                param.grad.copy_(mean[offset : offset + n].view_as(param.grad))
            offset += n
