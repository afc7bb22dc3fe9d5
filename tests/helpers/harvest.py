"""A small harvest spec for the tiny model and corpus of the test fixtures."""

from __future__ import annotations

from sae_lightning.data.harvest_spec import HarvestSpec


def spec_for(lm, corpus, **kw) -> HarvestSpec:
    cfg = {
        "lm": {"name": str(lm)},
        "corpus": {"path": str(corpus)},
        "layer": 0,
        "context_length": 16,
        "batch_size": 3,
        "token_budget": 400,
        "shard_tokens": 64,
        "dtype": "float32",
    }
    cfg.update(kw)
    return HarvestSpec.parse(cfg)
