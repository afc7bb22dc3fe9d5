"""benchmarks.rescore at a tiny size: every variant compared at every step, nothing missed."""

import json

import pytest

from benchmarks import rescore

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


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
        assert 0 <= r["least_slack"] < 1 << 62  # measured, and the margins held, with room to spare


def test_rescore_benchmark_on_a_finished_run(cache_run, tmp_path):
    """--runs: a finished run's SAE on its own calibration tokens (real activations)."""
    rows = rescore.main(["--runs", str(cache_run), "--out", str(tmp_path / "runs.json")])
    (row,) = rows
    assert row["variant"] == "mutual_choice" and row["run"] == str(cache_run)
    assert row["steps"] == 256 // 64 and 0 < row["pairs"] <= row["steps"] * 4 * 64
    assert row["misses"] == 0


def test_depth_of_the_fp32_selection_in_the_bf16_order():
    """_depth: 0 where both orders agree; a pair the low-precision order ranks one place beyond
    the cut, one bf16 step below it, is 1 deep in both, and the slack is the band less that."""
    import torch

    from sae_lightning.rescore import ROW_BAND
    from sae_lightning.selection import topk_per_row

    z32 = torch.arange(40.0).flip(0).repeat(3, 1)  # every row 39, 38, ..., 0: distinct values
    sel, _ = topk_per_row(z32, 4)
    assert rescore._depth("token", sel, z32, z32.to(torch.bfloat16)) == (0, 0, ROW_BAND)
    z16 = z32.to(torch.bfloat16)
    z16[1, 3], z16[1, 4] = 35.75, 36.0  # row 1: its 4th fp32 entry ranks 5th in the other order
    # 36 is the bf16 value at the cut's rank (4th), 35.75 the worst selected: one bf16 step below
    assert rescore._depth("token", sel, z32, z16) == (1, 1, ROW_BAND - 1)
    assert rescore._depth("batch", sel, z32, z32.to(torch.bfloat16))[0] >= 0
