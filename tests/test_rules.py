"""Inference rules (rules.py): known answers on a stand-in SAE, L0 = k on the calibration tokens
for every rule on trained SAEs, and the own rule equal to the run's threshold mode."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.config import load_config
from sae_lightning.module import SAEModule, fvu_at_l0
from sae_lightning.rules import RULES, Reader, evaluate_rules, own_rule, reader, rules_of, score, token_spread
from sae_lightning.train import run

from .conftest import TINY, compose_config

VARIANTS = ["topk", "mutual_choice", "feature_choice"]


def stand_in(k: int = 2, F: int = 8) -> SAEModule:
    """An identity SAE (z′ = x, x̂ = the selected entries of x) trained as TopK: every rule's
    answer can be written down."""
    cfg = load_config(compose_config(["variant=topk", f"variant.k={k}", f"model.n_latents={F}",
                                      "model.normalisation=none", "data.batch_size=16"]))  # fmt: skip
    module = SAEModule(cfg, F).eval()
    with torch.no_grad():
        module.sae.W_enc.copy_(torch.eye(F))
        module.sae.b_enc.zero_()
        module.sae.b_pre.zero_()
        module.sae.W_dec.copy_(torch.eye(F))
    return module


def test_topk_rule_reads_each_tokens_k_largest():
    module = stand_in()
    x = torch.rand(64, 8) + 0.01
    rd = reader(module, "topk", torch.rand(64, 8))
    sums = score(module, rd, x, torch.arange(64) // 16)
    top = torch.zeros_like(x).scatter(1, x.topk(2, dim=1).indices, x.topk(2, dim=1).values)
    want = float((x - top).double().pow(2).sum() / (x.double() - x.double().mean(0)).pow(2).sum())
    assert sums.factors == [1.0] and abs(sums.fvu_at(2) - want) < 1e-9
    assert torch.equal(sums.nnz[:, 0], torch.full((4,), 32.0, dtype=torch.float64))  # 16 tokens × k per context


def test_global_threshold_is_the_k_n_th_largest_calibration_value():
    module = stand_in()
    cal = torch.rand(100, 8) + 0.01
    rd = reader(module, "global_threshold", cal)
    want = cal.flatten().sort(descending=True).values[2 * 100]  # the (kN + 1)-th largest
    assert rd.theta is not None and torch.allclose(rd.theta, want)
    assert rd.l0_calibration == 2.0
    # scored at θ (factor 1): x̂ keeps the entries above θ
    x = torch.rand(50, 8) + 0.01
    sums = score(module, rd, x, torch.zeros(50, dtype=torch.long))
    kept = torch.where(x > want, x, torch.zeros_like(x))
    one = sums.factors.index(1.0)
    assert abs(float(sums.sse[0, one]) - float((x - kept).double().pow(2).sum())) < 1e-6
    assert float(sums.nnz[0, one]) == float((x > want).sum())


def test_latent_thresholds_repeat_each_latents_firing_count_of_the_training_allocation():
    """A TopK-trained SAE: θ_j makes latent j fire on the calibration tokens as often as TopK
    makes it fire there (before the one factor that sets L0 = k, which is 1 here: the counts
    already add up to k·N)."""
    module = stand_in()
    cal = torch.rand(200, 8) * torch.linspace(0.2, 2.0, 8) + 0.01  # latents of unequal demand
    rd = reader(module, "latent_thresholds", cal)
    counts = torch.zeros(8).scatter_add_(0, cal.topk(2, dim=1).indices.flatten(), torch.ones(400))
    assert rd.theta is not None
    assert torch.equal((cal > rd.theta).sum(0).float(), counts)
    for j in range(8):  # θ_j is latent j's (count_j + 1)-th largest value
        c = int(counts[j])
        assert rd.theta[j] == (cal[:, j].sort(descending=True).values[c] if c < 200 else 0.0)


def test_token_spread_finds_the_tokens_that_take_many_latents_and_their_error():
    """Identity SAE, one threshold 1, k = 2: a token of eight 5s takes all 8 latents (> 2k) and is
    reconstructed exactly; a token of eight 0.5s takes none and keeps all its error."""
    module = stand_in(k=2, F=8)
    x = torch.cat([torch.full((1, 8), 5.0), torch.full((1, 8), 0.5)])
    got = token_spread(module, Reader("global_threshold", torch.tensor(1.0), 2, 2.0), x)
    total = 2 * 8 * 2.25**2  # each token 2.25 from the mean on each of 8 dimensions
    assert got["fvu"] == pytest.approx(8 * 0.25 / total) and got["l0_mean"] == 4.0
    assert got["l0_quantiles"] == pytest.approx({"10": 0.8, "50": 4.0, "90": 7.2, "99": 7.92})
    assert got["tokens_over_wide"] == 0.5 and got["error_share_over_wide"] == 0.0
    assert got["fvu_others"] == pytest.approx(got["fvu"])
    # k per token: nobody over 2k
    topk = token_spread(module, Reader("topk", None, 2, 2.0), x)
    assert topk["l0_quantiles"] == {"10": 2.0, "50": 2.0, "90": 2.0, "99": 2.0} and topk["tokens_over_wide"] == 0.0


def test_rule_names_and_the_own_rule():
    module = stand_in()
    assert own_rule(module) == "topk" and rules_of(module, "own") == ["topk"] and rules_of(module, "all") == list(RULES)
    from sae_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="'bogus' is not allowed"):
        rules_of(module, "bogus")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    runs = {}
    for variant in VARIANTS:
        run_dir = tmp_path_factory.mktemp(variant)
        warm = ["variant.threshold_ema_warmup_steps=20"] if variant != "topk" else []
        cfg = compose_config([f"variant={variant}", "variant.k=8", *TINY, "trainer.max_steps=100", "progress=none",
                              *warm])  # fmt: skip
        runs[variant] = (run_dir, run(cfg, run_dir))
    return runs


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rule_gives_l0_k_on_the_calibration_tokens_of_a_trained_sae(trained, variant):
    run_dir, metrics = trained[variant]
    module = SAEModule.load_from_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    dm = module.hparams  # the run's data, rebuilt
    from sae_lightning.data import build_datamodule

    data = build_datamodule(dm["config"]["data"])
    cal = data.calibration_tokens()
    for rule in RULES:
        rd = reader(module, rule, cal)
        l0 = rd.encode(module)(cal)[0].l0_per_token().double().mean().item()
        assert abs(l0 - 8) <= 0.01 * 8, (variant, rule, l0)
        assert abs(rd.l0_calibration - l0) < 1e-9
    # the run scored every rule on its test split, with the headline under test/
    own = own_rule(module)
    assert metrics["test/own_rule"] == own
    for rule in RULES:
        assert abs(metrics[f"test/{rule}/l0_calibration_tokens"] - 8) <= 0.01 * 8
        assert 0 < metrics[f"test/{rule}/fvu_at_k"] < 1
    assert metrics["test/fvu_at_k"] == metrics[f"test/{own}/fvu_at_k"] and metrics["test/dl_at_k"] > 0
    assert any(run_dir.glob("**/rules_test.json"))


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_own_rule_on_validation_is_the_runs_headline(trained, variant):
    """Scored on the validation tokens, the own rule gives the validation's headline: the same
    thresholds, the same factors, the same interpolation."""
    run_dir, metrics = trained[variant]
    module = SAEModule.load_from_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    from sae_lightning.data import build_datamodule

    data = build_datamodule(module.hparams["config"]["data"])
    found = evaluate_rules(module, data.calibration_tokens(), data.val_tensor(), data.contexts("validation"),
                           [own_rule(module)])  # fmt: skip
    figures = found[own_rule(module)]["figures"]
    assert figures["fvu_at_k"] == pytest.approx(metrics["val/threshold/fvu_at_k"], rel=1e-6)
    if variant != "topk":
        sweep = metrics["val/threshold/l0_sweep"]
        assert fvu_at_l0(sweep, 8) == pytest.approx(figures["fvu_at_k"], rel=1e-6)


@pytest.mark.parametrize("variant", ["topk", "mutual_choice"])
def test_the_description_length_curve_and_its_reading_at_a_common_fvu(trained, variant):
    """DL against FVU along the sweep (k′ around k for topk, the thresholds' factor otherwise):
    FVU falls as L0 grows, the point at L0 = k is the run's DL at L0 = k, and a common FVU inside
    the curve reads a DL between its neighbours."""
    from sae_lightning.data import build_datamodule
    from sae_lightning.rules import dl_at_fvu, dl_at_k, dl_curve

    run_dir, _ = trained[variant]
    module = SAEModule.load_from_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    data = build_datamodule(module.hparams["config"]["data"])
    x = data.test_tensor()
    rd = reader(module, own_rule(module), data.calibration_tokens())
    sums = score(module, rd, x, data.contexts("test"))
    curve = dl_curve(module, rd, x, sums)
    assert len(curve) >= 5 and [p["fvu"] for p in curve] == sorted(p["fvu"] for p in curve)
    by_l0 = sorted(curve, key=lambda p: p["l0"])
    assert by_l0[0]["fvu"] > by_l0[-1]["fvu"] and by_l0[0]["dl"] < by_l0[-1]["dl"]
    at_k = min(curve, key=lambda p: abs(p["l0"] - 8))
    assert abs(at_k["l0"] - 8) <= 0.01 * 8 and at_k["dl"] == pytest.approx(dl_at_k(module, rd, x, sums), rel=1e-9)
    mid = (curve[1]["fvu"] * curve[2]["fvu"]) ** 0.5
    assert min(curve[1]["dl"], curve[2]["dl"]) <= dl_at_fvu(curve, mid) <= max(curve[1]["dl"], curve[2]["dl"])
    assert dl_at_fvu(curve, curve[-1]["fvu"] * 2) != dl_at_fvu(curve, curve[-1]["fvu"] * 2)  # outside: NaN


def test_token_spread_agrees_with_the_scored_sums(trained):
    """token_spread's FVU and mean L0 at the calibrated factor are score()'s at factor 1, for every
    rule of a trained SAE (two computations of one reading)."""
    from sae_lightning.data import build_datamodule

    run_dir, _ = trained["mutual_choice"]
    module = SAEModule.load_from_checkpoint(run_dir / "checkpoints" / "final.ckpt")
    data = build_datamodule(module.hparams["config"]["data"])
    x = data.test_tensor()
    for rule in RULES:
        rd = reader(module, rule, data.calibration_tokens())
        at_one = next(p for p in score(module, rd, x, data.contexts("test")).points() if p["factor"] == 1.0)
        got = token_spread(module, rd, x)
        assert got["fvu"] == pytest.approx(at_one["fvu"], rel=1e-6) and got["l0_mean"] == pytest.approx(at_one["l0"])
        assert 0 <= got["error_share_over_wide"] <= 1 and got["fvu_others"] <= got["fvu"] + 1e-12
