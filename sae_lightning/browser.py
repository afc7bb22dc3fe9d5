"""Look inside a trained SAE: ``python -m sae_lightning.browser outputs/runs/<run>``.

For a run trained on an activation cache (whose shards keep the token ids), encodes held-out
tokens of that cache (its last ``--tokens``: the validation and calibration splits by
default) with the run's final SAE, and writes ``<run>/browser.html``: one self-contained page
(no network, opens from disk) listing every latent with its density, mean and largest
activation; for the one selected, a histogram of its activations and its top-activating
contexts, each token tinted by that latent's activation and the top token outlined. The
densest latents' top contexts also go to TensorBoard (the Text tab of the run).
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import tb
from .atomic import atomic_write_text
from .cli import user_errors
from .data.activations import ActivationsData
from .data.lm import load_tokenizer, source_of
from .data.shards import ShardReader, read_manifest, verify_cache
from .errors import DataError
from .runs import load_run


@dataclass
class Codes:
    """The sparse codes of tokens [start, stop) of a cache: entries (token, latent, value)."""

    start: int
    stop: int
    tokens: np.ndarray  # global token index of each entry
    latents: np.ndarray
    values: np.ndarray


@torch.no_grad()
def encode_range(module, reader: ShardReader, start: int, stop: int, mode: str, batch: int = 4096) -> Codes:
    toks, lats, vals = [], [], []
    for a in range(start, stop, batch):
        b = min(stop, a + batch)
        code = module.encode(reader.range(a, b).to(module.device), mode)
        toks.append(code.token_index().cpu().numpy() + a)
        lats.append(code.latents.cpu().numpy())
        vals.append(code.values.float().cpu().numpy())
    return Codes(start, stop, np.concatenate(toks), np.concatenate(lats), np.concatenate(vals))


class TokenMap:
    """Where each cached token came from: its context's token ids and its position there."""

    def __init__(self, folder: Path, manifest: dict, start: int, stop: int):
        dropped = np.asarray(manifest["harvest"]["dropped_token_ids"], dtype=np.int64)
        self.rows: dict[int, np.ndarray] = {}  # context → its token ids (-1: padding)
        self.kept: dict[int, np.ndarray] = {}  # context → global token index of each position (-1: not kept)
        self.context = np.empty(stop - start, dtype=np.int64)
        self.position = np.empty(stop - start, dtype=np.int64)
        offset = 0
        for entry in manifest["shards"]:
            n = entry["tokens"]
            if offset + n > start and offset < stop:
                ids = np.load(Path(folder) / entry["ids"]["file"]).astype(np.int64)
                keep = (ids >= 0) & ~np.isin(ids, dropped)
                c, p = np.nonzero(keep)  # row-major: the harvest's token order
                glob = offset + np.arange(len(c))
                sel = (glob >= start) & (glob < stop)
                self.context[glob[sel] - start] = c[sel] + entry["first_context"]
                self.position[glob[sel] - start] = p[sel]
                for ci in np.unique(c[sel]):
                    key = int(ci) + entry["first_context"]
                    self.rows[key] = ids[ci]
                    index = np.full(ids.shape[1], -1, dtype=np.int64)
                    index[p[c == ci]] = glob[c == ci]
                    self.kept[key] = index
            offset += n
        self.start = start


def token_text(tokenizer, token_id: int) -> str:
    """A token as it reads in running text: WordPiece continuations (``##ing``) glued to the word
    before, other WordPiece tokens after a space; byte-level BPE pieces decode with their own
    spaces; a newline shows as ⏎."""
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(backend).__name__ == "WordPiece":
        piece = str(tokenizer.convert_ids_to_tokens(token_id))
        return piece[2:] if piece.startswith("##") else " " + piece
    return tokenizer.decode([token_id]).replace("\n", "⏎")


def build(
    module, codes: Codes, tokens: TokenMap, tokenizer, examples: int, before: int, after: int, max_latents: int | None
) -> dict:
    """The page's data: per latent its figures, histogram and top contexts."""
    F, n_tok = module.sae.n_latents, codes.stop - codes.start
    counts = np.bincount(codes.latents, minlength=F)
    sums = np.bincount(codes.latents, weights=codes.values, minlength=F)
    order = np.lexsort((-codes.values, codes.latents))  # by latent, then largest value first
    lat_sorted = codes.latents[order]
    first = np.searchsorted(lat_sorted, np.arange(F))
    key = codes.tokens.astype(np.int64) * F + codes.latents  # for activation lookups at any (token, latent)
    key_order = np.argsort(key)
    key_sorted, val_by_key = key[key_order], codes.values[key_order]

    def activation(tok: np.ndarray, latent: int) -> np.ndarray:
        q = tok * F + latent
        i = np.clip(np.searchsorted(key_sorted, q), 0, max(len(key_sorted) - 1, 0))
        hit = (tok >= 0) & (len(key_sorted) > 0) & (key_sorted[i] == q)
        return np.where(hit, val_by_key[i] if len(key_sorted) else 0.0, 0.0)

    vocab: dict[int, int] = {}
    strings: list[str] = []

    def word(token_id: int) -> int:
        if token_id not in vocab:
            vocab[token_id] = len(strings)
            strings.append(token_text(tokenizer, token_id) if token_id >= 0 else "")
        return vocab[token_id]

    ranked = np.argsort(-counts, kind="stable")
    chosen = ranked[: max_latents or F]
    latents = []
    for j in sorted(int(x) for x in chosen):
        n = int(counts[j])
        shown: list[dict] = []
        item: dict[str, Any] = {
            "id": j,
            "density": n / n_tok,
            "mean": float(sums[j] / n) if n else 0.0,
            "max": 0.0,
            "hist": [],
            "examples": shown,
        }
        if n:
            vals = codes.values[order[first[j] : first[j] + n]]
            item["max"] = float(vals[0])
            item["hist"] = np.histogram(vals, bins=20, range=(0.0, float(vals[0])))[0].tolist()
            for e in order[first[j] : first[j] + min(n, examples)]:
                t = int(codes.tokens[e]) - tokens.start
                ctx, pos = int(tokens.context[t]), int(tokens.position[t])
                row, index = tokens.rows[ctx], tokens.kept[ctx]
                lo, hi = max(0, pos - before), min(len(row), pos + after + 1)
                window = [q for q in range(lo, hi) if row[q] >= 0]
                acts = activation(index[window], j)
                shown.append(
                    {
                        "tokens": [word(int(row[q])) for q in window],
                        "acts": [round(float(a), 3) for a in acts],
                        "center": window.index(pos),
                        "value": round(float(codes.values[e]), 3),
                    }
                )
        latents.append(item)
    return {"vocab": strings, "latents": latents, "tokens": n_tok, "active_per_token": len(codes.values) / n_tok}


def page_template() -> str:
    """The browser's HTML, CSS and JavaScript (package data: sae_lightning/assets/browser.html);
    ``__TITLE__`` and ``__DATA__`` are filled in by :func:`page`."""
    return resources.files("sae_lightning").joinpath("assets/browser.html").read_text(encoding="utf-8")


def page(data: dict, title: str) -> str:
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # safe inside <script>
    return page_template().replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


def tb_text(run_dir: Path, data: dict, n: int = 32) -> None:
    """The top contexts of the n densest latents, as TensorBoard text (the run's Text tab)."""
    with tb.run_writer(run_dir) as writer:
        vocab = data["vocab"]
        for item in sorted(data["latents"], key=lambda x: -x["density"])[:n]:
            lines = [f"density {item['density']:.4g}, mean {item['mean']:.3g}, max {item['max']:.3g}", ""]
            for e in item["examples"]:
                toks = [vocab[t].replace("|", "\\|") for t in e["tokens"]]
                toks[e["center"]] = f"**[{toks[e['center']]}]**"
                lines.append(f"- {e['value']:.3f}: " + "".join(toks))
            writer.add_text(f"latents/{item['id']:05d}", "\n".join(lines), 0)


def build_browser(
    run_dir: Path,
    tokens: int | None = None,
    examples: int = 10,
    mode: str = "threshold",
    max_latents: int | None = None,
    device: str = "cpu",
    out: Path | None = None,
) -> Path:
    module, data = load_run(run_dir, device)
    if not isinstance(data, ActivationsData):
        raise DataError(
            f"{run_dir} was trained on {data.kind} data: the browser needs a cache with token ids "
            "(python train.py data=minilm, data=smollm2 or data=cache ...)"
        )
    folder = Path(data.path).expanduser()
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{run_dir} was trained on the cache {folder}, which is no longer there")
    verify_cache(folder, manifest, checksum=False)
    reader = ShardReader(folder, manifest)
    n = min(reader.n_tokens, tokens or data.val_tokens + data.calibration_tokens)
    start, stop = reader.n_tokens - n, reader.n_tokens
    codes = encode_range(module, reader, start, stop, mode)
    tokenizer = load_tokenizer(source_of(manifest["harvest"]["lm"]), manifest["harvest"]["lm"].get("revision"))
    page_data = build(
        module,
        codes,
        TokenMap(folder, manifest, start, stop),
        tokenizer,
        examples,
        before=12,
        after=4,
        max_latents=max_latents,
    )
    meta = {
        "run": str(run_dir),
        "variant": module.variant.name,
        "k": module.k,
        "n_latents": module.sae.n_latents,
        "mode": mode,
        "cache": str(folder),
        "model": manifest["harvest"]["lm"]["name"],
        "site": manifest["harvest"]["site_name"],
        "first_token": start,
    }
    page_data["meta"] = meta
    out = out or Path(run_dir) / "browser.html"
    atomic_write_text(out, page(page_data, f"{Path(run_dir).name}: {meta['model']} {meta['site']}"))
    tb_text(Path(run_dir), page_data)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a finished run folder trained on an activation cache")
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="encode this many tokens from the end of the cache (default: its validation and "
        "calibration splits, which training never saw)",
    )
    p.add_argument("--examples", type=int, default=10, help="top contexts shown per latent")
    p.add_argument(
        "--mode",
        choices=["threshold", "batch"],
        default="threshold",
        help="threshold: calibrated thresholds, token by token (inference); batch: the allocator",
    )
    p.add_argument("--latents", type=int, default=None, help="keep the N densest latents (default: all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="the page (default: <run>/browser.html)")
    a = p.parse_args(argv)
    with user_errors():
        out = build_browser(a.run, a.tokens, a.examples, a.mode, a.latents, a.device, a.out)
    print(f"written {out} (open it in a browser; it needs no network)")
    return out


if __name__ == "__main__":
    main()
