"""Typed config specs and the one parser every config section goes through.

A spec is a dataclass. :func:`parse` turns a mapping into one: unknown keys are refused with
a did-you-mean (:func:`check_keys`, the only unknown-key check of the package), each value is
checked against its annotation (``int``, ``float`` (finite), ``bool``, ``str``, ``Literal``
choices, ``X | None``, unions, ``list[X]``, nested specs), ranges come from the field's
metadata (:func:`setting`), and a spec's own ``check(prefix)`` adds rules that span fields.
Every failure is a :class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal, TypeVar, cast, get_args, get_origin, get_type_hints

from .errors import ConfigError, did_you_mean

T = TypeVar("T")
MISSING = dataclasses.MISSING


def setting(
    default: Any = MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    allowed: str | None = None,
    default_factory: Any = MISSING,
) -> Any:
    """A spec field with its range (``ge``/``gt``/``le``/``lt``) or a description of what is
    ``allowed`` (used in the error message instead of the generated one)."""
    meta = {k: v for k, v in {"ge": ge, "gt": gt, "le": le, "lt": lt, "allowed": allowed}.items() if v is not None}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_keys(raw: dict, known: Iterable[str], prefix: str, what: str | None = None) -> None:
    """Refuse a key that is not ``known``: names it, lists the known ones, suggests the closest."""
    known = sorted(known)
    for key, value in raw.items():
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            hint = did_you_mean(full, [f"{prefix}.{k}" if prefix else k for k in known])
            listed = ", ".join(known) if len(known) <= 16 else "see its documentation"
            raise ConfigError(full, value, f"a key of {what or prefix or 'the config'} ({listed}){hint}")


def _range_text(meta: dict) -> str:
    parts = [f"{op} {meta[k]:g}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if k in meta]
    return " " + " and ".join(parts) if parts else ""


def describe(tp: Any, meta: dict | None = None) -> str:
    """What a value of annotation ``tp`` may be, in words."""
    meta = meta or {}
    if "allowed" in meta:
        return meta["allowed"]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        text = " or ".join(describe(a, meta) for a in options)
        return f"null or {text}" if type(None) in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _range_text(meta)
    if tp is float:
        return "a finite number" + _range_text(meta)
    if tp is str:
        return "a string"
    if origin in (list, tuple):
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return "a value"


def _in_range(value: float, meta: dict) -> bool:
    return not (
        ("ge" in meta and value < meta["ge"])
        or ("gt" in meta and value <= meta["gt"])
        or ("le" in meta and value > meta["le"])
        or ("lt" in meta and value >= meta["lt"])
    )


def convert(value: Any, tp: Any, key: str, meta: dict | None = None) -> Any:
    """``value`` checked (and, for an int given where a float is wanted, converted) against
    the annotation ``tp``; ConfigError otherwise."""
    meta = meta or {}

    def bad() -> ConfigError:
        return ConfigError(key, value, describe(tp, meta))

    origin, args = get_origin(tp), get_args(tp)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "a finite number")
    if tp is Any:
        return value
    if isinstance(tp, type) and hasattr(tp, "from_raw"):  # a section with a parser of its own (it uses these)
        return tp.from_raw(value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        options = [a for a in args if a is not type(None)]
        if isinstance(value, dict):  # a section: its own (precise) error, not the union's
            for option in options:
                if dataclasses.is_dataclass(option) or hasattr(option, "from_raw"):
                    return convert(value, option, key, meta)
        for option in options:
            try:
                return convert(value, option, key, meta)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if value in args and not (isinstance(value, bool) and not any(isinstance(a, bool) for a in args)):
            return value
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool) and _in_range(value, meta):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(key, value, "a finite number")
            if _in_range(value, meta):
                return float(value)
        raise bad()
    if tp is str:
        if isinstance(value, str) and value:
            return value
        raise bad()
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad()
        inner = args[0] if args else Any
        try:
            return [convert(v, inner, key, meta) for v in value]
        except ConfigError:
            raise bad() from None
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return parse(tp, value, key)
    raise TypeError(f"spec annotation {tp!r} of {key} is not supported")


def parse(cls: type[T], raw: Any, prefix: str, what: str | None = None) -> T:
    """The spec ``cls`` from the mapping ``raw`` (see the module docstring)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(prefix, raw, "a mapping (a config section)")
    init_fields = [f for f in dataclasses.fields(cast(Any, cls)) if f.init]
    check_keys(raw, [f.name for f in init_fields], prefix, what)
    hints = get_type_hints(cls)
    values = {}
    for f in init_fields:
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name in raw:
            values[f.name] = convert(raw[f.name], hints[f.name], key, dict(f.metadata))
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(key, "(missing)", f"a value: {describe(hints[f.name], dict(f.metadata))}")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if callable(check):
        check(prefix)
    return obj


def as_dict(spec: Any) -> Any:
    """A spec (or a tree of specs, lists and dicts) as plain data."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {f.name: as_dict(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.init}
    if isinstance(spec, dict):
        return {k: as_dict(v) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [as_dict(v) for v in spec]
    return spec


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A config tree (nested dicts) as {dotted key: leaf value}; an empty dict is a leaf."""
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}
