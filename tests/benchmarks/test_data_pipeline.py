"""The data-pipeline benchmark runs on a tiny model and reports consistent figures."""

from __future__ import annotations

import pytest

from benchmarks.data_pipeline import harvest_bench, loader_bench
from sae_lightning.data.activations import ActivationsData
from sae_lightning.data.harvest import harvest

from ..helpers.harvest import spec_for

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


def test_pipeline_benchmark_figures(tiny_lm, corpus_file, tmp_path):
    h = harvest_bench(spec_for(tiny_lm, corpus_file), tokens=300)
    assert 240 <= h["tokens"] <= 300 and h["d_model"] == 32 and h["site"] == "blocks.0.resid_post"
    assert h["bare_forward_to_site_tok_s"] > 0 and h["harvest_tok_s"] > 0 and 0 < h["harvest_vs_bare"]

    harvest(tmp_path / "cache", spec_for(tiny_lm, corpus_file, token_budget=800), progress=False, log=lambda *a: None)
    data = ActivationsData(
        kind="activations", path=str(tmp_path / "cache"), batch_size=32, val_tokens=64, calibration_tokens=64
    )
    assert loader_bench(data, batches=10, workers=0) > 0
