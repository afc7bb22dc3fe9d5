"""``python train.py --help``: every config key with its default, what it allows and its one-line
description, generated from the specs (a field's description is the comment on its line, or the
comment lines right above it, in the spec's source)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from collections.abc import Iterator
from functools import cache
from typing import Any, get_args, get_origin, get_type_hints

from .spec import MISSING, describe


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the source of ``cls`` and its dataclass bases: the comment
    on the field's line(s), else the comment lines right above it, joined into one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        comments: dict[int, str] = {}
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                code_lines.add(tok.start[0])
        (node,) = ast.parse(source).body
        assert isinstance(node, ast.ClassDef)
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            end = item.end_lineno or item.lineno
            same = [comments[i] for i in range(item.lineno, end + 1) if i in comments]
            above: list[str] = []
            line = item.lineno - 1
            while line in comments and line not in code_lines:
                above.insert(0, comments[line])
                line -= 1
            text = " ".join(same or above).replace(" fmt: skip", "").strip()
            if text:
                docs[item.target.id] = text
    return docs


@dataclasses.dataclass
class Row:
    key: str
    default: Any
    allowed: str
    doc: str


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return "(required)"


def rows(cls: type, prefix: str, skip: tuple[str, ...] = (), base: type | None = None) -> Iterator[Row]:
    """A row per field of the spec ``cls`` (nested specs expanded), keys under ``prefix``;
    without the fields of ``base`` (listed once, in their own section)."""
    hints, docs = get_type_hints(cls), field_docs(cls)
    inherited = {f.name for f in dataclasses.fields(base)} if base is not None else set()
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip or f.name in inherited:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(tp, type):
            yield from rows(tp, key)
            continue
        yield Row(key, _default(f), describe(tp, dict(f.metadata)), docs.get(f.name, ""))
        if get_origin(tp) in (typing.Union, types.UnionType):  # an optional section: its keys too
            for option in get_args(tp):
                if dataclasses.is_dataclass(option) and isinstance(option, type):
                    yield from rows(option, key)


def sections() -> list[tuple[str, list[Row]]]:
    """The help's sections: the top level and each spec section, every allocator's keys, every
    loss term's, every data kind's and the sweeper's."""
    from .allocators import ALLOCATORS, AllocatorConfig
    from .config import TrainConfig
    from .data import DATA_KINDS, DataSpec
    from .losses import LOSSES, LossTerm
    from .sweep.settings import SweeperSpec

    top = ("variant", "data", "trainer", "sweep_trial")
    out = [("top level and sections (sae_lightning/config.py)", list(rows(TrainConfig, "", top)))]
    names = [
        Row("variant.name", "(the preset's)", "a string", "the variant's name (run folders and reports use it)"),
        Row(
            "variant.allocator",
            "(the preset's)",
            "one of " + ", ".join(map(repr, sorted(ALLOCATORS))),
            "the allocator: which (token, latent) pairs match",
        ),
    ]
    out.append(
        (
            "variant: every allocator's keys (variant=NAME picks a preset; sae_lightning/allocators/)",
            names + list(rows(AllocatorConfig, "variant")),
        )
    )
    for name in sorted(ALLOCATORS):
        own = list(rows(ALLOCATORS[name].Config, "variant", base=AllocatorConfig))
        if own:
            out.append((f"variant: allocator {name}", own))
    out.append(
        (
            "variant.losses.NAME: every loss term's keys (sae_lightning/losses.py)",
            list(rows(LossTerm, "variant.losses.NAME")),
        )
    )
    for name in sorted(LOSSES):
        own = list(rows(LOSSES[name], f"variant.losses.{name}", base=LossTerm))
        if own:
            out.append((f"variant.losses.{name}", own))
    out.append(
        ("data: every data kind's keys (data=NAME picks a preset; sae_lightning/data/)", list(rows(DataSpec, "data")))
    )
    for name in sorted(DATA_KINDS):
        out.append((f"data: kind {name}", list(rows(DATA_KINDS[name], "data", base=DataSpec))))
    out.append(
        (
            "hydra.sweeper (python train.py -m sweeps=NAME; sae_lightning/sweep/settings.py)",
            list(rows(SweeperSpec, "hydra.sweeper")),
        )
    )
    return out


def text() -> str:
    """The whole help text."""
    lines = [
        "python train.py [KEY=VALUE ...]: train a sparse autoencoder (README.md). Every key below is a",
        "Hydra override; groups pick presets: variant=topk|mutual_choice|feature_choice|jumprelu|",
        "matryoshka_topk|matryoshka_mutual_choice, data=synthetic|minilm|smollm2|smollm2_grad|cache,",
        "sweeps=pareto|width|mdl (with -m). trainer.*: lightning.Trainer's own keyword arguments",
        "(configs/trainer/default.yaml). python train.py --cfg job prints the composed config.",
    ]
    for title, section in sections():
        lines += ["", f"== {title} =="]
        for r in section:
            default = "null" if r.default is None else r.default
            lines.append(f"  {r.key} = {default}  [{r.allowed}]")
            if r.doc:
                lines.append(f"      {r.doc}")
    return "\n".join(lines) + "\n"
