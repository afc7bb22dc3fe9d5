"""Dark matter (Engels et al.): the share of the SAE's error that is linearly predictable from x."""

from __future__ import annotations

import json

import pytest
import torch

from sae_lightning.evaluate import dark_matter
from sae_lightning.evaluate import main as evaluate

from .conftest import TINY


class StandIn:
    """An 'SAE' whose error e = x − x̂ is whatever the test says."""

    device = torch.device("cpu")

    def __init__(self, error):
        self.error = error

    def reconstruct(self, x, mode):
        return x - self.error(x)


def data(n=4000, d=16):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3.0


def test_an_error_linear_in_x_is_all_dark_matter_and_independent_noise_none():
    x = data()
    A = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)) * 0.1
    linear = dark_matter(StandIn(lambda v: v @ A), x, lam=1e-8)
    assert linear["error_variance_linearly_predictable"] > 0.999 and linear["fvu_nonlinear_error"] < 1e-4
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * 0.3
    lookup = {}

    def independent(v):  # the same noise for the same tokens, unrelated to them
        return noise[: v.shape[0]] if v.shape[0] == x.shape[0] else lookup.setdefault(v.shape[0], noise[: v.shape[0]])

    random = dark_matter(StandIn(independent), x, lam=1e-3)
    assert random["error_variance_linearly_predictable"] < 0.05 and random["error_norm_predictable"] < 0.05
    for figures in (linear, random):
        assert figures["fvu_linear_error"] + figures["fvu_nonlinear_error"] == pytest.approx(figures["fvu"], rel=1e-9)


def test_the_norm_of_an_error_that_scales_with_x_is_predictable():
    x = data()
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(3)), dim=0)
    noise = torch.randn(x.shape[0], 16, generator=torch.Generator().manual_seed(4))
    low = float((x @ direction).min())
    # the error's direction is random, its size grows linearly with a projection of x
    figures = dark_matter(StandIn(lambda v: torch.nn.functional.normalize(noise[: v.shape[0]], dim=1)
                                  * (v @ direction - low + 0.1).unsqueeze(1)), x)  # fmt: skip
    assert figures["error_norm_predictable"] > 0.99 and figures["error_variance_linearly_predictable"] < 0.05


def test_the_command_writes_its_report(cli, tmp_path, capsys):
    r = cli("train.py", f"out_dir={tmp_path}", *TINY, "variant=topk", "variant.k=8", "trainer.max_steps=20",
            "progress=none")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    core = evaluate([str(run), "--device", "cpu"])  # no ΔCE on synthetic data: what applies, not a refusal
    said = capsys.readouterr().out
    assert "no ΔCE (it splices the SAE into a causal language model" in said and "synthetic data" in said
    assert "--dark-matter" in said and "FVU" in said
    assert json.loads((run / "core.json").read_text())["threshold/fvu"] == core["threshold/fvu"] > 0
    figures = evaluate([str(run), "--dark-matter", "--device", "cpu"])
    saved = json.loads((run / "dark_matter.json").read_text())
    # the test split alone (512 tokens, as many as validation), half fitted, half scored
    assert saved["tokens_scored"] == 512 // 2 and 0 <= saved["error_variance_linearly_predictable"] <= 1
    assert saved == pytest.approx(figures)
    # every inference rule on the test split, with the own rule's figures the run's own
    rules = evaluate([str(run), "--rule", "all", "--no-dl", "--device", "cpu"])
    said = capsys.readouterr().out
    assert "topk" in said and "global_threshold" in said and "latent_thresholds" in said and "test split" in said
    saved_rules = json.loads((run / "rules_test.json").read_text())
    assert saved_rules["own_rule"] == "topk" and set(saved_rules["rules"]) == {"topk", "global_threshold",
                                                                              "latent_thresholds"}  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert rules["rules"]["topk"]["figures"]["fvu_at_k"] == pytest.approx(metrics["test/fvu_at_k"], rel=1e-9)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert "dark_matter/error_norm_predictable" in acc.Tags()["scalars"]


def test_core_figures_of_a_run_on_a_causal_cache(cache_run, capsys):
    """evaluate --core: every core figure and the description length for both modes, and the
    KL divergence / CE loss score of the SAE spliced into the model; the final validation of
    training wrote the description length to metrics.json as well."""
    figures = evaluate([str(cache_run), "--core", "--contexts", "4", "--device", "cpu"])
    assert figures["modes"] == ["batch", "threshold"]
    for mode in figures["modes"]:
        assert 0 < figures[f"{mode}/fvu"] < 1 and 0 < figures[f"{mode}/cossim"] <= 1
        assert 0 <= figures[f"{mode}/kl_div"] < figures["kl_zero_ablation"]
        assert figures[f"{mode}/kl_div_score"] < 1 and figures[f"{mode}/loss_recovered"] < 1
        assert 0 < figures[f"{mode}/description_length"] < figures[f"{mode}/dl_naive_bits"]
    assert json.loads((cache_run / "core.json").read_text())["threshold/fvu"] == figures["threshold/fvu"]
    table = capsys.readouterr().out
    assert "description length (bits/token)" in table and "KL divergence score" in table
    metrics = json.loads((cache_run / "metrics.json").read_text())
    assert metrics["val/threshold/description_length"] > 0 and metrics["val/batch/dl_tolerance"] == 0.01


def test_core_refuses_a_bad_tolerance(cache_run, capsys):
    with pytest.raises(SystemExit) as e:
        evaluate([str(cache_run), "--core", "--tolerance", "0"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--tolerance=0.0 is not allowed; expected a number > 0" in err
