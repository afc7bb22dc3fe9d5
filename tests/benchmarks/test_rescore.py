"""benchmarks.rescore at a tiny size: every variant compared at every step, nothing missed."""

import json

from benchmarks import rescore


def test_rescore_benchmark_counts_every_step(tmp_path):
    out = tmp_path / "rescore.json"
    rows = rescore.main(
        ["--d", "16", "--latents", "128", "--k", "4", "--batch", "64", "--steps", "3", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert (
        [r["variant"] for r in saved["rows"]]
        == ["topk", "mutual_choice", "feature_choice"]
        == [r["variant"] for r in rows]
    )
    for r in rows:
        assert r["steps"] == 3 and 0 < r["pairs"] <= 3 * 4 * 64
        assert r["misses"] == 0  # the margin holds the fp32 selection
        assert 0 <= r["only_fp32"] <= r["pairs"] // 1000 + 2 and r["steps_with_difference"] <= 3


def test_rescore_benchmark_on_a_finished_run(cache_run, tmp_path):
    """--runs: a finished run's SAE on its own calibration tokens (real activations)."""
    rows = rescore.main(["--runs", str(cache_run), "--out", str(tmp_path / "runs.json")])
    (row,) = rows
    assert row["variant"] == "mutual_choice" and row["run"] == str(cache_run)
    assert row["steps"] == 256 // 64 and 0 < row["pairs"] <= row["steps"] * 4 * 64
    assert row["misses"] == 0
