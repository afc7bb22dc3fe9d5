"""Benchmark of the data pipeline: harvest against the bare model forward, loader against training.

    python -m benchmarks.data_pipeline --data minilm [--tokens 40000] [--cache PATH]

1. Harvest: the same contexts (same batches) through the model, (a) bare: a forward pass that
   stops at the hooked site, nothing kept; (b) the harvest itself (tokenising, forward, gather,
   float16 conversion, checks, shard writes with sha256, manifest, statistics), model loaded
   once for both. The ratio (b)/(a) is what harvesting costs beyond the model.
2. Loader: tokens/s the ActivationsDataModule delivers (num_workers 0 and 2) from a cache,
   against the tokens/s a training step of each variant consumes at the cache's d_model.
Writes outputs/bench/pipeline.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from sae_lightning.atomic import atomic_write_text
from sae_lightning.config import resolve
from sae_lightning.data import DataSpec
from sae_lightning.data import corpus as corpus_mod
from sae_lightning.data import lm as lm_mod
from sae_lightning.data.activations import ActivationsData, ActivationsDataModule
from sae_lightning.data.framing import Framing
from sae_lightning.data.harvest import _device, harvest
from sae_lightning.data.harvest_spec import HarvestSpec

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def harvest_bench(spec: HarvestSpec, tokens: int, batch_sizes: tuple[int, ...] = ()) -> dict:
    source = lm_mod.resolve(spec.lm.name, spec.lm.gguf_file)
    device = _device(spec.lm.device)
    model, tokenizer, causal = lm_mod.load(source, spec.lm.revision, spec.lm.dtype, device)
    _, layers = lm_mod.blocks(model)
    layer = lm_mod.check_site(spec.site, spec.layer, len(layers))
    framing = Framing(tokenizer, causal, spec)
    with tempfile.TemporaryDirectory() as tmp:
        desc = corpus_mod.describe(spec.corpus, Path(tmp) / "corpora")  # where harvest() will look
        n_ctx = -(-tokens // (spec.context_length - len(framing.prefix) - len(framing.suffix)))
        contexts = list(itertools.islice(framing.contexts(tokenizer, corpus_mod.documents(desc)), n_ctx))

        def batched(size: int) -> list[torch.Tensor]:
            out = []
            for i in range(0, len(contexts), size):
                chunk = contexts[i : i + size]
                ids = torch.full((len(chunk), spec.context_length), -1, dtype=torch.long)
                for r, c in enumerate(chunk):
                    ids[r, : len(c)] = torch.tensor(c)
                out.append(ids)
            return out

        batches = batched(spec.batch_size)
        dropped = torch.tensor(framing.dropped, dtype=torch.long)
        kept = int(sum(((b >= 0) & ~torch.isin(b, dropped)).sum() for b in batches))

        def bare(stop: bool, batches: list[torch.Tensor] = batches) -> float:
            t = time.perf_counter()
            with torch.inference_mode(), lm_mod.hook_site(model, spec.site, layer, lambda h: None, stop=stop):
                for ids in batches:
                    inputs, mask = ids.clamp_min(0).to(device), (ids >= 0).long().to(device)
                    if stop:
                        lm_mod.run_to_site(model, inputs, mask)
                    else:
                        lm_mod.base_model(model)(input_ids=inputs, attention_mask=mask)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t

        bare(True)  # warm-up
        bare_s = statistics.median([bare(True) for _ in range(2)])
        # the forward's speed per batch size (contexts per forward; data.harvest.batch_size):
        # the same contexts, the best of two passes each
        by_size = {size: kept / min(bare(True, batched(size)) for _ in range(2)) for size in batch_sizes}
        full_s = bare(False)
        spec.token_budget = kept
        t = time.perf_counter()
        manifest = harvest(
            Path(tmp) / "cache", spec, progress=False, log=lambda *a: None, loaded=(model, tokenizer, causal)
        )
        harvest_s = time.perf_counter() - t
    assert manifest["tokens"] == kept, (manifest["tokens"], kept)
    return {
        "model": spec.lm.name,
        "site": f"blocks.{layer}.{spec.site}",
        "n_layers": len(layers),
        "tokens": kept,
        "contexts": len(contexts),
        "bare_forward_to_site_tok_s": kept / bare_s,
        "full_forward_tok_s": kept / full_s,
        "harvest_tok_s": kept / harvest_s,
        "harvest_vs_bare": bare_s / harvest_s,
        "d_model": manifest["d_model"],
        "bare_tok_s_by_batch_size": by_size,
    }


def loader_bench(data: ActivationsData, batches: int, workers: int) -> float:
    dm: ActivationsDataModule = ActivationsDataModule(dataclasses.replace(data, num_workers=workers))
    dm.open()  # open and verify before timing
    it = iter(dm.train_dataloader())
    next(it)  # workers started
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * dm.batch_size / (time.perf_counter() - t)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="minilm", help="a data config of kind activations (configs/data/)")
    p.add_argument(
        "--tokens",
        type=int,
        default=40000,
        help="about this many tokens harvested (contexts for this many, less the dropped special tokens)",
    )
    p.add_argument("--cache", default=None, help="cache for the loader benchmark (default: the data config's path)")
    p.add_argument("--batches", type=int, default=200, help="loader batches timed")
    p.add_argument("--latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["topk", "mutual_choice", "feature_choice"])
    p.add_argument("--skip-harvest", action="store_true")
    p.add_argument("--skip-loader", action="store_true", help="no loader or training timing (no cache needed)")
    p.add_argument(
        "--batch-sizes", type=int, nargs="*", default=[], help="also time the forward at these data.harvest.batch_size"
    )
    p.add_argument("--out", default="outputs/bench/pipeline.json")
    a = p.parse_args(argv)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={a.data}"])
    spec = DataSpec.from_raw(resolve(cfg)["data"], "data")
    if not isinstance(spec, ActivationsData) or spec.harvest is None:
        raise SystemExit(f"error: data={a.data} is not a data config of kind 'activations' with a harvest section")
    data: ActivationsData = dataclasses.replace(spec, path=a.cache) if a.cache else spec
    assert data.harvest is not None
    result: dict = {"data": a.data, "torch_threads": torch.get_num_threads()}
    if not a.skip_harvest:
        h = harvest_bench(data.harvest, a.tokens, tuple(a.batch_sizes))
        result["harvest"] = h
        print(
            f"harvest {h['model']} {h['site']} ({h['n_layers']} blocks), {h['tokens']} tokens: bare forward to the "
            f"site {h['bare_forward_to_site_tok_s']:.0f} tok/s, harvest {h['harvest_tok_s']:.0f} tok/s "
            f"({100 * h['harvest_vs_bare']:.0f}% of bare); full forward {h['full_forward_tok_s']:.0f} tok/s"
        )
        for size, rate in h["bare_tok_s_by_batch_size"].items():
            print(f"  bare forward, batch_size {size}: {rate:.0f} tok/s")
    if a.skip_loader:
        return result
    loader = {w: loader_bench(data, a.batches, w) for w in (0, 2)}
    result["loader_tok_s"] = loader
    print(
        f"loader ({data.path}, batch {data.batch_size}): "
        + ", ".join(f"{v:.0f} tok/s with {w} workers" for w, v in loader.items())
    )

    from benchmarks.step import time_variant
    from sae_lightning.data.shards import read_manifest

    manifest = read_manifest(Path(data.path))
    assert manifest is not None  # the loader benchmark opened it
    d, B = manifest["d_model"], data.batch_size
    result["training"] = {}
    for v in a.variants:
        r = time_variant(v, d, a.latents, a.k, B, "float32", a.steps, 2, torch.device("cpu"), [])
        tok_s = B / r["step_s"]
        result["training"][v] = tok_s
        print(
            f"training {v} (d={d}, F={a.latents}, k={a.k}, B={B}): {tok_s:.0f} tok/s; loader/training = "
            f"{loader[0] / tok_s:.1f}x (0 workers)"
        )
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(f"written {out}")
    return result


if __name__ == "__main__":
    main()
