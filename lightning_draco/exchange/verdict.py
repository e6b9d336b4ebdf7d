"""A decode's verdict: the decoded total, the outcome every rank must learn, and how ranks record it.

The outcome of a bucket travels as one small integer vector: entry 0 is a ``DecodeStatus``,
entry ``1 + r`` a flag for rank ``r`` (honest, caught, or suspected in a failed decode).
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from lightning_draco.codes import Code, DecodeResult, DracoDecodeError
from lightning_draco.exchange.state import ExchangeState

__all__ = ["DecodeStatus", "Verdict", "decode", "judge", "record"]


class DecodeStatus:
    """What a bucket's decode came to (first entry of the outcome vector)."""

    OK = 0
    FAILED = 1  # the vectors reveal more liars than the code tolerates
    NONFINITE = 2  # the honest vectors agree on a gradient with NaN or Inf in it


# Per-rank flags in the outcome vector.
HONEST, CAUGHT, SUSPECT = 0, 1, 2


class Verdict(NamedTuple):
    """A decoder's result for one bucket (or one shard)."""

    #: The decoded sum divided by ``P`` (the mean), or ``None`` when the decode failed.
    mean: Optional[Tensor]
    #: ``1 + P`` int32 entries: status, then one flag per rank.
    outcome: Tensor
    #: The failed decode's error, to be raised in the decoder's own words on every rank.
    error: Optional[DracoDecodeError]


def decode(
    state: ExchangeState,
    received: Tensor,
    bucket: int,
    trusted: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Verdict:
    """Decode ``received`` (``(P, n)``) with the run's code and judge the result.

    ``trusted``: a rank that never lies (the PS); a verdict that blames it, or more than ``s``
    ranks, is a failed decode (``check_verdict``). ``generator``: the decoder's secret randomness.
    """
    return judge(state, lambda: state.setup.code.decode(received, generator=generator), received.device, trusted)


def judge(
    state: ExchangeState, run: Callable[[], DecodeResult], device: torch.device, trusted: Optional[int] = None
) -> Verdict:
    """The verdict on ``run()``, a decode (timed as decoding): its mean, or the failure it raised or
    that its faulty ranks reveal (``check_verdict``), with the outcome every rank must learn."""
    setup = state.setup
    world = setup.world_size
    outcome = torch.zeros(1 + world, dtype=torch.int32, device=device)
    start = time.perf_counter()
    try:
        result = run()
        check_verdict(setup.code, result.faulty, trusted)
    except DracoDecodeError as error:
        outcome[0] = DecodeStatus.FAILED
        outcome[1 + torch.tensor(error.suspects, dtype=torch.long)] = SUSPECT
        return Verdict(None, outcome, error)
    finally:
        state.stats.seconds["decode"] += time.perf_counter() - start
    mean = result.total.div_(world)
    if result.faulty:
        outcome[1 + torch.tensor(result.faulty, dtype=torch.long)] = CAUGHT
    if setup.check_finite and not bool(torch.isfinite(mean).all()):
        outcome[0] = DecodeStatus.NONFINITE
    return Verdict(mean, outcome, None)


def record(state: ExchangeState, outcome: Tensor, error: Optional[DracoDecodeError], bucket: int) -> None:
    """Add a bucket's agreed outcome to the step's: who was caught, a failure, a non-finite gradient.

    A step with a failed bucket names nobody: its failure shows more than ``s`` liars, and then another
    bucket's vote may have been won by colluders, naming the honest member they outvoted."""
    flags = outcome.tolist()
    step = state.outcome
    if flags[0] == DecodeStatus.FAILED and step.failure is None:
        step.failure = error.at(step.step, bucket)
    elif flags[0] == DecodeStatus.NONFINITE:
        step.nonfinite = True
    if step.failure is not None:
        step.caught.clear()
    else:
        step.caught.update(r for r, flag in enumerate(flags[1:]) if flag == CAUGHT)


def check_verdict(code: Code, faulty: list[int], trusted: Optional[int]) -> None:
    """Raise ``DracoDecodeError`` for a verdict that at most ``s`` liars cannot produce.

    With more than ``s`` liars a code can be outvoted: ``s + 1`` colluders in the trusted rank's
    group win the vote and name it as the liar, or a decode names more than ``s`` ranks. Its sum
    is then not known to be the honest one, so it must be neither applied nor reported.
    """
    s = code.num_adversaries
    blamed = sorted(set(faulty))
    if trusted is not None and trusted in blamed:
        outvoters = sorted(sharing_a_partition(code, [trusted]) - {trusted} - set(blamed))
        raise DracoDecodeError(
            f"the decode names the parameter server (rank {trusted}), which is trusted, as faulty: ranks"
            f" {outvoters} outvoted it, so more than s={s} ranks lied; the decoded gradient is not applied.",
            outvoters,
        )
    if len(blamed) > s:
        suspects = sorted(sharing_a_partition(code, blamed) - {trusted})
        raise DracoDecodeError(
            f"the decode names {len(blamed)} ranks {blamed} as faulty, more than s={s}: more than s ranks lied and"
            " the vote cannot be trusted; the decoded gradient is not applied.",
            suspects,
        )


def sharing_a_partition(code: Code, ranks: list[int]) -> set[int]:
    """The ranks that compute at least one partition that one of ``ranks`` computes."""
    held = {p for rank in ranks for p in code.partitions(rank)}
    return {w for w in range(code.num_workers) if held.intersection(code.partitions(w))}
