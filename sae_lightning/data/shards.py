"""The activation cache on disk: shards of activations, their token ids, and a manifest.

A cache is a folder::

    manifest.json          what was harvested (model and its hash or revision, site, d_model,
                           dtype, corpus, context length), the shard list with a sha256 per file,
                           the token count, normalisation statistics, and whether it is complete
    shard_00000.npy        activations [n_tokens, d_model] of the kept tokens, in harvest order
    shard_00000.ids.npy    token ids [n_contexts, context_length] of the contexts those tokens
                           came from (int32, -1 = padding); kept positions are the non-padding
                           ids that are not in ``manifest["dropped_token_ids"]``
    shard_00000.grad.npy   only in a cache harvested with ``gradients``: ∇ₓL [n_tokens, d_model]
                           of the same tokens, in ``manifest["gradients"]["dtype"]``

``.npy`` files are memory-mapped for reading. ``bfloat16`` (which numpy lacks) is stored as its
raw 16-bit pattern (uint16) and viewed back as bfloat16. Every file is written to a temporary
name, hashed, flushed and renamed, and the manifest is rewritten (same way) after each shard:
a shard is in the cache only once its file is whole and the manifest lists it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import DataError

FORMAT = "sae_lightning.activations/1"
MANIFEST = "manifest.json"
DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),
}


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.npy"


def ids_name(index: int) -> str:
    return f"shard_{index:05d}.ids.npy"


def grad_name(index: int) -> str:
    return f"shard_{index:05d}.grad.npy"


PARTS = ("activations", "ids", "gradients")  # a shard entry's files (gradients only where harvested)


def part_dtype(manifest: dict[str, Any], part: str) -> str:
    """The stored dtype of a shard part holding [tokens, d_model] values."""
    return manifest["gradients"]["dtype"] if part == "gradients" else manifest["dtype"]


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` to ``path`` atomically (flushed to disk, hashed before the rename);
    returns {file, bytes, sha256}."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(tmp)
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": digest}


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations as the numpy array stored for ``dtype``."""
    t = x.to(DTYPES[dtype][0]).contiguous().cpu()
    return t.view(torch.uint16).numpy() if dtype == "bfloat16" else t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A stored array back as a float32 tensor (copies)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return (t.view(torch.bfloat16) if dtype == "bfloat16" else t).to(torch.float32)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(
            f"{path} is not valid JSON ({e}); the cache is damaged: delete the folder and harvest again"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path} has format {found!r}, this version reads {FORMAT!r}")
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, m: dict[str, Any]) -> None:
    """The fields this package reads, with their types: a damaged or hand-edited manifest is
    named here, not found later as a KeyError."""

    def bad(what: str) -> DataError:
        return DataError(f"{path} is damaged: {what}; delete the cache folder and harvest it again")

    for key, kind in (("d_model", int), ("dtype", str), ("tokens", int), ("shards", list), ("harvest", dict)):
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise bad(f"{key!r} is {m.get(key)!r}, expected a {kind.__name__}")
    if m["dtype"] not in DTYPES:
        raise bad(f"dtype {m['dtype']!r} is not one of {', '.join(DTYPES)}")
    if m["d_model"] < 1:
        raise bad(f"d_model {m['d_model']} < 1")
    grads = m.get("gradients")
    if grads is not None and (not isinstance(grads, dict) or grads.get("dtype") not in DTYPES):
        raise bad(f"gradients is {grads!r}, expected null or {{'dtype': one of {', '.join(DTYPES)}}}")
    parts = PARTS if grads is not None else PARTS[:2]
    for i, entry in enumerate(m["shards"]):
        ok = (
            isinstance(entry, dict)
            and all(isinstance(entry.get(k), int) for k in ("tokens", "contexts"))
            and all(isinstance(entry.get(k), dict) and {"file", "bytes", "sha256"} <= set(entry[k]) for k in parts)
        )
        if not ok:
            raise bad(f"shard entry {i} lacks tokens / contexts / {' / '.join(parts)}")
    total = sum(e["tokens"] for e in m["shards"])
    if total != m["tokens"]:
        raise bad(f"its shards hold {total} tokens but 'tokens' says {m['tokens']}")


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype] | str:
    """(shape, dtype) from an .npy file's header, or what is wrong with it."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)  # reads the header; maps, does not read, the data
        return a.shape, a.dtype
    except (ValueError, OSError, EOFError) as e:
        return f"{path} is not a readable .npy file ({e})"


def verify_shard(
    folder: Path, entry: dict[str, Any], checksum: bool, manifest: dict[str, Any] | None = None
) -> str | None:
    """None if the shard's files match the manifest (presence, size, with ``manifest`` the
    shapes and dtypes in the .npy headers, with ``checksum`` the sha256); else what is wrong."""
    for key in (k for k in PARTS if k in entry):
        f = entry[key]
        path = Path(folder) / f["file"]
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != f["bytes"]:
            return f"{path} has {size} bytes, the manifest says {f['bytes']} (truncated or overwritten)"
        if manifest is not None:
            header = _header(path)
            if isinstance(header, str):
                return header
            shape, dtype = header
            if key != "ids":
                want_dtype = np.dtype(DTYPES[part_dtype(manifest, key)][1])
                want_shape = (entry["tokens"], manifest["d_model"])
            else:
                want_shape = (entry["contexts"], manifest["harvest"].get("context_length", shape[-1] if shape else 0))
                want_dtype = np.dtype(np.int32)
            if tuple(shape) != tuple(want_shape) or dtype != want_dtype:
                return (
                    f"{path} holds {dtype} {tuple(shape)} but the manifest describes {want_dtype} {tuple(want_shape)} "
                    f"(tokens {entry['tokens']}, d_model {manifest['d_model']}, dtype {part_dtype(manifest, key)})"
                )
        if checksum:
            scan = part_dtype(manifest, key) if manifest is not None and key != "ids" else None
            digest, bad_row = _hash_and_scan(path, scan)
            if digest != f["sha256"]:
                return f"{path} is corrupt: sha256 {digest[:16]}… differs from the manifest's {f['sha256'][:16]}…"
            if bad_row is not None:
                return f"{path} holds a NaN or inf at row {bad_row}"
    return None


def _non_finite_rows(block: np.ndarray, dtype: str) -> np.ndarray:
    """Which rows of a stored block [rows, d] hold a NaN or inf (bfloat16: exponent bits all ones)."""
    bad = (block & 0x7F80) == 0x7F80 if dtype == "bfloat16" else ~np.isfinite(block)
    return bad.any(axis=1)


def _hash_and_scan(path: Path, dtype: str | None, chunk_rows: int = 1 << 14) -> tuple[str, int | None]:
    """The file's sha256 and, with the stored ``dtype`` of an activations .npy, the first row
    holding a NaN or inf (None if none): one read of the file for both."""
    if dtype is None:
        return sha256_file(path), None
    mapped = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only: where the data start
    offset, stored = int(mapped.offset), mapped.dtype
    width = int(mapped.shape[1]) if mapped.ndim == 2 else 1
    del mapped
    h, bad_row, row = hashlib.sha256(), None, 0
    with open(path, "rb") as f:
        h.update(f.read(offset))
        while block := f.read(chunk_rows * width * stored.itemsize):
            h.update(block)
            if bad_row is None and len(block) % (width * stored.itemsize) == 0:
                rows = np.frombuffer(block, dtype=stored).reshape(-1, width)
                hit = np.flatnonzero(_non_finite_rows(rows, dtype))
                if len(hit):
                    bad_row = row + int(hit[0])
                row += rows.shape[0]
    return h.hexdigest(), bad_row


def verify_cache(folder: Path, manifest: dict[str, Any], checksum: bool = True) -> None:
    """Raise DataError naming the first shard whose files do not match the manifest."""
    for entry in manifest["shards"]:
        problem = verify_shard(folder, entry, checksum, manifest)
        if problem is not None:
            raise DataError(
                f"activation cache {folder}: {problem}. Re-run the harvest (python harvest.py with the "
                "same data config): it checks every shard and re-creates the cache from the first bad one"
            )


def fingerprint(manifest: dict[str, Any]) -> str:
    """A short identity of a cache's content (its shards' checksums)."""
    h = hashlib.sha256()
    for entry in manifest["shards"]:
        h.update(entry["activations"]["sha256"].encode())
    return h.hexdigest()[:16]


class ShardReader:
    """Random access to the cache's tokens by global index, through memory maps opened lazily
    (so that each DataLoader worker opens its own after the fork): their activations, or with
    ``part="gradients"`` their stored ∇ₓL."""

    def __init__(self, folder: Path, manifest: dict[str, Any], part: str = "activations"):
        self.folder, self.dtype, self.part = Path(folder), part_dtype(manifest, part), part
        self.counts = [entry["tokens"] for entry in manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.files = [entry[part]["file"] for entry in manifest["shards"]]
        self.n_tokens, self.d_model = int(self.offsets[-1]), manifest["d_model"]
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self):
        return {**self.__dict__, "_maps": {}}

    def _map(self, s: int) -> np.ndarray:
        if s not in self._maps:
            self._maps[s] = np.load(self.folder / self.files[s], mmap_mode="r")
        return self._maps[s]

    def _check(self, x: torch.Tensor, s: int, rows: np.ndarray) -> torch.Tensor:
        if not torch.isfinite(x).all():
            bad = int(rows[int((~torch.isfinite(x)).any(1).nonzero()[0])])
            raise DataError(
                f"activation cache {self.folder}: {self.files[s]} holds a NaN or inf at row {bad}; "
                "the cache is unusable: delete it and harvest again (with data.harvest.dtype=float32 "
                "if the model's activations overflow float16)"
            )
        return x

    def range(self, start: int, stop: int) -> torch.Tensor:
        """Tokens [start, stop) as float32 [stop - start, d]."""
        return self.gather(np.arange(start, stop, dtype=np.int64))

    def gather(self, index: np.ndarray) -> torch.Tensor:
        """Tokens at global indices ``index`` (any order) as float32 [len(index), d]."""
        index = np.asarray(index, dtype=np.int64)
        out = torch.empty(len(index), self.d_model, dtype=torch.float32)
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        order = np.argsort(shard, kind="stable")
        bounds = np.searchsorted(shard[order], np.arange(len(self.counts) + 1))
        for s in range(len(self.counts)):
            pos = order[bounds[s] : bounds[s + 1]]
            if len(pos) == 0:
                continue
            rows = index[pos] - self.offsets[s]
            sort = np.argsort(rows, kind="stable")  # read in file order
            block = self._check(from_storage(self._map(s)[rows[sort]], self.dtype), s, rows[sort])
            out[torch.from_numpy(pos[sort])] = block
        return out
