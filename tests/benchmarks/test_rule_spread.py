"""benchmarks/rule_spread.py on a short run laid out as a claims grid cell: each rule measured on
the run's test split, recorded once (a second call measures nothing), and the page's rows."""

from __future__ import annotations

import json

from benchmarks import rule_spread
from sae_lightning.rules import RULES


def test_a_grid_run_is_measured_once_and_tabled(cache_run, tmp_path):
    cell = tmp_path / "out" / "minilm" / "mc+aux_zipf" / "k4_s0" / "runs"
    cell.mkdir(parents=True)
    (cell / cache_run.name).symlink_to(cache_run)
    args = ["--out", str(tmp_path / "out"), "--records", str(tmp_path / "rec"), "--datasets", "minilm"]
    args += ["--configs", "mc+aux_zipf", "--k", "4"]
    (path,) = rule_spread.main(args)
    assert path == tmp_path / "rec" / "minilm" / "mc_aux_zipf" / "k4_s0.json"
    rec = json.loads(path.read_text())
    assert rec["own_rule"] == "global_threshold" and rec["k"] == 4 and set(rec["rules"]) == set(RULES)
    topk = rec["rules"]["topk"]
    assert set(topk["l0_quantiles"].values()) == {4.0} and topk["tokens_over_wide"] == 0.0
    for s in rec["rules"].values():
        assert s["fvu"] > 0 and 0 <= s["error_share_over_wide"] <= 1
    assert rule_spread.main(args) == []  # recorded: not measured again
    lines = rule_spread.table(tmp_path / "rec", "minilm")
    rows = [x for x in lines if x.startswith("| mc+aux_zipf (k4_s0)")]
    assert len(rows) == 3 and "| **global_threshold** |" in rows[1]
    assert rule_spread.table(tmp_path / "rec", "smollm2") == []
