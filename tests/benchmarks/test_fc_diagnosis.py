"""benchmarks.fc_diagnosis on two tiny synthetic runs: its figures are consistent."""

from __future__ import annotations

import pytest

from benchmarks import fc_diagnosis
from sae_lightning.train import run

from ..conftest import TINY, compose_config

pytestmark = pytest.mark.slow


def test_the_diagnosis_reads_both_saes_at_l0_k(tmp_path):
    runs = {}
    for variant in ("topk", "feature_choice"):
        runs[variant] = tmp_path / variant
        cfg = [*TINY, f"variant={variant}", "variant.k=8", "trainer.max_steps=60", "trainer.val_check_interval=60",
               "progress=none"]  # fmt: skip
        if variant == "feature_choice":
            cfg.append("variant.threshold_ema_warmup_steps=20")
        run(compose_config(cfg), runs[variant])
    d = fc_diagnosis.diagnose(runs["topk"], runs["feature_choice"])
    assert d["k"] == 8 and d["fc_l0"]["mean"] == pytest.approx(8, rel=0.02)  # read at L0 = k on these tokens
    assert 0 < d["fvu_topk"] < 1.5 and 0 < d["fvu_fc"] < 1.5
    assert sum(b["tokens"] for b in d["buckets"]) == pytest.approx(1.0)
    # the buckets' excess errors add up to the FVU difference
    assert sum(b["fvu_excess"] for b in d["buckets"]) == pytest.approx(d["fvu_fc"] - d["fvu_topk"], abs=1e-9)
    assert len(d["fc_l0_by_topk_error_decile"]) == 10 and -1 <= d["spearman_fc_l0_vs_topk_rel_error"] <= 1
    assert d["latents"]["theta_cal_over_ema_median"] > 0  # the EMA has run
    fc_diagnosis.figure("toy", d, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
