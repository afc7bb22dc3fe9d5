"""benchmarks.gradient_ranking: the claim's verdict, the page, resuming what is there."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from benchmarks import gradient_ranking as gr

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


def metrics(fvu: float, dce: float) -> dict:
    return {
        "val/threshold/fvu_at_k": fvu,
        "val/threshold/l0_mean": 32.1,
        "val/threshold/delta_ce": dce,
        "val/threshold/kl_div": dce * 0.9,
        "val/batch/fvu": fvu * 0.95,
        "val/batch/delta_ce": dce * 0.9,
        "val/dead_fraction": 0.0,
    }


def args(tmp_path, **kw):
    return SimpleNamespace(k=32, steps=1000, seeds=[0, 1, 2], betas=[0.0, 0.5, 2.0], out=tmp_path, **kw)


def test_the_claim_holds_only_beyond_the_seeds_spread(tmp_path):
    results = {}
    for s in range(3):
        results[("topk+aux_k", 0.0, s)] = metrics(0.10, 0.30 + 0.01 * s)
        results[("topk+aux_k", 2.0, s)] = metrics(0.11, 0.20 + 0.01 * s)  # clearly better ΔCE
        results[("mc+aux_zipf", 0.0, s)] = metrics(0.10, 0.30 + 0.05 * s)
        results[("mc+aux_zipf", 2.0, s)] = metrics(0.10, 0.29 + 0.05 * s)  # inside the spread
    results[("fc_demand", 0.0, 0)] = metrics(0.10, 0.30)
    results[("fc_demand", 2.0, 0)] = metrics(0.10, 0.20)  # one seed each: no spread to judge by
    text = gr.report(results, args(tmp_path), tmp_path / "page.md")
    verdicts = text.split("## Every figure")[0]
    row = {line.split(" | ")[0].strip("| "): line for line in verdicts.splitlines() if line.startswith("| ")}
    assert "β = 2: ΔCE 0.2100 vs 0.3100" in row["topk+aux_k"] and ": holds)" in row["topk+aux_k"]
    assert "FVU 0.1100 vs 0.1000 (+10.0 %)" in row["topk+aux_k"]
    assert "does not hold" in row["mc+aux_zipf"]
    assert "not judged: 1 seed" in row["fc_demand"] and "holds" not in row["fc_demand"]
    assert "14 of 14 runs are in" in text
    assert (tmp_path / "page.md").read_text() == text


def test_finished_runs_are_read_and_not_trained_again(tmp_path, monkeypatch):
    folder = gr.folder_of(tmp_path, "topk+aux_k", 0.5, 1)
    (folder / "runs" / "r1").mkdir(parents=True)
    (folder / "runs" / "r1" / "metrics.json").write_text(json.dumps(metrics(0.1, 0.2)))
    monkeypatch.setattr(gr, "train_in_subprocess", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    assert gr.run_one(tmp_path, "topk+aux_k", 0.5, 1, 32, [], tmp_path / "cache", 1) == metrics(0.1, 0.2)
    # a stopped run is resumed from its checkpoint with the run's own config
    other = gr.folder_of(tmp_path, "mc+aux_zipf", 0.5, 0)
    (other / "runs" / "r2" / "checkpoints").mkdir(parents=True)
    (other / "runs" / "r2" / "checkpoints" / "last.ckpt").write_text("x")
    seen = []
    monkeypatch.setattr(gr, "train_in_subprocess", lambda a, *rest: seen.append(a) or False)
    assert gr.run_one(tmp_path, "mc+aux_zipf", 0.5, 0, 32, [], tmp_path / "cache", 1) is None
    assert seen == [[f"resume={other / 'runs' / 'r2'}", "progress=none"]]
