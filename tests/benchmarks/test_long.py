"""benchmarks.long at toy size: a run's learning curve and final figures are recorded, a
recorded run is not trained again, and the page is built from the records."""

from __future__ import annotations

import json

import pytest

from benchmarks import long

from ..conftest import TINY

pytestmark = pytest.mark.slow


def test_long_runs_record_learning_curves_and_build_the_page(tmp_path, monkeypatch):
    monkeypatch.setattr(long, "BATCH", 256)
    monkeypatch.setattr(long, "VAL_EVERY_TOKENS", 256 * 10)
    monkeypatch.setattr(long, "COMMON", ["variant.k=8", "calibration.every_validation=true", "progress=none"])
    monkeypatch.setattr(long, "DATASETS", {"minilm_docs": {"args": [*TINY], "tokens": 256 * 30, "title": "toy"}})
    monkeypatch.setattr(long, "CONFIGS", {"topk+aux_k": ["variant=topk"], "mc": ["variant=mutual_choice"]})
    page = tmp_path / "docs" / "long_runs.md"
    monkeypatch.setattr(long, "ROOT", tmp_path)  # the page and its image under tmp
    monkeypatch.setattr(long, "GRID", {})  # no published grid for the toy data
    records = tmp_path / "records"
    for config in ("topk+aux_k", "mc"):
        for seed in (0, 1):
            rec = long.run_one(tmp_path / "out", records, "minilm_docs", config, seed, threads=1)
            assert rec is not None
            assert [p["tokens"] for p in rec["curve"]] == [2560, 5120, 7680]  # a validation every 10 steps
            assert all(0 < p["fvu_at_k"] < 2 and 0 <= p["dead"] <= 1 for p in rec["curve"])
            assert rec["final"]["test/fvu_at_k"] > 0
            assert rec["test_sums"]["k"] == 8 and rec["test_sums"]["rule"] in ("topk", "global_threshold")
            assert rec["affinity_dtype"] in ("float32", "bfloat16")
    # recorded: not trained again (the run folders may go)
    import shutil

    shutil.rmtree(tmp_path / "out")
    again = long.run_one(tmp_path / "out", records, "minilm_docs", "mc", 0, threads=1)
    assert again == json.loads((records / "minilm_docs" / "mc_s0.json").read_text())
    assert not (tmp_path / "out").exists()
    text = long.report(records, page)
    assert page.read_text() == text and (page.parent / "img" / "long_minilm_docs.png").stat().st_size > 0
    row = [line for line in text.splitlines() if line.startswith("| mc |")][-1].split(" | ")  # against TopK
    assert (row[-2] == "holds" or " → " in row[-2]) and row[-1] == "— |" and row[1] == "—"  # no grid here
    # the end on test: a bootstrap interval over the two seeds and the test contexts
    assert row[4].endswith(("(better)", "(worse)", "(tie)")) and "[" in row[4]
    # a record made in a tree with uncommitted changes is named on the page; clean ones are not
    for path in sorted((records / "minilm_docs").glob("*.json")):
        rec = json.loads(path.read_text())
        rec["code"]["dirty"] = path.name == "mc_s1.json"
        path.write_text(json.dumps(rec))
    text = long.report(records, page)
    assert "with changes the commit does not hold: mc seed 1." in text
    for path in (records / "minilm_docs").glob("*.json"):
        rec = json.loads(path.read_text())
        rec["code"]["dirty"] = False
        path.write_text(json.dumps(rec))
    assert "commit does not hold" not in long.report(records, page)


def test_the_published_column_is_the_grid_of_the_results_page():
    from pathlib import Path

    page = (Path(long.__file__).parents[1] / "docs" / "results.md").read_text()
    for dataset, config, grid_config in (
        ("minilm_docs", "fc_demand", "fc_demand"),
        ("smollm2_docs", "mc", "mc+aux_zipf"),
    ):
        d = long.published(dataset, config)
        assert d is not None and d.seeds == 3
        row = next(line for line in page.splitlines() if line.startswith(f"| {long.GRID[dataset]} | 32 |"))
        header = next(line for line in page.splitlines() if line.startswith("| data | k | mc+aux_k vs"))
        column = header.split(" | ").index(f"{grid_config} vs topk+aux_k")
        assert row.split(" | ")[column].startswith(str(d))
    assert long.published("minilm_docs", "no such config") is None
