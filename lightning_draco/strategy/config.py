"""``DracoConfig``: the strategy's arguments, checked once, and the code they build."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Optional, Union

from lightning_draco.adversary import Adversary
from lightning_draco.aggregators import Aggregator, make_aggregator, with_pre_aggregators
from lightning_draco.aggregators.coded import AggregatedCode
from lightning_draco.codes import Code, code_class, make_code
from lightning_draco.codes.reactive import ReactiveRepetitionCode

__all__ = ["DracoConfig"]

FAILURE_MODES = ("raise", "skip")
AGGREGATE_OVER = ("whole", "bucket")
DECODE_MODES = ("ps", "sharded")
REDUNDANCY_MODES = ("full", "reactive")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class DracoConfig:
    """What ``DracoStrategy`` was asked for (see its docstring), checked on construction.

    ``validate(world_size)`` adds the checks that need the world size; ``build_code`` makes the
    code (with the aggregator on top, if any). Nothing here starts a process or a collective.
    """

    code: str = "frc"
    num_adversaries: int = 1
    redundancy: Optional[int] = None
    ps_rank: int = 0
    adversary: Optional[Adversary] = None
    tolerance: Optional[float] = None
    on_decode_failure: str = "raise"
    max_faulty_steps: Optional[int] = None
    seed: Optional[int] = None
    projection_secret: Optional[int] = None
    check_finite: Optional[bool] = None
    broadcast_buffers: bool = True
    aggregator: Optional[Aggregator] = None
    aggregate_over: str = "whole"
    timeout: Optional[timedelta] = None
    startup_timeout: Optional[timedelta] = None
    decode: str = "ps"
    overlap: bool = False
    redundancy_mode: str = "full"
    quarantine_after: Optional[int] = None

    @classmethod
    def from_arguments(
        cls,
        *,
        aggregator: Union[str, Aggregator, None] = None,
        aggregator_options: Optional[dict] = None,
        pre_aggregators: Optional[list] = None,
        adversary: Union[Adversary, dict, None] = None,
        timeout: Union[timedelta, float, None] = None,
        startup_timeout: Union[timedelta, float, None] = None,
        redundancy: Optional[int] = None,
        **fields: Any,
    ) -> "DracoConfig":
        """Normalise the forms the strategy accepts (names, dicts, seconds) into a checked config."""
        code_cls = code_class(fields.get("code", cls.code))
        if fields.get("redundancy_mode") == "reactive" and fields.get("code", cls.code) == "frc":
            code_cls = ReactiveRepetitionCode
        num_adversaries = fields.get("num_adversaries", cls.num_adversaries)
        if redundancy is None:
            redundancy = code_cls.default_redundancy(num_adversaries) if _is_int(num_adversaries) else 1
        if aggregator_options and not isinstance(aggregator, str):
            raise ValueError(
                f"aggregator_options apply to an aggregator given by name (got aggregator={aggregator!r}): name the"
                " rule, or pass the options to the Aggregator you built."
            )
        if isinstance(aggregator, str):
            options = dict(aggregator_options or {})
            aggregator = make_aggregator(aggregator, options.pop("num_byzantine", num_adversaries), **options)
        if pre_aggregators:
            if not isinstance(aggregator, Aggregator):
                raise ValueError(f"pre_aggregators need an aggregator to feed (got aggregator={aggregator!r}).")
            aggregator = with_pre_aggregators(aggregator, pre_aggregators)
        if isinstance(adversary, dict):
            adversary = Adversary(**adversary)
        return cls(
            aggregator=aggregator,
            adversary=adversary,
            timeout=_seconds("timeout", timeout),
            startup_timeout=_seconds("startup_timeout", startup_timeout),
            redundancy=redundancy,
            **fields,
        )

    def __post_init__(self) -> None:
        code_cls = code_class(self.code)
        if self.redundancy_mode not in REDUNDANCY_MODES:
            raise ValueError(
                f"redundancy_mode must be one of {', '.join(REDUNDANCY_MODES)} (got {self.redundancy_mode!r})."
            )
        if self.reactive:
            self._check_reactive()
            code_cls = ReactiveRepetitionCode
        elif self.quarantine_after is not None:
            raise ValueError(
                "quarantine_after has no effect with redundancy_mode='full': every group is already voted at every"
                " step; use redundancy_mode='reactive'."
            )
        code_cls.check(self.num_adversaries, self.redundancy)
        if not _is_int(self.ps_rank) or self.ps_rank < 0:
            raise ValueError(f"ps_rank must be an integer >= 0 (got {self.ps_rank!r}).")
        if self.tolerance is not None and not (isinstance(self.tolerance, (int, float)) and 0 <= self.tolerance < 1):
            raise ValueError(f"tolerance must be None or a number in [0, 1) (got {self.tolerance!r}).")
        if self.tolerance is not None and "tolerance" not in code_cls.options:
            raise ValueError(f"tolerance has no effect with code={self.code!r}: only codes that vote or fit take it.")
        if self.on_decode_failure not in FAILURE_MODES:
            raise ValueError(
                f"on_decode_failure must be one of {', '.join(FAILURE_MODES)} (got {self.on_decode_failure!r})."
            )
        if self.max_faulty_steps is not None and (not _is_int(self.max_faulty_steps) or self.max_faulty_steps < 0):
            raise ValueError(f"max_faulty_steps must be None or an integer >= 0 (got {self.max_faulty_steps!r}).")
        if self.aggregate_over not in AGGREGATE_OVER:
            raise ValueError(f"aggregate_over must be one of {', '.join(AGGREGATE_OVER)} (got {self.aggregate_over!r}).")
        if self.decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)} (got {self.decode!r}).")
        if not isinstance(self.overlap, bool):
            raise ValueError(f"overlap must be True or False (got {self.overlap!r}).")
        if self.decode == "sharded" and not code_cls.shardable:
            raise ValueError(
                f"code={self.code!r} cannot decode sharded: its decode draws projections from the parameter server's"
                " secret, which no other rank may hold; use decode='ps', or code='frc'."
            )
        if self.decode == "sharded" and self.tolerance:
            raise ValueError(
                f"decode='sharded' needs tolerance None or 0 (got {self.tolerance!r}): its decoders' copies are voted"
                " bit for bit, and a liar within the tolerance that sends each decoder another vector makes honest"
                " decoders' copies differ, so an honest decoder is outvoted and named; use decode='ps'."
            )
        if self.decode == "sharded" and self.aggregator is not None:
            raise ValueError(
                "decode='sharded' cannot run an aggregator: robust rules need whole vectors on one rank; use"
                " decode='ps'."
            )
        if self.aggregator is not None and not isinstance(self.aggregator, Aggregator):
            raise ValueError(f"aggregator must be a rule's name, an Aggregator or None (got {self.aggregator!r}).")
        if self.aggregator is not None and not code_cls.supports_aggregation:
            raise ValueError(
                f"code={self.code!r} cannot be combined with an aggregator: use code='none' (robust aggregation) or"
                " code='frc' (DETOX: a vote inside groups, then the rule across groups)."
            )
        if self.adversary is not None and not isinstance(self.adversary, Adversary):
            raise ValueError(
                f"adversary must be an Adversary, a dict of its arguments or None (got {self.adversary!r})."
            )

    def _check_reactive(self) -> None:
        """What ``redundancy_mode="reactive"`` cannot be combined with, each refused in one sentence."""
        if self.code != "frc":
            raise ValueError(
                f"redundancy_mode='reactive' needs code='frc' (got code={self.code!r}): only the repetition code's"
                " replicas are bitwise copies of one value, which s+1 of them can confirm without a vote."
            )
        if self.aggregator is not None:
            raise ValueError(
                "redundancy_mode='reactive' cannot run an aggregator: a robust rule needs every group's value at"
                " every step, and reactive mode computes a group's 2s+1 copies only when its replicas disagree;"
                " use redundancy_mode='full'."
            )
        if self.quarantine_after is not None and (not _is_int(self.quarantine_after) or self.quarantine_after < 0):
            raise ValueError(f"quarantine_after must be None or an integer >= 0 (got {self.quarantine_after!r}).")

    # -- derived ------------------------------------------------------------------------------
    @property
    def reactive(self) -> bool:
        """Whether groups of ``s+1`` detect lies and only disagreeing groups are recomputed (``redundancy_mode``)."""
        return self.redundancy_mode == "reactive"

    @property
    def finite_check(self) -> bool:
        """Whether a decoded NaN/Inf fails the step: on, except for plain averaging (``code="none"``
        without a rule), which behaves as DDP does."""
        if self.check_finite is not None:
            return self.check_finite
        return self.code != "none" or self.aggregator is not None

    @property
    def whole_step(self) -> bool:
        """Whether the PS decodes each step's whole gradient (rules such as Krum are defined on whole vectors)."""
        return self.aggregator is not None and self.aggregate_over == "whole"

    @property
    def trusted_rank(self) -> Optional[int]:
        """The rank that never lies: the parameter server (``ps_rank``), or ``None`` with ``decode="sharded"``,
        where every shard is decoded by ``2s + 1`` ranks and any rank, ``ps_rank`` included, may lie."""
        return None if self.decode == "sharded" else self.ps_rank

    def adversary_warnings(self) -> list[str]:
        """Warnings for a simulated adversary beyond what the code tolerates (raises for impossible ones)."""
        if self.adversary is None:
            return []
        warnings = self.adversary.check(None, self.trusted_rank, self.num_adversaries)
        planned = self.adversary.planned(self.num_adversaries)
        rule = self.aggregator
        # Over the workers' own vectors only: after the repetition code's vote (DETOX) a rule sees group
        # results, where f = 0 can be right.
        if rule is not None and self.code == "none" and rule.num_byzantine < planned <= self.num_adversaries:
            warnings.append(
                f"{planned} simulated adversaries exceed aggregator {rule.name!r}'s num_byzantine={rule.num_byzantine}:"
                " the rule is set to tolerate fewer liars than the run has."
            )
        return warnings

    def validate(self, world_size: int) -> None:
        """The checks that need the world size, other than the code's own (``build_code`` runs those)."""
        if self.ps_rank >= world_size:
            raise ValueError(
                f"ps_rank must be in [0, {world_size}) for a world of {world_size} ranks (got {self.ps_rank})."
            )
        if self.adversary is not None:
            self.adversary.check(world_size, self.trusted_rank, self.num_adversaries)

    def build_code(self, world_size: int) -> Code:
        """The code for ``world_size`` ranks (checked by its constructor first: the world size must suit
        the code before ranks are placed in it), then ``validate(world_size)``, then the aggregator on top."""
        options = {} if self.tolerance is None else {"tolerance": float(self.tolerance)}
        if self.reactive:
            # Sharded: each shard's decoders must detect alike; a floor learned from their own votes would differ.
            code = ReactiveRepetitionCode(
                world_size, self.num_adversaries, self.redundancy, learn_floor=self.decode == "ps", **options
            )
        else:
            code = make_code(self.code, world_size, self.num_adversaries, self.redundancy, **options)
        self.validate(world_size)
        return code if self.aggregator is None else AggregatedCode(code, self.aggregator)

    def resume_conditions(self, world_size: int) -> dict[str, Any]:
        """What a checkpoint records and a resume must match: the partitions mean the same data."""
        conditions = {
            "world_size": world_size,
            "code": self.code,
            "num_adversaries": self.num_adversaries,
            "redundancy": self.redundancy,
        }
        if self.reactive:  # only then: checkpoints written before the mode existed stay resumable
            conditions["redundancy_mode"] = self.redundancy_mode
        return conditions


def _seconds(name: str, value: Union[timedelta, float, None]) -> Optional[timedelta]:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return timedelta(seconds=value)
    if not isinstance(value, timedelta) or value.total_seconds() <= 0:
        raise ValueError(f"{name} must be a positive number of seconds or a timedelta (got {value!r}).")
    return value
