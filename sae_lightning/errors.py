"""Errors users see.

- :class:`ConfigError` names the key, the value and what is allowed;
- :class:`DataError` names the file or source and what to do;
- :class:`TrainingDiverged` names the step and the tensor that stopped being finite.

The command-line entry points (``sae_lightning.cli``) print each as one ``error:`` line:
exit status 2 for the first two (bad input), 1 for a run that diverged.
"""

from __future__ import annotations

import difflib
import math
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


def unknown_key(prefix: str, key: str, value: Any, known: Iterable[str]) -> ConfigError:
    """The one error for a key that a section does not have: the known keys and the closest."""
    known = sorted(known)
    full = f"{prefix}.{key}" if prefix else key
    hint = did_you_mean(full, [f"{prefix}.{k}" if prefix else k for k in known])
    return ConfigError(full, value, f"a key of {prefix or 'the config'}: {', '.join(known)}{hint}")


def non_finite_keys(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every (dotted key, value) of a nested dict/list whose value is a NaN or infinite float."""
    out: list[tuple[str, float]] = []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += non_finite_keys(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += non_finite_keys(v, f"{prefix}[{i}]")
    elif isinstance(tree, float) and not math.isfinite(tree):
        out.append((prefix, tree))
    return out


class DataError(RuntimeError):
    """A problem with a model, corpus, activation cache or checkpoint (not a bad config
    value): the message says what is wrong, where, and what to do about it."""


class TrainingDiverged(FloatingPointError):
    """A tensor of the training step stopped being finite (NaN or inf)."""


class Interrupted(Exception):
    """Stopped on Ctrl-C or SIGTERM with the work saved; the message says how to continue."""
