"""The text side: documents from a ``datasets`` corpus, and the built-in offline corpus.

``corpus.path`` is local files (a file, a folder, or a glob of .txt / .json / .jsonl /
.parquet), a hub dataset name (needs a network), or ``builtin:python_docstrings``: the
docstrings of this Python's standard library plus the language-reference topics of
``pydoc_data``, which every Python installation carries (about 290k words for 3.11). It is
written once as JSON lines under the cache folder's parent and then read like any local file.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..atomic import atomic_write_text
from ..errors import ConfigError, DataError
from ..spec import setting
from .shards import sha256_file

_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".rst": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def python_docstrings(out: Path) -> Path:
    """Write the built-in corpus (deterministic for a Python version) to ``out``/…jsonl once."""
    version = "{}.{}.{}".format(*sys.version_info[:3])
    path = Path(out) / f"python_{version}_docstrings.jsonl"
    if path.is_file():
        return path
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[dict[str, str]] = []
    import pydoc_data.topics

    for name in sorted(pydoc_data.topics.topics):
        docs.append({"text": pydoc_data.topics.topics[name].strip(), "source": f"pydoc_data.topics[{name!r}]"})
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if _SKIP.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append({"text": doc, "source": f"{rel}:{getattr(node, 'lineno', 0)}"})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(doc) + "\n" for doc in docs))
    return path


def local_files(path: str) -> list[Path]:
    p = Path(path).expanduser()
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in _SUFFIX)
    if any(ch in path for ch in "*?["):
        return sorted(Path(q) for q in glob.glob(os.path.expanduser(path), recursive=True) if Path(q).is_file())
    return [p] if p.is_file() else []


@dataclass(kw_only=True)
class CorpusSpec:
    # the text harvested: local files, a hub dataset, or the built-in offline corpus
    path: str = setting(
        "builtin:python_docstrings",
        allowed="local files (file, folder or glob), a hub dataset name or builtin:python_docstrings",
    )
    format: Literal["auto", "text", "json", "parquet"] = "auto"  # local files
    column: str = "text"  # the text column of json, parquet and hub datasets
    split: str = "train"  # hub datasets
    name: str | None = None  # hub dataset config
    revision: str | None = None  # a hub dataset's revision (null: its default)


def is_builtin(cfg: CorpusSpec) -> bool:
    return cfg.path == "builtin:python_docstrings"


def describe(cfg: CorpusSpec, builtin_dir: Path) -> dict[str, Any]:
    """What the corpus is, for the manifest: files with their sha256, or the hub name."""
    path = cfg.path
    if is_builtin(cfg):
        file = python_docstrings(builtin_dir)
        return {
            "kind": "builtin",
            "path": path,
            "files": [{"file": str(file), "sha256": sha256_file(file)}],
            "python": sys.version.split()[0],
            "split": "train",
            "column": "text",
        }
    files = local_files(path)
    if files:
        return {
            "kind": "local",
            "path": path,
            "format": _format(cfg, files),
            "column": cfg.column,
            "files": [{"file": str(f), "sha256": sha256_file(f)} for f in files],
        }
    if path.startswith(("/", ".", "~")) or os.sep in path.strip("/") and Path(path).parent.exists():
        raise DataError(f"corpus {path!r}: no such file, or no .txt/.json/.jsonl/.parquet file there")
    return {
        "kind": "hub",
        "path": path,
        "name": cfg.name,
        "split": cfg.split,
        "column": cfg.column,
        "revision": cfg.revision,
    }


def _format(cfg: CorpusSpec, files: list[Path]) -> str:
    if cfg.format != "auto":
        return cfg.format
    kinds = {_SUFFIX.get(f.suffix) for f in files}
    if len(kinds) != 1 or None in kinds:
        raise ConfigError(
            "data.harvest.corpus.format",
            "auto",
            f"text, json or parquet: the files' suffixes ({sorted({f.suffix for f in files})}) do not name one format",
        )
    (kind,) = kinds
    return str(kind)


def documents(desc: dict[str, Any]) -> Iterator[str]:
    """The corpus' documents in a fixed order (streamed: nothing is loaded whole)."""
    import datasets

    try:
        if desc["kind"] == "hub":
            ds = datasets.load_dataset(
                desc["path"], desc.get("name"), split=desc["split"], streaming=True, revision=desc.get("revision")
            )
        else:
            fmt = "json" if desc["kind"] == "builtin" else desc["format"]
            extra = {"sample_by": "paragraph"} if fmt == "text" else {}  # a document per blank-line-separated paragraph
            ds = datasets.load_dataset(
                fmt, data_files=[f["file"] for f in desc["files"]], split="train", streaming=True, **extra
            )
    except Exception as e:  # datasets raises many types for "cannot reach the hub"
        if desc["kind"] != "hub":
            raise DataError(f"cannot read corpus {desc['path']!r}: {type(e).__name__}: {e}") from e
        raise DataError(
            f"cannot load dataset {desc['path']!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Without a "
            "network (or with HF_DATASETS_OFFLINE=1) only local files work: set data.harvest.corpus.path to a .txt, "
            ".json/.jsonl or .parquet file, a folder or a glob of them, or use builtin:python_docstrings"
        ) from e
    column = desc["column"]
    for row in ds:
        if column not in row:
            raise ConfigError("data.harvest.corpus.column", column, f"a column of the corpus: {sorted(row)}")
        text = row[column]
        if isinstance(text, str) and text.strip():
            yield text
