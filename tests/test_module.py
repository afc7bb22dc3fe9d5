"""Trains tiny SAEs in-process: threshold calibration and checkpoint round trips."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.module import SAEModule
from sae_lightning.train import run

from .conftest import TINY, compose_config

VARIANTS = ["topk", "mutual_choice", "feature_choice"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run per variant; returns {variant: (run_dir, metrics)}."""
    runs = {}
    for variant in VARIANTS:
        run_dir = tmp_path_factory.mktemp(variant)
        cfg = compose_config(
            [
                f"variant={variant}",
                "variant.k=8",
                *TINY,
                "trainer.max_steps=150",
                "trainer.val_check_interval=75",
                "progress=none",
                "variant.threshold_ema_warmup_steps=20" if variant != "topk" else "seed=0",
            ]
        )
        runs[variant] = (run_dir, run(cfg, run_dir))
    return runs


def load(run_dir):
    return SAEModule.load_from_checkpoint(run_dir / "checkpoints" / "final.ckpt", map_location="cpu").eval()


def fresh_tokens(module_cfg, n=4096):
    from sae_lightning.data import build_datamodule

    return build_datamodule(module_cfg["data"]).source.tokens(n, stream_seed=987654)


@pytest.mark.parametrize("variant", VARIANTS)
def test_threshold_mode_l0_within_15_percent_of_k_after_calibration(trained, variant):
    run_dir, metrics = trained[variant]
    module = load(run_dir)
    x = fresh_tokens(module.hparams["config"])
    l0 = module.encode(x, mode="threshold").l0_per_token().float().mean().item()
    assert abs(l0 - 8) <= 0.15 * 8, f"{variant}: threshold-mode mean L0 {l0:.2f} for k = 8"
    assert abs(metrics["val/threshold/l0_mean"] - 8) <= 0.15 * 8
    # batch mode spends exactly the budget on a full batch
    batch_l0 = module.encode(x[:128], mode="batch").l0_per_token().float().mean().item()
    assert batch_l0 <= 8 + 1e-6 and batch_l0 >= 0.9 * 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_round_trip_gives_identical_outputs_in_both_modes(trained, variant, tmp_path):
    run_dir, _ = trained[variant]
    a = load(run_dir)
    x = fresh_tokens(a.hparams["config"], 512)[:128]
    import lightning as L

    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1)
    trainer.strategy.connect(a)
    trainer.save_checkpoint(tmp_path / "again.ckpt")
    b = SAEModule.load_from_checkpoint(tmp_path / "again.ckpt", map_location="cpu").eval()
    for mode in a.modes:
        ca, cb = a.encode(x, mode), b.encode(x, mode)
        assert torch.equal(ca.offsets, cb.offsets) and torch.equal(ca.latents, cb.latents)
        assert torch.equal(ca.values, cb.values)
        assert torch.equal(a.reconstruct(x, mode), b.reconstruct(x, mode))
    assert torch.equal(a.stats.density, b.stats.density)
    assert torch.equal(a.stats.tokens_since_fired, b.stats.tokens_since_fired)
    if a.allocator.has_thresholds:
        assert bool(b.allocator.calibrated)
        assert torch.equal(a.allocator.theta_calibrated, b.allocator.theta_calibrated)


def test_training_reduces_fvu_and_reports_all_figures(trained):
    """Before and after: the trained SAE reconstructs fresh tokens far better than the same
    config initialised from data and not trained."""
    for variant, (run_dir, m) in trained.items():
        after = load(run_dir)
        x = fresh_tokens(after.hparams["config"], 2048)
        before = SAEModule(after.hparams["config"], after.sae.d_model)
        before.init_from_data(x[:1024])
        fvu_before, fvu_after = (s.measure(x[1024:], "batch")["fvu"] for s in (before, after))
        assert fvu_after < 0.8 * fvu_before, (variant, fvu_before, fvu_after)
        assert abs(m["val/batch/fvu"] - fvu_after) < 0.1 * fvu_after  # validation saw what fresh tokens show
        for key in (
            "val/batch/nmse",
            "val/batch/l0_std",
            "val/threshold/fvu",
            "val/dead_fraction",
            "val/recovery_mean_max_cos",
            "val/recovery_share_above_0.9",
            "tokens_per_second",
        ):
            assert key in m, (variant, key)


def test_feature_choice_never_leaves_a_latent_unfired_in_batch_mode(trained):
    _, m = trained["feature_choice"]
    assert m["val/batch/never_fired_fraction"] == 0.0


def test_feature_choice_batch_mode_on_a_batch_too_small_for_the_capacity_floor(trained):
    """8 tokens of an F = 256, k = 8 SAE: a budget of 64 cannot give each of 256 latents its
    floor of 1 token; the floor shrinks to what fits (0), and the code spends exactly k·B."""
    module = load(trained["feature_choice"][0])
    x = fresh_tokens(module.hparams["config"], n=8)
    code = module.encode(x, mode="batch").to_dense()
    m = module.allocator.capacities(8)
    assert int(m.sum()) == 8 * 8 and int(m.max()) <= 8 and int(m.min()) == 0
    assert int((code != 0).sum()) <= 64 and bool(((code != 0).sum(0) <= m).all())
    threshold = module.encode(x, mode="threshold").l0_per_token()  # the per-token mode is unaffected
    assert threshold.shape == (8,)


@pytest.mark.parametrize("variant", ["mutual_choice", "feature_choice"])
def test_matched_l0_scaling_hits_k_on_the_calibration_tokens(trained, variant):
    """Calibration scales the thresholds by one factor so that threshold mode's mean L0 on the
    calibration tokens is k (within 1 %); the validation sweep around it brackets L0 = k and
    gives the headline FVU at L0 = k."""
    from sae_lightning.module import fvu_at_l0

    run_dir, metrics = trained[variant]
    module = load(run_dir)
    x = fresh_tokens(module.hparams["config"], 8192)
    module.allocator.calibrated.fill_(False)  # from the EMA thresholds: start well away from k
    module.allocator.theta_ema.mul_(1.5)
    module.calibrate(x, match_l0=False)
    unscaled = module.encode(x, mode="threshold").l0_per_token().float().mean().item()
    module.allocator.theta_calibrated.mul_(1.3)  # as if the allocator's own rule had missed k
    figures = module.calibrate(x)
    l0 = module.encode(x, mode="threshold").l0_per_token().float().mean().item()
    assert abs(l0 - 8) <= 0.01 * 8, (unscaled, l0, figures)
    assert abs(figures["l0"] - l0) < 1e-6 and figures["theta_scale"] > 0
    # the run's own figures: the sweep on validation tokens brackets k, and the headline is on it
    sweep = metrics["val/threshold/l0_sweep"]
    assert [p["l0"] for p in sweep] == sorted(p["l0"] for p in sweep)
    assert sweep[0]["l0"] <= 8 <= sweep[-1]["l0"]
    assert abs(fvu_at_l0(sweep, 8) - metrics["val/threshold/fvu_at_k"]) < 1e-12
    near = min(sweep, key=lambda p: abs(p["l0"] - 8))
    assert abs(near["l0"] - 8) <= 0.01 * 8  # the calibrated factor: L0 = k on the validation tokens too, nearly
    below = max((p for p in sweep if p["l0"] <= 8), key=lambda p: p["l0"])
    above = min((p for p in sweep if p["l0"] >= 8), key=lambda p: p["l0"])
    lo, hi = sorted((below["fvu"], above["fvu"]))
    assert lo - 1e-12 <= metrics["val/threshold/fvu_at_k"] <= hi + 1e-12  # between its two neighbours
    assert abs(metrics["calibration"]["l0"] - 8) <= 0.01 * 8


def test_topk_headline_is_its_threshold_mode(trained):
    _, m = trained["topk"]
    assert m["val/threshold/fvu_at_k"] == m["val/threshold/fvu"] and "val/threshold/l0_sweep" not in m


def test_fvu_at_l0_interpolates_in_log_space():
    from sae_lightning.module import fvu_at_l0

    points = [{"l0": 4.0, "fvu": 0.4}, {"l0": 16.0, "fvu": 0.1}]
    assert abs(fvu_at_l0(points, 8.0) - 0.2) < 1e-12  # halfway in log L0: the geometric mean
    assert fvu_at_l0(points, 4.0) == pytest.approx(0.4) and fvu_at_l0(points, 32.0) != fvu_at_l0(points, 32.0)


@pytest.mark.parametrize("variant", ["mutual_choice", "feature_choice"])
def test_the_ema_threshold_mode_waits_for_its_first_cutoff(variant):
    """Before the EMA has a training cutoff (sanity check, a validation inside the warm-up) θ = 0
    would take every positive affinity, a [B, F]-sized selection (out of memory at F = 262144):
    validation leaves the mode out until then."""
    from sae_lightning.allocators import Mode
    from sae_lightning.config import load_config

    module = SAEModule(load_config(compose_config([*TINY, f"variant={variant}", "variant.k=8"])), 32)
    assert Mode.THRESHOLD_EMA not in module.active_modes()
    warm = module.allocator.cfg.threshold_ema_warmup_steps
    module.allocator.update_theta_ema(torch.full_like(module.allocator.theta_ema, 0.5), step=warm)
    assert Mode.THRESHOLD_EMA in module.active_modes()


@pytest.mark.parametrize("normalisation", ["none", "dataset_scale", "layernorm"])
def test_training_fit_figures_are_the_model_units_fvu_and_nmse(normalisation):
    """The step's logged FVU and NMSE (from the normalised residual where the scale cancels)
    equal Σ‖x − x̂‖² / Σ‖x − x̄‖² and Σ‖x − x̂‖² / Σ‖x‖² of the de-normalised reconstruction."""
    from sae_lightning.config import load_config

    module = SAEModule(load_config(compose_config([*TINY, f"model.normalisation={normalisation}"])), 32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g, dtype=torch.float64).mul(3).add(2).float()
    module.init_from_data(x)
    out, ctx = module.forward_step(x)
    fvu, nmse = module._fit_figures(x, out, ctx)
    x64, h64 = x.double(), module.sae.denormalise(out.x_hat.detach(), ctx).double()
    sse = (x64 - h64).pow(2).sum()
    assert float(fvu) == pytest.approx(float(sse / (x64 - x64.mean(0)).pow(2).sum()), rel=1e-5)
    assert float(nmse) == pytest.approx(float(sse / x64.pow(2).sum()), rel=1e-5)


# ---- the recipe travels with the module ---------------------------------------------------------
RECIPE_RUN = [*TINY, "variant=topk", "variant.k=8", "trainer.max_steps=12", "trainer.val_check_interval=6",
              "progress=none", "calibration.enabled=false"]  # fmt: skip


def bare_trainer_weights(overrides: list[str], **trainer_args) -> tuple[dict[str, torch.Tensor], SAEModule]:
    """SAEModule(config) trained by a plain lightning.Trainer, as a user would drive it: the
    Trainer gets only the schedule (steps, validation interval), nothing of the recipe."""
    import warnings

    import lightning as L

    from sae_lightning.config import load_config

    config = load_config(compose_config(overrides))
    datamodule = config.data.build()
    datamodule.open()
    L.seed_everything(config.seed, workers=True, verbose=False)
    module = SAEModule(config, datamodule.d_model)
    trainer = L.Trainer(max_steps=config.trainer.max_steps, val_check_interval=config.trainer.args["val_check_interval"],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_args)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=datamodule)
    module.caught = [str(w.message) for w in caught]  # type: ignore[attr-defined]
    return {name: p.detach().clone() for name, p in module.sae.named_parameters()}, module


def train_py_weights(overrides: list[str], tmp_path) -> dict[str, torch.Tensor]:
    run(compose_config(overrides), tmp_path)
    state = torch.load(tmp_path / "checkpoints" / "final.ckpt", weights_only=True)["state_dict"]
    return {
        name.removeprefix("sae."): t for name, t in state.items() if name.startswith("sae.") and "." not in name[4:]
    }


def test_a_bare_trainer_trains_bitwise_as_train_py(tmp_path):
    """The whole recipe (gradient clipping included) is applied by the module: weights after 12
    steps are bitwise those of train.py. Without clipping they differ (the recipe acts here)."""
    ours = train_py_weights(RECIPE_RUN, tmp_path / "a")
    bare, _ = bare_trainer_weights(RECIPE_RUN)
    assert set(bare) == {"W_enc", "W_dec", "b_enc", "b_pre"} and set(ours) >= set(bare)
    for name, value in bare.items():
        assert torch.equal(value, ours[name]), name
    unclipped, _ = bare_trainer_weights([*RECIPE_RUN, "optim.clip_grad_norm=null"])
    assert not torch.equal(unclipped["W_dec"], ours["W_dec"])


def test_a_trainer_clip_is_ignored_with_a_warning_not_applied_twice():
    default, _ = bare_trainer_weights(RECIPE_RUN)
    also, module = bare_trainer_weights(RECIPE_RUN, gradient_clip_val=0.01)
    said = [m for m in module.caught if "gradient_clip_val" in m]
    assert said == [
        "Trainer(gradient_clip_val=0.01) is ignored: SAEModule clips its own gradients (optim.clip_grad_norm=1.0); "
        "set that in the module's config instead"
    ]
    for name, value in default.items():
        assert torch.equal(value, also[name]), name


def test_a_run_on_data_with_a_feature_hierarchy_reports_absorption(tmp_path):
    cfg = compose_config(
        ["variant=topk", "variant.k=8", *TINY, "data.hierarchy_parents=8", "data.children_per_parent=2",
         "trainer.max_steps=20", "trainer.val_check_interval=20", "progress=none"]
    )  # fmt: skip
    metrics = run(cfg, tmp_path)
    assert 0 <= metrics["val/absorption"] <= 1
    assert 0 < metrics["val/parent_latent_rate_alone"] <= 1 and 0 < metrics["val/parent_recovery_mean_max_cos"] <= 1


def logged_steps(run_dir, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = []
    for events in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


def test_calibrating_at_every_validation_gives_a_learning_curve_and_leaves_training_as_it_was(tmp_path):
    overrides = [*TINY, "variant=mutual_choice", "variant.k=8", "trainer.max_steps=24", "trainer.val_check_interval=8",
                 "progress=none"]  # fmt: skip
    plain = train_py_weights(overrides, tmp_path / "plain")
    curve = train_py_weights([*overrides, "calibration.every_validation=true"], tmp_path / "curve")
    assert all(torch.equal(plain[name], curve[name]) for name in plain)
    # the headline at every validation during training (logged at steps 7, 15, 23), not only after
    # calibration (the final validation, step 24)
    assert logged_steps(tmp_path / "curve", "val/threshold/fvu_at_k") == [7, 15, 23, 24]
    assert logged_steps(tmp_path / "plain", "val/threshold/fvu_at_k") == [24]
