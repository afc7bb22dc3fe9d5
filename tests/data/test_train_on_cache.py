"""train.py on real-model activations: harvested on first use, reused, ΔCE measured, resumable."""

from __future__ import annotations

import json
import math

import pytest

SMALL = [
    "model.n_latents=128",
    "model.init_sample_tokens=256",
    "data.batch_size=64",
    "data.val_tokens=128",
    "data.calibration_tokens=128",
    "data.downstream.contexts=2",
    "data.downstream.final_contexts=4",
    "optim.warmup_steps=2",
    "stats.dead_window_tokens=500",
    "stats.density_time_constant_tokens=500",
    "variant.k=4",
    "trainer.val_check_interval=3",
    "progress=none",
]


def train(cli, args, tmp_path):
    return cli("train.py", f"out_dir={tmp_path}", *SMALL, *args, timeout=600)


@pytest.mark.slow
def test_train_harvests_on_first_use_reuses_and_resumes(tiny_lm, corpus_file, cli, tmp_path):
    data = [
        "data=smollm2",
        f"data.path={tmp_path}/cache",
        f"data.harvest.lm.name={tiny_lm}",
        f"data.harvest.corpus.path={corpus_file}",
        "data.harvest.layer=1",
        "data.harvest.context_length=32",
        "data.harvest.token_budget=1200",
        "data.harvest.shard_tokens=256",
    ]
    first = train(cli, [*data, "variant=mutual_choice", "trainer.max_steps=6"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "harvesting it now" in first.stdout
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens"] >= 1200 and manifest["d_model"] == 32
    (run,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and 0 < metrics["val/batch/fvu"] < 10
    # the downstream loss of the causal model, with the SAE spliced in
    for mode in ("batch", "threshold"):
        assert math.isfinite(metrics[f"val/{mode}/delta_ce"]) and math.isfinite(metrics[f"val/{mode}/loss_recovered"])
        assert math.isclose(
            metrics[f"val/{mode}/delta_ce"],
            metrics[f"val/{mode}/ce_spliced"] - metrics["val/ce_clean"],
            rel_tol=1e-6,
            abs_tol=1e-6,
        )
    assert metrics["val/ce_zero_ablation"] != metrics["val/ce_clean"]
    # the final figures again at L0 = k exactly on the spliced (test) tokens
    assert abs(metrics["test/downstream_l0"] - 4) <= 0.02 * 4
    assert math.isfinite(metrics["test/delta_ce_at_k"]) and metrics["test/kl_div_at_k"] >= 0
    # the same figures, after the run, on a chosen number of contexts
    from sae_lightning.evaluate import main as evaluate

    again = evaluate([str(run), "--contexts", "4", "--device", "cpu"])
    for key in ("val/ce_clean", "val/batch/delta_ce", "val/threshold/loss_recovered"):
        assert math.isclose(again[key], metrics[key], rel_tol=1e-4, abs_tol=1e-5), key
    assert (run / "downstream_4.json").is_file()

    resumed = train(
        cli,
        [*data, "variant=mutual_choice", "trainer.max_steps=9", f"resume={run / 'checkpoints' / 'last.ckpt'}"],
        tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "harvesting" not in resumed.stdout  # the cache is reused
    latest = max((tmp_path / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    assert json.loads((latest / "metrics.json").read_text())["steps"] == 9


def test_resume_with_another_d_model_is_refused(cli, tmp_path):
    synthetic = cli(
        "train.py",
        f"out_dir={tmp_path}",
        "model.n_latents=64",
        "model.init_sample_tokens=256",
        "data.d_model=16",
        "data.n_features=32",
        "data.active_median=2",
        "data.active_max=8",
        "data.batch_size=64",
        "data.val_tokens=64",
        "data.calibration_tokens=64",
        "variant=topk",
        "variant.k=4",
        "trainer.max_steps=2",
        "progress=none",
        timeout=300,
    )
    assert synthetic.returncode == 0, synthetic.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    proc = cli(
        "train.py",
        f"out_dir={tmp_path}",
        "data.d_model=24",
        "data.n_features=32",
        "data.active_max=8",
        f"resume={run / 'checkpoints' / 'last.ckpt'}",
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: config error: resume=" in proc.stderr and "data.d_model: run 16 vs now 24" in proc.stderr


@pytest.mark.slow
def test_gradient_ranking_trains_every_variant_on_a_gradient_cache_and_resumes_exactly(
    tiny_lm, corpus_file, cli, tmp_path
):
    """data=smollm2_grad harvested on first use (tiny model); every variant trains with β > 0;
    β changes what is trained; a resumed β > 0 run equals the uninterrupted one."""
    import torch

    data = [
        "data=smollm2_grad",
        f"data.path={tmp_path}/cache",
        f"data.harvest.lm.name={tiny_lm}",
        f"data.harvest.corpus.path={corpus_file}",
        "data.harvest.layer=0",
        "data.harvest.context_length=32",
        "data.harvest.token_budget=1200",
        "data.harvest.shard_tokens=256",
        "data.downstream.enabled=false",
    ]

    def trained(name, *args):
        r = train(cli, [*data, f"out_dir={tmp_path / name}", *args], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        (run,) = (tmp_path / name / "runs").iterdir()
        return run, json.loads((run / "metrics.json").read_text())

    manifest = None
    for variant in ("topk", "mutual_choice", "feature_choice"):
        run, metrics = trained(variant, f"variant={variant}", "variant.gradient_ranking.beta=2", "trainer.max_steps=4")
        manifest = manifest or json.loads((tmp_path / "cache" / "manifest.json").read_text())
        assert metrics["steps"] == 4 and 0 < metrics["val/batch/fvu"] < 10 and metrics["val/threshold/l0_mean"] > 0
        state = torch.load(run / "checkpoints" / "final.ckpt", map_location="cpu", weights_only=True)["state_dict"]
        assert float(state["gradient_ranking.grad_rms"]) > 0
    assert manifest is not None and manifest["gradients"]["dtype"] == "bfloat16"

    _, plain = trained("plain", "variant=topk", "trainer.max_steps=6")
    whole_run, whole = trained("whole", "variant=topk", "variant.gradient_ranking.beta=2", "trainer.max_steps=6")
    assert whole["val/batch/fvu"] != plain["val/batch/fvu"]  # the gradients changed the training
    part_run, _ = trained("part", "variant=topk", "variant.gradient_ranking.beta=2", "trainer.max_steps=3")
    r = train(cli, [*data, f"out_dir={tmp_path / 'part'}", "trainer.max_steps=6", f"resume={part_run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = json.loads((part_run / "metrics.json").read_text())
    assert resumed["steps"] == 6
    for key in ("val/batch/fvu", "val/threshold/fvu", "val/batch/l0_mean", "val/dead_fraction"):
        assert resumed[key] == whole[key], key
