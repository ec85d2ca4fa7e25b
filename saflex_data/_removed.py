"""Constructor arguments removed in 0.2: the ``TypeError`` that names what replaced each (private)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

# Constructor arguments removed in 0.2, and what replaced each (one line of CHANGELOG.md, 0.2.0, per entry).
_RULE_SETTINGS = ("beta", "tau", "normalize")
_REMOVED_IN_0_2 = {
    "precondition": "the Adam-preconditioned tangent measured worse (weight AUROC 0.82 vs 0.90, accuracy -0.13 "
    "points) and was removed; the plain validation gradient is used",
    "val_mode": "the validation pass always runs in eval mode (train-mode BatchNorm there measured worse: AUROC 0.77, "
    "accuracy -0.36 points)",
    "val_batches": "pass a validation loader with a larger batch (the same mean gradient for equal-size batches) or "
    "use val_ema=0.9",
}


def rejects_removed_arguments(rule: str = "margin") -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Decorate an ``__init__`` so that the arguments 0.2 removed raise a ``TypeError`` naming what replaced each.

    The signature stays the decorated one (``functools.wraps``); a keyword the signature lacks that is not a removed
    argument gets Python's own message. ``rule`` is the rule named in the replacement (the loss's default).

    Example:
        >>> class Loss:
        ...     @rejects_removed_arguments()
        ...     def __init__(self, *, rule="margin"):
        ...         self.rule = rule
        >>> Loss(beta=2.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: Loss(beta=2.0) was removed in 0.2: ... rule=Rule("margin", beta=2.0) (from saflex_data import Rule).
    """

    def decorate(init: Callable[..., None]) -> Callable[..., None]:
        accepted = set(inspect.signature(init).parameters)

        @functools.wraps(init)
        def checked_init(self: Any, *args: Any, **kwargs: Any) -> None:
            unknown = {k: v for k, v in kwargs.items() if k not in accepted}
            if unknown:
                _reject(type(self).__name__, unknown, rule)
            init(self, *args, **kwargs)

        return checked_init

    return decorate


def _reject(owner: str, unknown: dict[str, Any], rule: str) -> None:
    settings = {k: unknown[k] for k in _RULE_SETTINGS if k in unknown}
    if settings:
        given = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        rule = "paper" if {"tau", "normalize"} & set(settings) else rule  # only the paper-style rules use them
        raise TypeError(
            f"{owner}({given}) was removed in 0.2: a rule and its settings are one value, "
            f'rule=Rule("{rule}", {given}) (from saflex_data import Rule).'
        )
    for name, replacement in _REMOVED_IN_0_2.items():
        if name in unknown:
            raise TypeError(f"{owner}({name}=...) was removed in 0.2: {replacement}. See CHANGELOG.md, 0.2.0.")
    raise TypeError(f"{owner}.__init__() got an unexpected keyword argument {next(iter(unknown))!r}")
