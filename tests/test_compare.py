import json

from sae_lightning.compare import table


def test_table_has_a_row_per_run(tmp_path):
    m = {
        "variant": "topk",
        "k": 8,
        "tokens": 1e6,
        "val/batch/fvu": 0.25,
        "val/threshold/fvu": 0.26,
        "val/batch/l0_mean": 8,
        "val/threshold/l0_mean": 8.3,
        "val/batch/l0_p10": 8,
        "val/batch/l0_p50": 8,
        "val/batch/l0_p90": 8,
        "val/batch/l0_max": 8,
        "val/batch/l0_std": 0,
        "val/dead_fraction": 0.1,
        "val/batch/never_fired_fraction": 0.05,
        "tokens_per_second": 1000.0,
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    (tmp_path / "empty").mkdir()
    out = table([tmp_path / "a", tmp_path / "b", tmp_path / "empty"]).splitlines()
    assert len(out) == 4 and out[2].startswith("| topk | 8 | 1.00M | 0.2500 | 0.2600 |")
    assert "10.0%" in out[2] and "recovery" not in out[0] and "ΔCE" not in out[0]  # columns nobody has are left out
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "metrics.json").write_text(
        json.dumps({**m, "val/batch/delta_ce": 0.1234, "val/batch/loss_recovered": 0.9})
    )
    out = table([tmp_path / "a", tmp_path / "c"]).splitlines()
    assert "ΔCE (batch)" in out[0] and "ΔCE (threshold)" not in out[0]
    assert "| 0.123 | 90.0% |" in out[3] and "| - | - |" in out[2]
