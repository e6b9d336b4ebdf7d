"""Simulated Byzantine workers: which ranks lie at a step, and what they send."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
from torch import Tensor

from lightning_draco._seeding import generator
from lightning_draco.attacks import (
    OMNISCIENT_KEYS, Attack, acts_on_batch, call_attack, check_options, check_options_in_world, get_attack,
    wants,
)

__all__ = ["Adversary", "ROLES"]

#: What a liar can lie about: the coded gradient it sends, and (sharded decoding) the shards it decodes.
ROLES = ("gradient", "decoder")


class Adversary:
    """Byzantine workers for research and tests: on the chosen ranks the outgoing coded gradient is replaced.

    Args:
        ranks: the lying ranks, fixed for the whole run, or ``"random"``: a fresh set of
            ``count`` ranks every step, drawn reproducibly from ``seed`` and the step.
        attack: the name of a built-in attack (``reverse``, ``constant``, ``gaussian``,
            ``sign_flip``, ``bit_flip``, ``nan``, ``inf``, ``sparse``, ``collude``, the omniscient
            ``alie``, ``ipm``, ``optimal_alie``, ``optimal_ipm`` and ``mimic``, and
            ``label_flip``, which poisons the liar's batch instead) or a callable
            ``attack(honest, **context) -> Tensor`` (see ``lightning_draco.attacks``).
        seed: seeds the random choice of ranks and the attacks' random streams.
        count: how many ranks lie per step with ``ranks="random"``; defaults to the
            strategy's ``num_adversaries``.
        roles: where the liars lie: ``"gradient"`` (the coded gradient they send) and, with
            sharded decoding, ``"decoder"`` (the decoded shards they pass on, the same attack
            applied to them). Default: both.
        **options: keyword options of the attack (``scale=``, ``sigma=``, ``num_flips=`` ...).

    The parameter server is trusted: it never lies, and naming it is an error. Without one
    (``decode="sharded"``, where no rank is trusted) every rank may lie, rank 0 included.
    """

    def __init__(
        self,
        ranks: Union[Sequence[int], str] = (),
        attack: Union[str, Attack] = "reverse",
        seed: int = 0,
        count: Optional[int] = None,
        roles: Sequence[str] = ROLES,
        **options: Any,
    ):
        if isinstance(ranks, str):
            if ranks != "random":
                raise ValueError(f'adversary ranks must be a list of ranks or "random" (got {ranks!r}).')
            self.ranks: Union[tuple[int, ...], str] = "random"
        else:
            ranks = tuple(ranks)
            if any(not isinstance(r, int) or isinstance(r, bool) or r < 0 for r in ranks):
                raise ValueError(f"adversary ranks must be non-negative integers (got {list(ranks)}).")
            if len(set(ranks)) != len(ranks):
                raise ValueError(f"adversary ranks must be distinct (got {list(ranks)}).")
            self.ranks = tuple(sorted(ranks))
        roles = (roles,) if isinstance(roles, str) else tuple(roles)
        if not roles or any(role not in ROLES for role in roles):
            raise ValueError(f"adversary roles must be a non-empty subset of {', '.join(ROLES)} (got {list(roles)}).")
        self.roles = roles
        if count is not None and (not isinstance(count, int) or count < 0):
            raise ValueError(f"adversary count must be an integer >= 0 (got {count!r}).")
        if count is not None and self.ranks != "random":
            raise ValueError(
                f"adversary count applies to ranks='random' (got ranks={list(self.ranks)}, count={count}): fixed"
                " ranks lie all of them; drop count, or draw the liars with ranks='random'."
            )
        self.attack_fn: Attack = get_attack(attack) if isinstance(attack, str) else attack
        if not callable(self.attack_fn):
            raise ValueError(f"attack must be the name of a built-in attack or a callable (got {attack!r}).")
        self.attack_name = attack if isinstance(attack, str) else getattr(attack, "__name__", repr(attack))
        check_options(self.attack_fn, self.attack_name, options)
        self.seed = int(seed)
        self.count = count
        self.options = options

    @property
    def omniscient(self) -> bool:
        """Whether the attack needs the honest vectors' statistics (an extra collective per bucket)."""
        return any(wants(self.attack_fn, key) for key in OMNISCIENT_KEYS)

    def wants(self, key: str) -> bool:
        """Whether the attack asks for the context keyword ``key``."""
        return wants(self.attack_fn, key)

    @property
    def acts_on_batch(self) -> bool:
        """Whether the attack poisons the liar's batch (``poison``) rather than replacing its gradient."""
        return acts_on_batch(self.attack_fn)

    def poison(self, batch: Any, *, rank: int, step: int) -> Any:
        """What ``rank`` trains on instead of ``batch`` at this step, for an attack on data."""
        context = {"rank": rank, "step": step, "generator": generator(self.seed, step, -1, rank)}
        return call_attack(self.attack_fn, batch, self.options, context)

    @property
    def is_random(self) -> bool:
        return self.ranks == "random"

    def check(self, world_size: Optional[int], ps_rank: Optional[int], num_adversaries: int) -> list[str]:
        """Raise ``ValueError`` for ranks that cannot lie; return warnings for a guarantee that no longer holds.

        ``ps_rank``: the trusted rank, which never lies; ``None`` where no rank is trusted (sharded decoding).
        """
        warnings = []
        if not self.is_random:
            if ps_rank is not None and ps_rank in self.ranks:
                raise ValueError(
                    f"adversary ranks must not include ps_rank={ps_rank}: the parameter server is trusted."
                )
            if world_size is not None and any(r >= world_size for r in self.ranks):
                raise ValueError(
                    f"adversary ranks must be in [0, {world_size}) for a world of {world_size} ranks"
                    f" (got {list(self.ranks)})."
                )
        if world_size is not None:
            liars = frozenset(() if self.is_random else self.ranks)
            check_options_in_world(self.attack_fn, self.attack_name, self.options, world_size, liars)
        planned = self.planned(num_adversaries)
        if self.is_random and world_size is not None:
            if ps_rank is not None and planned > world_size - 1:
                raise ValueError(
                    f"adversary count must be at most world_size - 1 = {world_size - 1}: the parameter server"
                    f" never lies (got {planned})."
                )
            if planned > world_size:
                raise ValueError(f"adversary count must be at most world_size = {world_size} (got {planned}).")
        if planned == 0:
            drawn = (f"ranks='random' draws count={planned} ranks per step (count defaults to num_adversaries)"
                     if self.is_random else "ranks=[] names no rank")
            warnings.append(
                f"the simulated adversary lies nowhere: {drawn}. Set ranks, or count, to the liars the run should face."
            )
        if planned > num_adversaries:
            warnings.append(
                f"{planned} simulated adversaries exceed num_adversaries={num_adversaries}: DRACO's guarantee"
                " no longer holds, and decodes may fail or, when liars collude, go wrong unnoticed."
            )
        return warnings

    def planned(self, num_adversaries: int) -> int:
        """How many ranks lie at each step."""
        if not self.is_random:
            return len(self.ranks)
        return num_adversaries if self.count is None else self.count

    def lying_ranks(self, step: int, world_size: int, ps_rank: Optional[int], num_adversaries: int) -> frozenset[int]:
        """The ranks that lie at ``step``; the same answer on every process.

        A random draw never picks ``ps_rank`` (the trusted rank); ``None``: every rank may be drawn.
        """
        if not self.is_random:
            return frozenset(self.ranks)
        count = num_adversaries if self.count is None else self.count
        candidates = torch.tensor([r for r in range(world_size) if r != ps_rank])  # every rank if None
        order = torch.randperm(len(candidates), generator=generator(self.seed, step, 0x5EED))
        return frozenset(int(r) for r in candidates[order[:count]])

    def corrupt(self, honest: Tensor, *, rank: int, step: int, bucket: int, **knowledge: Tensor) -> Tensor:
        """What ``rank`` sends instead of ``honest`` at this step and bucket (``knowledge``: honest statistics)."""
        if self.acts_on_batch:  # the liar already computed on its poisoned batch
            return honest
        device = honest.device
        context = {
            **knowledge,
            "rank": rank,
            "step": step,
            "bucket": bucket,
            "generator": generator(self.seed, step, bucket, rank, device=device),
            "shared_generator": generator(self.seed, step, bucket, -1, device=device),
        }
        sent = call_attack(self.attack_fn, honest, self.options, context)
        if not isinstance(sent, Tensor) or sent.shape != honest.shape:
            raise ValueError(
                f"attack {self.attack_name!r} must return a tensor of shape {tuple(honest.shape)}"
                f" (got {type(sent).__name__} {getattr(sent, 'shape', '')})."
            )
        return sent.to(dtype=honest.dtype, device=honest.device)

    def __repr__(self) -> str:
        ranks = '"random"' if self.is_random else list(self.ranks)
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        roles = "" if self.roles == ROLES else f", roles={list(self.roles)}"
        return f"Adversary(ranks={ranks}, attack={self.attack_name!r}, seed={self.seed}{roles}{opts})"
