"""Exchange through a parameter server that decodes each step's whole gradient at once.

Robust rules such as Krum or the geometric median are defined on whole gradient vectors, not on
DDP's buckets: the PS gathers every bucket of the step, lays the step's vector out by parameter
(``WholeStepAssembly``) and decodes once, at the step's last bucket. It then holds ``P`` times
the model's gradient.
"""


import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco.exchange import collectives
from lightning_draco.exchange.ps import share_from_ps
from lightning_draco.exchange.state import ExchangeState
from lightning_draco.exchange.verdict import decode, record

__all__ = ["whole_step_hook"]


def whole_step_hook(state: ExchangeState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """Replace the all-reduce of one bucket; the step's buckets are decoded together at its last one.

    1. ``gather`` the bucket to the PS, into its place in the step's vector (arrival order), and
       note where its parameters belong in the layout.
    2. Return a pending future, unless this is the step's last bucket: then the PS decodes the
       whole step's vectors in layout order (the rule sees the same coordinate at the same place
       at every step), puts the result back in arrival order, and broadcasts every bucket and the
       outcome (as the per-bucket exchange does); every pending future completes.
    """
    setup, assembly = state.setup, state.assembly
    coded = bucket.buffer()
    index = state.next_bucket()
    start = assembly.offset
    received = None
    if setup.is_ps:
        received = assembly.received(setup.world_size, coded)[:, start : start + coded.numel()]
        assembly.place(bucket, start)
    collectives.gather(state, coded, received, dst=setup.ps_rank)
    assembly.offset += coded.numel()
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    assembly.pending.append((coded, future))
    if not bucket.is_last():
        return future

    verdict = None
    if setup.is_ps:
        order = assembly.order(coded.device)
        whole = assembly.received(setup.world_size, coded)[:, : assembly.offset].index_select(1, order)
        # Keyed by the step alone: the step's last bucket index changes when DDP rebuilds its buckets after a
        # process's first step, and a resumed fit's first step would then draw other randomness.
        secret = setup.projection_generator(state.outcome.step, 0, coded.device)
        verdict = decode(state, whole, index, trusted=setup.ps_rank, generator=secret)
        if verdict.mean is not None:
            verdict = verdict._replace(mean=torch.empty_like(verdict.mean).index_copy_(0, order, verdict.mean))
    buffers = [b for b, _ in assembly.pending]
    outcome, error = share_from_ps(state, buffers, verdict)
    record(state, outcome, error, index)
    for buffer, pending in assembly.pending:
        pending.set_result(buffer)
    assembly.reset()
    return future
