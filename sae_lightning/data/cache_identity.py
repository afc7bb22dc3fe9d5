"""A cache's identity: what determines its content, stored in its manifest and compared before
it is used or extended, so that a cache is never silently reused under other settings.

One table of keys: :func:`from_spec` is the part of the identity the spec alone decides (checked
before anything is loaded: :func:`check_matches`); :func:`identity` adds what loading the model and
the corpus tells (the weights' hash, the corpus files' hashes, the tokenizer's framing), all of
it compared when a harvest resumes (:func:`compare`). Both refuse with the same message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..spec import flatten
from . import lm as lm_mod
from .framing import Framing
from .harvest_spec import HarvestSpec

# the identity's keys that decide the cache's content (the rest describes it: names, paths)
KEYS = (
    "lm",
    "corpus",
    "site",
    "layer",
    "context_length",
    "batch_size",
    "dtype",
    "prefix",
    "suffix",
    "separator",
    "dropped_token_ids",
    "shard_contexts",
    "gradients",
)


def from_spec(spec: HarvestSpec, n_layers: int) -> dict[str, Any]:
    """The identity's entries the spec alone decides (a negative layer counts from the end)."""
    return {
        "lm": {"name": spec.lm.name},
        "corpus": {"path": spec.corpus.path},
        "site": spec.site,
        "layer": spec.layer % n_layers,
        "context_length": spec.context_length,
        "batch_size": spec.batch_size,
        "dtype": spec.dtype,
        "shard_contexts": max(1, spec.shard_tokens // spec.context_length),
        # the stored gradients' dtype, None without (caches from before this key have none)
        "gradients": spec.gradient_dtype if spec.gradients else None,
    }


def identity(
    spec: HarvestSpec,
    source: lm_mod.LMSource,
    corpus_desc: dict,
    framing: Framing,
    d_model: int,
    n_layers: int,
    is_causal: bool,
    model_name: str,
    revision: str | None,
) -> dict[str, Any]:
    """The whole identity, once the model, its tokenizer and the corpus are known."""
    own = from_spec(spec, n_layers)
    return {
        **own,
        "lm": {
            **own["lm"],
            "resolved": source.folder,
            "gguf_file": source.gguf_file,
            "revision": revision,
            "weights_sha256": lm_mod.weights_hash(source),
            "dtype": spec.lm.dtype,
            "class": model_name,
            "causal": is_causal,
            "n_layers": n_layers,
        },
        "corpus": dict(corpus_desc),
        "site_name": f"blocks.{own['layer']}.{spec.site}",
        "d_model": d_model,
        "prefix": framing.prefix,
        "suffix": framing.suffix,
        "separator": framing.separator,
        "dropped_token_ids": framing.dropped,
    }


def comparable(ident: dict) -> dict:
    """The identity without where files happen to be (a moved venv or cache, a relative path):
    the model by its weights' hash, the corpus files by their hashes."""
    out = dict(ident)
    out["lm"] = {k: v for k, v in ident["lm"].items() if k != "resolved"}
    out["corpus"] = {**ident["corpus"], "files": [f["sha256"] for f in ident["corpus"].get("files", [])]}
    return out


def _differences(cache: dict, now: dict, keys) -> list[tuple[str, Any, Any]]:
    """(key, the cache's value, the value now) for each of ``keys`` whose values differ."""
    return [(k, cache.get(k), now.get(k)) for k in keys if cache.get(k) != now.get(k)]


def _refuse(folder: Path, diffs: list[tuple[str, Any, Any]]) -> None:
    if diffs:
        detail = "; ".join(
            f"data.harvest.{k}: cache {json.dumps(old, default=str)[:120]} vs now {json.dumps(new, default=str)[:120]}"
            for k, old, new in diffs
        )
        raise DataError(
            f"the cache at {folder} was harvested with other settings ({detail}). Use another "
            "data.path for these settings, or delete that folder to harvest it again"
        )


def compare(old: dict, new: dict, folder: Path) -> None:
    """Refuse to extend a cache whose identity differs from this harvest's."""
    old, new = comparable(old), comparable(new)
    _refuse(folder, _differences(old, new, KEYS))


def check_matches(manifest: dict[str, Any], spec: HarvestSpec, folder: Path) -> None:
    """Without loading anything: refuse a cache harvested with other settings than ``spec``
    (so that changing, say, data.harvest.layer never silently trains on the old cache)."""
    h = manifest["harvest"]
    now = flatten(from_spec(spec, h["lm"]["n_layers"]))  # lm.name, corpus.path, site, ...: only what the spec has
    _refuse(folder, _differences(flatten(h), now, now))
