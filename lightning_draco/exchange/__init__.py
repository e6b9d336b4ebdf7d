"""How ranks exchange coded gradients: DDP comm hooks, one module per way of exchanging a step.

- ``ps``: gather to the parameter server, decode, broadcast (per bucket; the paper's design);
- ``whole_step``: the same, decoding each step's whole gradient at once (rules on whole vectors);
- ``sharded``: no parameter server: each shard decoded by 2s+1 ranks, the copies voted;
- ``adversarial``: a wrapper that makes simulated liars lie through any of them;
- ``overlap``: a wrapper that runs any of them on a communication thread.

Every hook is ``hook(state: ExchangeState, bucket: GradBucket) -> Future[Tensor]``.
"""

from lightning_draco.exchange.adversarial import adversarial
from lightning_draco.exchange.collectives import CollectiveFailedError
from lightning_draco.exchange.overlap import overlapped
from lightning_draco.exchange.ps import ps_hook
from lightning_draco.exchange.reactive import reactive_ps_hook, reactive_sharded_hook, settle
from lightning_draco.exchange.sharded import sharded_hook
from lightning_draco.exchange.state import (
    ExchangeSetup,
    ExchangeState,
    ExchangeStats,
    PendingGroups,
    StepOutcome,
    WholeStepAssembly,
)
from lightning_draco.exchange.verdict import DecodeStatus
from lightning_draco.exchange.whole_step import whole_step_hook

__all__ = [
    "CollectiveFailedError",
    "DecodeStatus",
    "ExchangeSetup",
    "ExchangeState",
    "ExchangeStats",
    "PendingGroups",
    "StepOutcome",
    "WholeStepAssembly",
    "adversarial",
    "overlapped",
    "ps_hook",
    "reactive_ps_hook",
    "reactive_sharded_hook",
    "settle",
    "sharded_hook",
    "whole_step_hook",
]
