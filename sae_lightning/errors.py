"""Errors users see.

- :class:`ConfigError` names the key, the value and what is allowed;
- :class:`DataError` names the file or source and what to do;
- :class:`TrainingDiverged` names the step and the tensor that stopped being finite.

The command-line entry points (``sae_lightning.cli``) print each as one ``error:`` line:
exit status 2 for the first two (bad input), 1 for a run that diverged.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r} is not allowed; expected {allowed}")


def require(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(key, value, allowed)


def require_choice(key: str, value: Any, choices) -> None:
    choices = list(choices)
    require(value in choices, key, value, "one of " + ", ".join(repr(c) for c in choices))


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """'; did you mean X?' for the closest candidate, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class DataError(RuntimeError):
    """A problem with a model, corpus, activation cache or checkpoint (not a bad config
    value): the message says what is wrong, where, and what to do about it."""


class TrainingDiverged(FloatingPointError):
    """A tensor of the training step stopped being finite (NaN or inf)."""


class Interrupted(Exception):
    """Stopped on Ctrl-C or SIGTERM with the work saved; the message says how to continue."""
