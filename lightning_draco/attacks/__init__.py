"""Attacks: what a Byzantine worker sends instead of its honest coded gradient.

An attack is a function ``attack(honest, **context) -> Tensor`` that must not modify
``honest``. The context holds what a simulated adversary may know: ``rank``, ``step``,
``bucket``, ``generator`` (its own random stream for this step and bucket),
``shared_generator`` (one stream shared by all colluding adversaries), and for omniscient
attacks ``honest_mean`` and ``honest_std`` (per coordinate, over all workers' honest vectors;
asking for them makes every rank pay an extra collective), or ``honest_vectors`` (every
worker's honest vector, ``(P, d)``: an all-gather), ``liars`` (the ranks lying at this step) and
``defence`` (``defence(received) -> the PS's result or None``, the PS's decode with its rule,
run without side effects: adaptive attacks search against it). An attack declares
the context keywords it needs; the rest are not passed. Its own options (``scale``,
``sigma``, ...) are keyword arguments with defaults.

Each module of this package registers its attacks with ``@register_attack``; importing the
package imports every module, so a new attack is one file (plus its config and tests).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional

from torch import Tensor

from lightning_draco._registry import Registry, import_submodules

Attack = Callable[..., Tensor]

ATTACKS: Registry[Attack] = Registry("an attack", "attack", alternatives=", or a callable")

# Context that costs a collective to simulate: statistics of, or all of, every worker's honest vector.
OMNISCIENT_KEYS = ("honest_mean", "honest_std", "honest_vectors")
#: Every context keyword an attack may ask for (the module docstring says what each holds).
CONTEXT_KEYS = ("rank", "step", "bucket", "generator", "shared_generator", *OMNISCIENT_KEYS, "liars", "defence")


class Rule(NamedTuple):
    """What an option's value must be: ``holds(value)``, said as ``text`` ("an integer >= 1"); and, for a
    value that names ranks, ``in_world(value, world_size, liars)``: what it must be in that world, or
    None where it fits (``liars``: the fixed lying ranks, empty where they are drawn each step)."""

    holds: Callable[[Any], bool]
    text: str
    in_world: Optional[Callable[[Any, int, frozenset], Optional[str]]] = None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def at_least(low: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}")


def positive() -> Rule:
    return Rule(lambda v: _is_number(v) and v > 0, "a number > 0")


def register_attack(name: str, **rules: Rule) -> Callable[[Attack], Attack]:
    """Decorator: make the function available as ``Adversary(attack=name)``. ``rules``: what an option's
    value must be, checked when the adversary is built (an option's type is taken from its default)."""

    def add(fn: Attack) -> Attack:
        fn.option_rules = rules
        return ATTACKS.add(name, fn)

    return add


def register_data_attack(name: str, **rules: Rule) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator for an attack on the liar's data, ``attack(batch, **options) -> batch``: the liar
    then computes and sends an honest-looking gradient of the poisoned batch (``Adversary.poison``)."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        fn.acts_on = "batch"
        return register_attack(name, **rules)(fn)

    return add


def acts_on_batch(attack: Attack) -> bool:
    """Whether ``attack`` poisons the liar's batch (registered with ``register_data_attack``)."""
    return getattr(attack, "acts_on", "gradient") == "batch"


def get_attack(name: str) -> Attack:
    """The built-in attack called ``name``, or a ``ValueError`` listing the known ones."""
    return ATTACKS.lookup(name)


def wants(attack: Attack, key: str) -> bool:
    """Whether ``attack`` names the context keyword ``key`` (``**kwargs`` alone does not ask for it)."""
    return key in inspect.signature(attack).parameters


def _takes_any_keyword(params: Any) -> bool:
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def check_options(attack: Attack, name: str, options: dict[str, Any]) -> None:
    """Refuse ``options`` that ``attack`` does not take, before a run: a misspelt one would otherwise fail
    the first step on the liar alone, which the other ranks see as a lost connection."""
    params = inspect.signature(attack).parameters
    if _takes_any_keyword(params):
        return
    honest = next(iter(params), None)  # the tensor (or batch) it replaces
    own = [k for k, p in params.items() if k != honest and k not in CONTEXT_KEYS
           and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in options if k not in own]
    if unknown:
        raise ValueError(
            f"attack {name!r} has no option {', '.join(map(repr, unknown))}: its options are"
            f" {', '.join(own) if own else 'none'}."
        )
    rules = getattr(attack, "option_rules", {})
    for key, value in options.items():
        rule = rules.get(key) or _rule_of_default(params[key].default)
        if rule is not None and not rule.holds(value):
            raise ValueError(f"attack {name!r}: {key} must be {rule.text} (got {value!r}).")


def check_options_in_world(attack: Attack, name: str, options: dict[str, Any], world_size: int,
                           liars: frozenset) -> None:
    """Refuse option values that name ranks this world does not have, or that no lie comes of, at launch
    rather than at the first step on the liar alone."""
    rules = getattr(attack, "option_rules", {})
    for key, value in options.items():
        rule = rules.get(key)
        problem = rule.in_world(value, world_size, liars) if rule is not None and rule.in_world else None
        if problem is not None:
            raise ValueError(f"attack {name!r}: {key} must be {problem} (got {value!r}).")


def _rule_of_default(default: Any) -> Any:
    """An option's kind, from its default: a number where it is one (an attack that needs an integer
    declares a rule), True or False where it is a bool."""
    if isinstance(default, bool):
        return Rule(lambda v: isinstance(v, bool), "True or False")
    if _is_number(default):
        return Rule(_is_number, "a number")
    return None


def call_attack(attack: Attack, honest: Tensor, options: dict[str, Any], context: dict[str, Any]) -> Tensor:
    """Call ``attack`` with its options and the context keywords it accepts."""
    params = inspect.signature(attack).parameters
    takes_any = _takes_any_keyword(params)
    chosen = {k: v for k, v in context.items() if takes_any or k in params}
    return attack(honest, **options, **chosen)


import_submodules(__name__, __path__)

__all__ = [
    "ATTACKS", "CONTEXT_KEYS", "OMNISCIENT_KEYS", "Attack", "Rule", "acts_on_batch", "at_least", "call_attack",
    "check_options", "check_options_in_world", "positive",
    "get_attack", "register_attack",
    "register_data_attack", "wants",
]
