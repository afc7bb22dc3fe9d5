"""The parity harness gives SAELens exactly the batches our trainer reads."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from benchmarks.parity import plan
from benchmarks.saelens_side import gather, load_plan
from sae_lightning.data.harvest import harvest
from sae_lightning.data.stream import BatchStream

from ..conftest import compose_config
from ..helpers.harvest import spec_for

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


def test_the_plan_holds_the_batches_our_loader_yields_in_order(tiny_lm, corpus_file, tmp_path):
    cache = tmp_path / "cache"
    harvest(
        cache, spec_for(tiny_lm, corpus_file, token_budget=1500, shard_tokens=256), progress=False, log=lambda *a: None
    )
    overrides = ["data.calibration_tokens=90", "data.shuffle_buffer_tokens=256"]
    a = argparse.Namespace(data="cache", cache=cache, batch=64, heldout=100, tokens=64 * 40, data_overrides=overrides,
                           latents=128, k=4, lr=1e-3, threads=1)  # fmt: skip
    path = plan(a, tmp_path)
    p, shards, starts = load_plan(path)
    order = np.load(p["order"])
    assert order.shape == (40, 64)  # more batches than one epoch holds: the order goes on into the next
    from sae_lightning.config import load_config

    cfg = compose_config(["data=cache", f"data.path={cache}", "data.batch_size=64", "data.val_tokens=100", *overrides])
    dm = load_config(cfg).data.build()
    dm.open()
    assert dm.n_batches < 40
    stream = iter(BatchStream(dm.batch_of(), start=0))
    for j in range(40):
        assert torch.equal(next(stream).float(), gather(shards, starts, order[j]))
    assert json.loads(path.read_text())["heldout"] == list(dm.val_range)


def test_the_adopted_row_is_todays_default_and_ours_is_the_old_recipe():
    """docs/parity.md says so: every row starts from OLD_RECIPE, and the adopted row then equals
    the defaults of every variant (the recipe is shared)."""
    from benchmarks.parity import ABLATIONS, ADOPTED, OLD_RECIPE
    from sae_lightning.config import load_config

    from ..conftest import compose_config

    for variant in ("topk", "mutual_choice", "feature_choice"):
        default = load_config(compose_config([f"variant={variant}"])).as_dict()
        adopted = load_config(compose_config([f"variant={variant}", *OLD_RECIPE, *ABLATIONS[ADOPTED]])).as_dict()
        old = load_config(compose_config([f"variant={variant}", *OLD_RECIPE])).as_dict()
        assert adopted == default
        assert old["optim"]["warmup_steps"] == 100 and old["model"]["decoder_norm"] == "unit"
        assert old["variant"]["losses"]["recon"]["scale"] == "second_moment" and old != default
