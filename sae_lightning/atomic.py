"""Atomic file writes, and a lock between processes that share a file.

Writes: whatever is written appears whole under its name, or not at all.

Every writer in the package goes through :func:`atomic_path`: write to a hidden temporary
name beside the target (``.<name>.tmp-<pid>``), then rename over it; on an error the
temporary is removed. ``remove_temporaries`` clears those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def umask_mode() -> int:
    """The mode a new file gets under the process's umask (0o644 under umask 022)."""
    mask = os.umask(0)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path to write; renamed to ``path`` when the block ends without error.
    The file gets the mode the umask gives a new file, whatever the writer made it (some, like
    safetensors, write a private 0600 temporary of their own)."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Strict JSON (NaN and inf written as null), written atomically; ``indent=None``: one line."""
    text = json.dumps(strict(obj), indent=indent, sort_keys=sort_keys, allow_nan=False, default=str)
    atomic_write_text(path, text + "\n")


@contextlib.contextmanager
def file_lock(path: str | Path, on_wait=None) -> Iterator[None]:
    """An exclusive lock (``flock``) on the file ``path``, held for the block; other processes
    block on it. ``on_wait()`` is called once if one has to wait.

    The lock file is removed when the block ends (while still locked), and so are the folders
    made for it if they are left empty: nothing stays behind. A waiter that then gets the lock
    of the removed file sees that ``path`` is no longer that file and locks afresh.
    """
    import fcntl

    path = Path(path)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        f = open(path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None and not waited:
                on_wait()
            waited = True
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # the previous holder removed that file: lock the one at the path now
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
        for folder in made:  # innermost first
            try:
                folder.rmdir()
            except OSError:
                break


def check_writable(path: str | Path, key: str) -> None:
    """The folder ``path`` exists or can be made, and files can be written there (tried, then
    removed); else a ConfigError naming ``key``. Writes nothing that stays."""
    import tempfile

    from .errors import ConfigError

    existing = Path(path).expanduser()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, str(path), f"a folder ({existing} is a file)")
    try:
        Path(tempfile.mkdtemp(prefix=".write-test-", dir=existing)).rmdir()
    except OSError as e:
        raise ConfigError(
            key, str(path), f"a folder this user can write (cannot write in {existing}: {e.strerror})"
        ) from None


def remove_temporaries(folder: Path) -> None:
    for tmp in Path(folder).glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
