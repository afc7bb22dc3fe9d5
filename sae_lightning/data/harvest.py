"""Harvest: run a language model over a corpus and store one site's activations as shards.

The corpus becomes one deterministic stream of contexts: documents are tokenised without
special tokens, joined with the tokenizer's end-of-text (or separator) token, cut into
pieces of ``context_length`` minus the model's own framing (BOS for a causal model, CLS/SEP
for BERT), and framed. Shard s holds contexts [s·S, (s+1)·S) for S = shard_tokens //
context_length, run in forward batches that start at the shard's first context; so every
shard is a pure function of the spec, and a resumed harvest writes the same bytes as one that
was never stopped. Special tokens (BOS, EOS, SEP, CLS, padding) are dropped by default.

With ``gradients`` (causal models), each shard also holds ∇ₓL of its kept tokens: L is the
model's next-token cross-entropy summed over each context (the positions the downstream loss
scores: every non-padding token after the first), differentiated with respect to the stored
activations themselves: the forward batch's activations are captured as without gradients
(the same bytes), then the model runs again a few contexts at a time with the site's output
replaced by those activations as a leaf, and only the layers after the site build a graph.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_json, check_writable, file_lock, remove_temporaries
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from . import corpus as corpus_mod
from . import lm as lm_mod
from .cache_identity import check_matches, compare, identity
from .framing import Framing
from .harvest_spec import HarvestSpec
from .shards import (
    FORMAT,
    MANIFEST,
    atomic_save_npy,
    grad_name,
    ids_name,
    read_manifest,
    shard_name,
    to_storage,
    verify_shard,
)


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# contexts per backward pass of a gradient harvest (bounds the graph and the [n, L, vocab] logits:
# 8 contexts of 128 tokens at SmolLM2's 49 152-token vocabulary hold 200 MB of logits)
GRADIENT_CONTEXTS = 8
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that will hold ``path`` (its nearest existing folder)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def bytes_per_token(spec: HarvestSpec, d_model: int) -> float:
    """What the cache stores per kept token: its activations, its gradients if asked, and its
    context's token ids (int32 per position, a context keeping about all its positions)."""
    per = d_model * _BYTES[spec.dtype] + 4
    if spec.gradients:
        per += d_model * _BYTES[spec.gradient_dtype]
    return per


def compute_stats(folder: Path, manifest: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """Normalisation statistics over the whole cache (float64 sums, one pass), and the stored
    gradients' RMS norm where there are some. ``progress``: a bar (plain lines in a log file)
    over the tokens read: on a cache of many GB the pass is disk-bound and takes minutes."""
    from .shards import ShardReader

    reader = ShardReader(folder, manifest)
    d = manifest["d_model"]
    s1, sq, n, amax = np.zeros(d), 0.0, 0, 0.0
    passes = 2 if manifest.get("gradients") else 1
    bar = progress_bar("statistics", progress, passes * reader.n_tokens, 0)
    for start in range(0, reader.n_tokens, 65536):
        x = reader.range(start, min(start + 65536, reader.n_tokens)).double()
        s1 += x.sum(0).numpy()
        sq += float(x.pow(2).sum())
        amax = max(amax, float(x.abs().max()))
        n += x.shape[0]
        bar.update(x.shape[0])
    mean = s1 / max(n, 1)
    stats = {
        "mean_norm": float(np.linalg.norm(mean)),
        "rms_norm": math.sqrt(sq / max(n, 1)),
        "centred_rms_norm": math.sqrt(max(sq / max(n, 1) - float(mean @ mean), 0.0)),
        "max_abs": amax,
        "mean": [round(float(v), 6) for v in mean],
    }
    if manifest.get("gradients"):
        grads, gq = ShardReader(folder, manifest, part="gradients"), 0.0
        for start in range(0, grads.n_tokens, 65536):
            g = grads.range(start, min(start + 65536, grads.n_tokens))
            gq += float(g.double().pow(2).sum())
            bar.update(g.shape[0])
        stats["gradient_rms_norm"] = math.sqrt(gq / max(n, 1))
    bar.close()
    return stats


def harvest(folder: str | Path, spec: HarvestSpec, progress: bool = True, log=print, loaded=None) -> dict[str, Any]:
    """Harvest into ``folder`` until it holds ``spec.token_budget`` tokens (or the corpus ends);
    resumes what is there. Returns the manifest. ``loaded``: the (model, tokenizer, is_causal)
    of ``spec.lm`` when the caller has it already (the benchmark)."""
    folder = Path(folder)
    check_writable(folder, "data.path")  # before the lock file beside it
    # one harvest per cache at a time across processes (sweep workers that all find it missing)
    with file_lock(
        folder.with_name(f".{folder.name}.lock"),
        on_wait=lambda: log(f"harvest: another process is harvesting {folder}; waiting for it"),
    ):
        return _harvest(folder, spec, progress, log, loaded)


def _harvest(folder: Path, spec: HarvestSpec, progress: bool, log, loaded) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is not None:
        check_matches(manifest, spec, folder)
        if manifest.get("complete") and (manifest["tokens"] >= spec.token_budget or manifest.get("corpus_exhausted")):
            return manifest  # nothing to do
    if folder.is_dir():
        remove_temporaries(folder)  # left by a killed harvest
    return HarvestRun(folder, spec, log, loaded).run(manifest, progress)


class HarvestRun:
    """One harvest session: the model and corpus loaded, the cache's identity, the whole
    shards kept from an earlier session, and the loop that appends shards until the budget."""

    def __init__(self, folder: Path, spec: HarvestSpec, log, loaded):
        self.folder, self.spec, self.log = folder, spec, log
        source = lm_mod.resolve(spec.lm.name, spec.lm.gguf_file)
        corpus_cfg, corpora = spec.corpus, folder.parent / "corpora"
        # a local or hub corpus is checked before the (slow) model load; the built-in one is written
        # to disk, so only once the model has loaded: a failed harvest leaves nothing behind
        desc = None if corpus_mod.is_builtin(corpus_cfg) else corpus_mod.describe(corpus_cfg, corpora)
        self.device = _device(spec.lm.device)
        self.t0 = time.perf_counter()
        self.model, self.tokenizer, is_causal = loaded or lm_mod.load(
            source, spec.lm.revision, spec.lm.dtype, self.device
        )
        if spec.gradients and not is_causal:
            raise ConfigError(
                "data.harvest.gradients",
                True,
                f"false for {spec.lm.name} ({type(self.model).__name__}): gradients of the next-token loss need a "
                "causal language model (e.g. builtin:smollm2)",
            )
        _, layers = lm_mod.blocks(self.model)
        self.layer = lm_mod.check_site(spec.site, spec.layer, len(layers))
        self.framing = Framing(self.tokenizer, is_causal, spec)
        self.desc = desc or corpus_mod.describe(corpus_cfg, corpora)  # every setting checked: now it may write
        self.d_model = int(self.model.config.hidden_size)
        revision = getattr(self.model.config, "_commit_hash", None) or spec.lm.revision
        self.ident = identity(
            spec,
            source,
            self.desc,
            self.framing,
            self.d_model,
            len(layers),
            is_causal,
            type(self.model).__name__,
            revision,
        )
        log(
            f"harvest: {spec.lm.name} ({type(self.model).__name__}, {len(layers)} blocks, d_model {self.d_model}) "
            f"loaded in {time.perf_counter() - self.t0:.1f} s; site {self.ident['site_name']}; corpus {self.desc['path']}"
        )
        self.shards: list[dict[str, Any]] = []
        self.tokens = self.done_contexts = 0
        self.dropped = torch.tensor(self.framing.dropped, dtype=torch.long)
        self.captured: list[torch.Tensor] = []
        self.site = (spec.site, self.layer)

    # ---- what an earlier session left ---------------------------------------------------------
    def _keep_whole_shards(self, manifest: dict[str, Any]) -> None:
        """The prefix of shards whose files match the manifest; a short last one is re-made."""
        compare(manifest["harvest"], self.ident, self.folder)
        for entry in manifest["shards"]:
            if verify_shard(self.folder, entry, checksum=True, manifest=manifest) is not None:
                self.log(f"harvest: {entry['activations']['file']} does not match the manifest; re-creating from there")
                break
            self.shards.append(entry)
        full = self.ident["shard_contexts"]
        if self.shards and self.shards[-1]["contexts"] < full and not manifest.get("corpus_exhausted"):
            self.shards.pop()  # a short last shard (budget reached mid-shard) is re-made to full length
        self.done_contexts = sum(e["contexts"] for e in self.shards)
        self.tokens = sum(e["tokens"] for e in self.shards)

    # ---- one forward batch, one shard ---------------------------------------------------------
    def _forward(self, batch: list[list[int]], shard_tokens: int, first_context: int, index: int):
        """The kept activations of a batch of contexts, stopping at the context that reaches the
        budget (independent of the batch size): (token ids [n, L], stored activations, stored
        gradients or None, n tokens)."""
        spec = self.spec
        ids = torch.full((len(batch), spec.context_length), -1, dtype=torch.long)
        for i, c in enumerate(batch):
            ids[i, : len(c)] = torch.tensor(c)
        keep = (ids >= 0) & ~torch.isin(ids, self.dropped)
        cum = torch.cumsum(keep.sum(1), 0) + self.tokens + shard_tokens
        n_ctx = int((cum < spec.token_budget).sum()) + 1 if cum[-1] >= spec.token_budget else len(batch)
        ids, keep = ids[:n_ctx], keep[:n_ctx]
        self.captured.clear()
        padded = ids.clamp_min(0).masked_fill(ids < 0, self.framing.pad_id)
        with lm_mod.hook_site(self.model, *self.site, self.captured.append, stop=True):
            lm_mod.run_to_site(self.model, padded.to(self.device), (ids >= 0).long().to(self.device))
        hidden = self.captured[0]
        x = hidden[keep.to(hidden.device)].float()
        stored = to_storage(x, spec.dtype)
        if not np.isfinite(_as_float(stored, spec.dtype)).all():
            reason = (
                f": the model's values overflow {spec.dtype}; set data.harvest.dtype=float32 (or bfloat16)"
                if bool(torch.isfinite(x).all())
                else ": the model itself produces them (check lm.dtype and the weights)"
            )
            raise DataError(
                f"harvest: NaN or inf activations in contexts {first_context}..{first_context + n_ctx - 1} at "
                f"{self.ident['site_name']}{reason}. Nothing of shard {index} was written"
            )
        grads = None
        if spec.gradients:
            g = self._gradients(ids, padded, hidden)[keep.to(hidden.device)]
            if not bool(torch.isfinite(g).all()):
                raise DataError(
                    f"harvest: NaN or inf gradients in contexts {first_context}..{first_context + n_ctx - 1} at "
                    f"{self.ident['site_name']} (check lm.dtype and the weights). Nothing of shard {index} was written"
                )
            grads = to_storage(g, spec.gradient_dtype)
        return ids, stored, grads, x.shape[0]

    def _gradients(self, ids: torch.Tensor, padded: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """∇ₓL [n, L, d] (float32) for the site's activations ``hidden`` of these contexts, L the
        next-token cross-entropy summed over each context, GRADIENT_CONTEXTS contexts at a time."""
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        mask = (ids >= 0).to(self.device)
        for i in range(0, ids.shape[0], GRADIENT_CONTEXTS):
            rows = slice(i, i + GRADIENT_CONTEXTS)
            m = mask[rows]
            with torch.enable_grad():
                leaf = hidden[rows].detach().clone().requires_grad_(True)

                def at_site(_: torch.Tensor, leaf: torch.Tensor = leaf) -> torch.Tensor:
                    return leaf  # the stored activations, as the leaf the gradient is taken for

                with lm_mod.hook_site(self.model, *self.site, at_site):
                    logits = self.model(
                        input_ids=padded[rows].to(self.device), attention_mask=m.long(), use_cache=False
                    ).logits
                valid = m[:, 1:] & m[:, :-1]
                target = padded[rows].to(self.device)[:, 1:][valid]
                loss = F.cross_entropy(logits[:, :-1][valid].float(), target, reduction="sum")
                (grad,) = torch.autograd.grad(loss, leaf)
            out[rows] = grad.float()
        return out

    def _next_shard(self, stream, bar) -> tuple[list[np.ndarray], list[np.ndarray], list[list[int]], int, bool]:
        """The contexts of the next shard (forward batches restart at its first context, so every
        shard is a pure function of the spec): activations, gradients (empty without), ids,
        tokens, and whether the corpus ended."""
        spec, full, index = self.spec, self.ident["shard_contexts"], len(self.shards)
        acts: list[np.ndarray] = []
        grads: list[np.ndarray] = []
        ids_rows: list[list[int]] = []
        shard_tokens = 0
        while len(ids_rows) < full and self.tokens + shard_tokens < spec.token_budget:
            batch = [c for _, c in zip(range(min(spec.batch_size, full - len(ids_rows))), stream)]
            if not batch:
                return acts, grads, ids_rows, shard_tokens, True
            ids, stored, stored_grads, n = self._forward(batch, shard_tokens, self.done_contexts + len(ids_rows), index)
            acts.append(stored)
            if stored_grads is not None:
                grads.append(stored_grads)
            ids_rows.extend(ids.tolist())
            shard_tokens += n
            bar.update(n)
        return acts, grads, ids_rows, shard_tokens, False

    def _write_shard(
        self, acts: list[np.ndarray], grads: list[np.ndarray], ids_rows: list[list[int]], shard_tokens: int
    ) -> None:
        index = len(self.shards)
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {
            "index": index,
            "first_context": self.done_contexts,
            "contexts": len(ids_rows),
            "tokens": shard_tokens,
            "activations": atomic_save_npy(self.folder / shard_name(index), np.concatenate(acts)),
            "ids": atomic_save_npy(self.folder / ids_name(index), np.asarray(ids_rows, dtype=np.int32)),
        }
        if self.spec.gradients:
            entry["gradients"] = atomic_save_npy(self.folder / grad_name(index), np.concatenate(grads))
        self.shards.append(entry)
        self.done_contexts += len(ids_rows)
        self.tokens += shard_tokens
        self._write_manifest(False)

    def _write_manifest(self, complete: bool, exhausted: bool = False, stats: dict | None = None) -> None:
        atomic_write_json(
            self.folder / MANIFEST,
            indent=1,
            obj={
                "format": FORMAT,
                "harvest": self.ident,
                "d_model": self.d_model,
                "dtype": self.spec.dtype,
                "gradients": self._gradients_entry(),
                "tokens": self.tokens,
                "contexts": sum(e["contexts"] for e in self.shards),
                "shards": self.shards,
                "complete": complete,
                "corpus_exhausted": exhausted,
                "token_budget": self.spec.token_budget,
                "stats": stats,
                "created_by": "sae_lightning harvest",
                "python": sys.version.split()[0],
                "torch": torch.__version__,
            },
        )

    def _gradients_entry(self) -> dict[str, str] | None:
        if not self.spec.gradients:
            return None
        return {
            "dtype": self.spec.gradient_dtype,
            "loss": "next-token cross-entropy, summed over each context (every non-padding token after the first)",
        }

    def _planned_tokens(self) -> int:
        """What this harvest will store, for the progress total: the budget, or less where a local
        corpus ends first (counted by tokenising it up to the budget, no model run: about 2 s for
        the built-in corpus). A hub corpus is not read twice: its total is the budget."""
        budget = self.spec.token_budget
        if self.desc["kind"] == "hub":
            return budget
        dropped, n = set(self.framing.dropped), 0
        for context in self.framing.contexts(self.tokenizer, corpus_mod.documents(self.desc)):
            n += sum(t not in dropped for t in context)
            if n >= budget:
                return budget
        return n

    def _check_space(self) -> None:
        """Refuse, before writing, a harvest whose shards will not fit on the disk: the tokens to
        go (the budget; where that does not fit, what a local corpus holds up to it) times the
        bytes per token."""
        free = free_bytes(self.folder)
        per = bytes_per_token(self.spec, self.d_model)
        to_go = self.spec.token_budget - self.tokens
        if to_go * per <= free:
            return
        if self.desc["kind"] != "hub":
            to_go = self._planned_tokens() - self.tokens
            if to_go * per <= free:
                return
        raise DataError(
            f"data.path={self.folder}: the harvest needs {to_go * per / 1e9:.2f} GB more ({to_go:,} tokens x "
            f"{per:g} bytes: d_model {self.d_model} in {self.spec.dtype}"
            + (f", gradients in {self.spec.gradient_dtype}" if self.spec.gradients else "")
            + f", token ids) but the disk has {free / 1e9:.2f} GB free; free some space, lower "
            "data.harvest.token_budget or set data.path to a larger disk. Nothing was written"
        )

    # ---- the session --------------------------------------------------------------------------
    def run(self, manifest: dict[str, Any] | None, progress: bool) -> dict[str, Any]:
        if manifest is not None:
            self._keep_whole_shards(manifest)
        self._check_space()
        stream = self.framing.contexts(self.tokenizer, corpus_mod.documents(self.desc))
        for _ in range(self.done_contexts):  # resume: skip what the kept shards hold (tokenising only)
            next(stream)
        bar = progress_bar(
            "harvest", progress, self._planned_tokens() if progress else self.spec.token_budget, self.tokens
        )
        exhausted = False
        try:
            # inference tensors cannot enter autograd: a gradient harvest runs under no_grad instead
            with torch.inference_mode(not self.spec.gradients), torch.no_grad():
                while self.tokens < self.spec.token_budget and not exhausted:
                    acts, grads, ids_rows, shard_tokens, exhausted = self._next_shard(stream, bar)
                    if not ids_rows:
                        break
                    self._write_shard(acts, grads, ids_rows, shard_tokens)
                    bar.set_postfix(shards=len(self.shards), refresh=False)
        except KeyboardInterrupt:
            bar.close()
            self.log(
                f"\nharvest interrupted: {len(self.shards)} whole shards ({self.tokens} tokens) kept in "
                f"{self.folder}; run the same command again to resume"
            )
            raise
        finally:
            bar.close()
            if self.folder.is_dir():
                remove_temporaries(self.folder)
        if self.tokens == 0:
            raise DataError(
                f"corpus {self.desc['path']!r} gave no tokens (no non-empty documents, or only special tokens); "
                "nothing was written"
            )
        described = {
            "harvest": self.ident,
            "d_model": self.d_model,
            "dtype": self.spec.dtype,
            "shards": self.shards,
            "gradients": self._gradients_entry(),
        }
        self.log(f"harvest: the normalisation statistics, one pass over the {self.tokens} tokens stored")
        self._write_manifest(True, exhausted, compute_stats(self.folder, described, progress))
        self.log(
            f"harvest: {self.tokens} tokens in {len(self.shards)} shards at {self.folder}"
            + (" (the corpus ended before the budget)" if exhausted else "")
            + f"; {time.perf_counter() - self.t0:.1f} s"
        )
        done = read_manifest(self.folder)
        assert done is not None  # written just above
        return done


def _as_float(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # bf16 bits: exponent all ones = inf/NaN
        return np.where((stored & 0x7F80) == 0x7F80, np.nan, 0.0)
    return stored
