"""Reading a checkpoint file without running code from it, and writing only what can be read so.

A ``.ckpt`` is a pickle, and a pickle can name any importable callable, which the standard
unpickler calls while loading: a run folder from someone else could execute anything the moment
``evaluate``, ``browser``, the SAELens export or ``resume=`` opened it. :func:`load` reads with
torch's weights-only unpickler, which builds tensors and plain containers and refuses every
other global before calling it. :data:`ALLOWED` is the allowlist beyond that default: it is
empty because a checkpoint of this package holds only dicts, lists, tuples, strings, numbers,
booleans, None and tensors (Lightning's loop and callback states, Adam's state, our config as a
plain dict; :func:`check_plain` enforces it when a checkpoint is written, so a new piece of
state that would need pickle fails in the test suite, not in a user's hands).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from .errors import DataError

# types torch's weights-only unpickler may build beyond tensors and plain containers (see above)
ALLOWED: tuple[type, ...] = ()

# exact types (a float subclass such as numpy.float64 pickles as its own class, and is refused)
SCALARS = (str, int, float, bool, type(None), torch.dtype, torch.device, torch.Size)
MAPPINGS = (dict, OrderedDict)
SEQUENCES = (list, tuple, set)


def refused_global(message: str) -> str | None:
    """The ``module.name`` a weights-only load refused, from torch's message (None: another failure)."""
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else None


def load(
    path: Path | str,
    what: str,
    map_location: Any = "cpu",
    mmap: bool = False,
    instead: str = "use another checkpoint of the run (checkpoints/*.ckpt)",
) -> dict[str, Any]:
    """The checkpoint of an sae_lightning run at ``path``, read by the weights-only unpickler
    (nothing in it is called). ``what`` names the argument that gave the path, for the one-line
    error (DataError): a file holding any other object is refused, naming the file and the object,
    as is one that is not a readable torch file (``instead``: what to do then), or a torch file
    without the run's ``hyper_parameters.config`` and ``state_dict``."""
    state = _read(path, what, map_location, mmap, instead)
    hp = state.get("hyper_parameters") if isinstance(state, dict) else None
    if not isinstance(hp, dict) or not isinstance(hp.get("config"), dict) or "state_dict" not in state:
        raise DataError(
            f"{what}: {path} is a torch file but not a checkpoint of an sae_lightning run "
            "(no hyper_parameters.config / state_dict)"
        )
    return state


def _read(path: Path | str, what: str, map_location: Any, mmap: bool, instead: str) -> Any:
    try:
        with torch.serialization.safe_globals(list(ALLOWED)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = refused_global(str(e))
        if found is not None:
            raise DataError(
                f"{what}: {path} holds a {found} object, which a checkpoint of sae_lightning never holds; "
                "refused without loading it (a checkpoint may hold only tensors, numbers, strings, lists and "
                "dicts: loading anything else could run code from the file)"
            ) from None
        raise _unreadable(path, what, e, instead) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, IndexError, KeyError) as e:
        raise _unreadable(path, what, e, instead) from None


def _unreadable(path: Path | str, what: str, e: BaseException, instead: str) -> DataError:
    return DataError(
        f"{what}: {path} is not a readable checkpoint (truncated, damaged or not a torch file: "
        f"{type(e).__name__}); {instead}"
    )


def check_plain(tree: Any, path: str = "checkpoint") -> None:
    """Raise TypeError naming the first entry of ``tree`` that :func:`load` would refuse: a
    checkpoint written with it could not be opened again."""
    if type(tree) in SCALARS or type(tree) in ALLOWED or isinstance(tree, torch.Tensor):
        return
    if type(tree) in MAPPINGS:
        for key, value in tree.items():
            if type(key) not in (str, int):
                raise TypeError(f"{path} has a key of type {type(key).__qualname__}: {key!r}")
            check_plain(value, f"{path}[{key!r}]")
        return
    if type(tree) in SEQUENCES:
        for i, value in enumerate(tree):
            check_plain(value, f"{path}[{i}]")
        return
    raise TypeError(
        f"{path} is a {type(tree).__module__}.{type(tree).__qualname__}: a checkpoint holds only tensors, "
        "numbers, strings, lists and dicts (sae_lightning/checkpoint_file.py)"
    )
