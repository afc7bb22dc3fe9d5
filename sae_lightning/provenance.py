"""Which code made a run: the package's git commit, whether its tree held uncommitted changes,
and the versions of torch and Lightning. Every run writes them into metrics.json (``code``), so
that a page aggregating runs can name the code it measured and refuse to mix versions."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """``commit`` (None outside a git checkout), ``dirty`` (tracked or new files changed since it;
    ignored ones such as outputs/ do not count), ``torch``, ``lightning``, ``sae_lightning``."""
    from importlib.metadata import PackageNotFoundError, version

    import lightning
    import torch

    try:
        ours: str | None = version("sae_lightning")
    except PackageNotFoundError:  # run from a checkout that was never installed
        ours = None
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain") if head is not None else None
    return {
        "commit": head.strip() if head else None,
        "dirty": bool(status.strip()) if status is not None else None,
        "torch": str(torch.__version__),  # a TorchVersion (a str subclass): plain, for the checkpoint
        "lightning": str(lightning.__version__),
        "sae_lightning": ours,
    }


def describe(version: dict[str, Any] | None) -> str:
    """One version as a page shows it: ``commit 1a2b3c4d`` (``, with uncommitted changes``)."""
    if not version or not version.get("commit"):
        return "an unknown commit"
    return f"commit {version['commit'][:8]}" + (", with uncommitted changes" if version.get("dirty") else "")
