import math

import pytest
import torch

from sae_lightning.metrics import L0, Firing, Reconstruction, feature_recovery


def test_fvu_and_nmse_match_their_definitions_over_batches():
    x = torch.randn(300, 7) + 2
    x_hat = x + 0.3 * torch.randn(300, 7)
    m = Reconstruction(7)
    for a, b in zip(x.split(64), x_hat.split(64)):
        m.update(a, b)
    out = m.compute()
    sse = (x - x_hat).pow(2).sum()
    assert torch.allclose(out["fvu"].float(), sse / (x - x.mean(0)).pow(2).sum(), rtol=1e-5)
    assert torch.allclose(out["nmse"].float(), sse / x.pow(2).sum(), rtol=1e-5)


def test_l0_distribution():
    m = L0(10)
    m.update(torch.tensor([0, 2, 2, 4]))
    m.update(torch.tensor([10]))
    out = m.compute()
    assert float(out["l0_mean"]) == 3.6 and float(out["l0_max"]) == 10
    assert float(out["l0_p50"]) == 2 and float(out["l0_zero_fraction"]) == 0.2


def test_firing_density_and_never_fired():
    m = Firing(4)
    m.update(torch.tensor([2, 0, 1, 0]), 10)
    m.update(torch.tensor([0, 0, 1, 0]), 10)
    out = m.compute()
    assert out["density"].tolist() == [0.1, 0.0, 0.1, 0.0] and float(out["never_fired_fraction"]) == 0.5


def test_feature_recovery():
    true = torch.eye(4, 8)
    dec = torch.cat([torch.eye(8)[:3], torch.randn(5, 8) * 0.01 + torch.eye(8)[7]])
    out = feature_recovery(true, dec)
    assert out["recovery_share_above_0.9"] == 0.75
    assert 0.75 < out["recovery_mean_max_cos"] < 1.0


def core(x, x_hat):
    m = Reconstruction(x.shape[1])
    for a, b in zip(x.split(50), x_hat.split(50)):
        m.update(a, b)
    return {k: float(v) for k, v in m.compute().items()}


def test_core_reconstruction_figures_of_stand_ins_with_known_answers():
    """SAEBench's core figures: x̂ = x is perfect; x̂ = 0 explains nothing and has no length;
    x̂ = 2x points the right way at twice the length (bias 2, explained variance 1 − 1 = 0)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) + 1.5
    perfect = core(x, x.clone())
    assert perfect["fvu"] == 0 and perfect["explained_variance"] == pytest.approx(1)
    assert perfect["cossim"] == pytest.approx(1) and perfect["l2_ratio"] == pytest.approx(1)
    assert perfect["relative_reconstruction_bias"] == pytest.approx(1)
    zero = core(x, torch.zeros_like(x))
    assert zero["explained_variance"] == pytest.approx(0, abs=1e-9) and zero["cossim"] == 0 and zero["l2_ratio"] == 0
    assert zero["fvu"] == pytest.approx(float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6)
    assert math.isnan(zero["relative_reconstruction_bias"])
    double = core(x, 2 * x)
    assert double["cossim"] == pytest.approx(1) and double["l2_ratio"] == pytest.approx(2)
    assert double["relative_reconstruction_bias"] == pytest.approx(2)
    assert double["explained_variance"] == pytest.approx(0, abs=1e-9)
    shifted = core(x, x + 0.7)  # a constant offset: explained variance ignores it, FVU does not
    assert shifted["explained_variance"] == pytest.approx(1) and shifted["fvu"] > 0.1


def test_firing_alive_fraction_and_density_summary():
    m = Firing(4)
    m.update(torch.tensor([3, 0, 1, 2]), 10)
    out = m.compute()
    assert float(out["alive_fraction"]) == 0.75
    assert float(out["density_mean"]) == pytest.approx(0.15) and float(out["density_median"]) == pytest.approx(0.1)


def test_a_registered_validation_metric_is_computed_for_every_mode_without_touching_the_module(tmp_path, capsys):
    """The seam: one registered class adds a figure to every validation (and to measure())."""
    from sae_lightning.config import load_config
    from sae_lightning.metrics import VALIDATION_METRICS, ValidationMetric, validation_metric
    from sae_lightning.module import SAEModule

    from .conftest import TINY, compose_config

    @validation_metric("max_abs_error")
    class MaxAbsError(ValidationMetric):
        full_state_update = False
        summary = {"max |x - x̂|": lambda f: f"{f['max_abs_error']:.3f}"}

        def __init__(self):
            super().__init__()
            self.add_state("worst", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

        @classmethod
        def build(cls, d_model, n_latents):
            return cls()

        def update(self, x, x_hat):
            self.worst = torch.maximum(self.worst, (x - x_hat).abs().max().to(torch.float64))

        def observe(self, x, x_hat, code):
            self.update(x, x_hat)

        def compute(self):
            return {"max_abs_error": self.worst}

    try:
        module = SAEModule(load_config(compose_config(["variant=topk", "variant.k=8", *TINY])), 32)
        assert set(module.val_metrics["batch"]) == {"recon", "l0", "firing", "max_abs_error"}
        x = torch.randn(256, 32)
        figures = module.measure(x, "batch")
        x_hat = module.reconstruct(x, "batch")
        assert figures["max_abs_error"] == pytest.approx(float((x - x_hat).abs().max()), rel=1e-6)
        assert {"fvu", "l0_mean", "alive_fraction"} <= set(figures)
        # a whole run: in metrics.json and in the summary's table, as a column of its own
        from sae_lightning.train import run

        cfg = ["variant=topk", "variant.k=8", *TINY, "trainer.max_steps=4", "trainer.val_check_interval=4"]
        metrics = run(compose_config([*cfg, "progress=none", "evaluation.test_rules=none"]), tmp_path)
        assert metrics["val/threshold/max_abs_error"] > 0
        header = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("mode "))
        assert "max |x - x̂|" in header
    finally:
        VALIDATION_METRICS.pop("max_abs_error")
