"""Errors users see: ConfigError names the key, the value and what is allowed; DataError names the file or source and what to do."""

from __future__ import annotations

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


class DataError(RuntimeError):
    """A problem with a model, corpus or activation cache (not a bad config value): the
    message says what is wrong, where, and what to do about it."""
