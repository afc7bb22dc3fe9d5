"""benchmarks.memory and benchmarks.passes at a tiny size: every row and figure is there, the
report resumes, and the pass counts see the product's write (no timing assertions)."""

import json

import pytest

from benchmarks import memory, passes

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


def test_memory_rows_resume_and_resolve_auto_blocks(tmp_path):
    out = tmp_path / "memory.json"
    args = ["--latents", "64", "--variants", "topk", "--d", "16", "--k", "4", "--batch", "32"]
    args += ["--steps", "1", "--warmup", "1", "--out", str(out)]
    rows = memory.main([*args, "--block-latents", "default", "16"])
    assert {(r["block"], r["block_latents"]) for r in rows} == {("default", None), ("16", 16)}
    for r in rows:
        assert r["peak_rss_bytes"] > 2**20 and r["step_s"] > 0
        assert r["state_bytes"] == 32 * 64 * 16 and r["dense_affinities_bytes"] == 4 * 32 * 64
    assert out.with_suffix(".png").stat().st_size > 0
    again = memory.main([*args, "--block-latents", "default", "16", "null"])  # only null is new
    assert len(again) == 3 and len(json.loads(out.read_text())["rows"]) == 3


def test_passes_count_the_product_and_selection(tmp_path):
    rows = passes.main(
        ["--d", "16", "--latents", "128", "--k", "4", "--batch", "64", "--out", str(tmp_path / "p.json")]
    )
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"topk", "mutual_choice", "feature_choice"}
    for r in rows:
        assert r["writes"]["addmm.default"] == 1.0  # the affinity matrix, written once
        assert r["passes"] >= 2.0  # and read at least once by selection
