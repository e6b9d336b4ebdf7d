"""Simulated Byzantine ranks: a wrapper that makes the chosen ranks lie through any exchange hook.

Like torch's compression wrappers, ``adversarial(hook, adversary)`` returns a hook that replaces
the bucket's buffer before the exchange sees it; the exchange itself has no notion of liars, so
the production path is the one the simulation tests.
"""


from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_draco._seeding import generator
from lightning_draco.adversary import Adversary
from lightning_draco.codes import DracoDecodeError
from lightning_draco.codes.base import accumulation_dtype
from lightning_draco.exchange import collectives
from lightning_draco.exchange.state import ExchangeState

__all__ = ["adversarial", "liars_at"]

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future]


def liars_at(adversary: Adversary, state: ExchangeState, step: Optional[int] = None) -> frozenset[int]:
    """The ranks that lie at ``step`` (default: the state's current step), the same on every rank."""
    setup = state.setup
    step = state.outcome.step if step is None else step
    return adversary.lying_ranks(step, setup.world_size, setup.ps_rank, setup.code.num_adversaries)


def adversarial(hook: Hook, adversary: Adversary) -> Hook:
    """``hook`` with this step's liars sending what ``adversary``'s attack makes of their coded bucket.

    1. An omniscient attack first learns the honest vectors (or their mean and spread) through
       collectives every rank takes part in: a simulation cost, timed as communication.
    2. On a liar lying about its gradient, the bucket's buffer is replaced by the attack's vector.
    3. On a liar lying as a decoder (sharded decoding), ``state.corrupt_decoded`` applies the
       attack to the decoded shards it passes on; on a liar lying about its gradient, in reactive
       mode, ``state.corrupt_recomputed`` applies it to the group sums it recomputes for others.
    4. ``hook`` exchanges the bucket as on any rank.
    """

    def adversarial_hook(state: ExchangeState, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        honest = bucket.buffer()
        index = state.outcome.buckets  # the index the exchange is about to give this bucket
        knowledge = _learn_honest(state, adversary, honest) if adversary.omniscient else {}
        liars = liars_at(adversary, state)
        rank, step = state.setup.rank, state.outcome.step
        lying = rank in liars
        if lying and "gradient" in adversary.roles:
            knowledge["liars"] = tuple(sorted(liars))
            knowledge["defence"] = lambda received: simulated_defence(state, adversary, received, index)
            bucket.set_buffer(adversary.corrupt(honest, rank=rank, step=step, bucket=index, **knowledge))
        state.corrupt_decoded = state.corrupt_recomputed = None
        if lying and "gradient" in adversary.roles:
            # Reactive mode: the sum it recomputes for a group whose replicas disagreed is a gradient too.
            state.corrupt_recomputed = lambda value, index: adversary.corrupt(
                value, rank=rank, step=step, bucket=index, **_decoder_knowledge(state, value, liars)
            )
        if lying and "decoder" in adversary.roles:
            state.corrupt_decoded = lambda decoded, index: adversary.corrupt(
                decoded, rank=rank, step=step, bucket=index, **_decoder_knowledge(state, decoded, liars)
            )
        return hook(state, bucket)

    return adversarial_hook


def _decoder_knowledge(state: ExchangeState, decoded: Tensor, liars: frozenset[int]) -> dict:
    """What a lying decoder (or recomputing helper) knows: the true values (it computed them) and who lies with it."""
    world = state.setup.world_size
    return {
        "honest_mean": decoded,
        "honest_std": torch.zeros_like(decoded),
        "honest_vectors": decoded.expand(world, -1),
        "liars": tuple(sorted(liars)),
        "defence": lambda received: received.mean(0),
    }


def _learn_honest(state: ExchangeState, adversary: Adversary, honest: Tensor) -> dict[str, Tensor]:
    """The honest vectors' per-coordinate mean and std (or all of them), known to every rank."""
    setup = state.setup
    honest = honest.detach()
    if adversary.wants("honest_vectors"):
        gathered = [torch.empty_like(honest) for _ in range(setup.world_size)]
        with collectives.timed(state, "all-gather (simulated omniscient liars)"):
            dist.all_gather(gathered, honest, group=setup.process_group)
        vectors = torch.stack(gathered)
        knowledge = {"honest_vectors": vectors}
        if adversary.wants("honest_mean") or adversary.wants("honest_std"):
            wide = vectors.to(accumulation_dtype(vectors.dtype))
            knowledge.update(honest_mean=wide.mean(dim=0), honest_std=wide.std(dim=0, unbiased=False))
    else:
        # The mean, then the squares about it: E[x^2] - mean^2 cancels to 0 in bfloat16 (and loses most
        # digits in float32) wherever the spread is small next to the mean. Half precision sums in float32.
        wide = accumulation_dtype(honest.dtype)
        total = honest.to(wide, copy=True)
        with collectives.timed(state, "all-reduce (simulated omniscient liars)"):
            dist.all_reduce(total, group=setup.process_group)
        mean = total / setup.world_size
        squares = (honest.to(wide) - mean).square_()
        with collectives.timed(state, "all-reduce (simulated omniscient liars)"):
            dist.all_reduce(squares, group=setup.process_group)
        knowledge = {"honest_mean": mean, "honest_std": (squares / setup.world_size).sqrt_()}
    return knowledge


def simulated_defence(state: ExchangeState, adversary: Adversary, received: Tensor, index: int) -> Optional[Tensor]:
    """The PS's result for ``received`` as a liar can compute it: its own copy of the code and rule,
    its own randomness in place of the PS's secret, the rule's state restored after (None: the
    decode fails). With whole-step aggregation this runs on one bucket: a proxy for the whole step."""
    code = state.setup.code
    rule = getattr(code, "aggregator", None)
    saved = rule.state_dict() if rule is not None else None
    try:
        gen = generator(adversary.seed, state.outcome.step, index, -2, device=received.device)
        return code.decode(received, generator=gen).total / state.setup.world_size
    except DracoDecodeError:
        return None
    finally:
        if rule is not None:
            rule.load_state_dict(saved)
