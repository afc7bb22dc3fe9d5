"""Every variant trains for a few steps from the real entry point and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, TINY
from .helpers.cli import hang_guard

ALLOCATOR = {"matryoshka_topk": "topk", "matryoshka_mutual_choice": "mutual_choice"}


@pytest.mark.parametrize(
    "variant", ["topk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka_topk", "matryoshka_mutual_choice"]
)
def test_train_py_runs_each_variant(variant, cli, tmp_path):
    proc = cli(
        "train.py",
        f"variant={variant}",
        f"out_dir={tmp_path}",
        *TINY,
        "variant.k=8",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "progress=none",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr  # a clean console: no warnings, no adverts
    (run_dir,) = list((tmp_path / "runs").iterdir())
    # Feature Choice's folder names its capacity rule (the default: demand)
    label = {"feature_choice": "feature_choice-demand"}.get(variant, variant)
    assert run_dir.name.endswith(f"_{label}_k8_F256"), run_dir.name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["variant"] == variant and metrics["steps"] == 6
    # better than predicting the mean (FVU 1), every token's budget spent in batch mode (JumpReLU:
    # its learned thresholds, started at L0 = k, near it after 6 steps)
    assert 0 < metrics["val/batch/fvu"] < 1
    if variant == "jumprelu":
        assert 4 < metrics["val/batch/l0_mean"] < 16
    else:
        assert metrics["val/batch/l0_mean"] == 8
    assert "val/threshold/l0_mean" in metrics
    # the code that made the run: this checkout's commit, whether its tree was dirty, torch's and Lightning's versions
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert metrics["code"]["commit"] == head and isinstance(metrics["code"]["dirty"], bool)
    assert metrics["code"]["torch"] == str(torch.__version__) and metrics["code_versions"] == [metrics["code"]]
    # this session's time by phase: every phase timed, none negative, and together about the run's own time
    phases = metrics["phase_seconds"]
    assert set(phases) == {"initialisation", "training steps", "validation during training", "calibration",
                           "final validation", "final checkpoint and weights", "test split"}  # fmt: skip
    assert all(v >= 0 for v in phases.values()) and phases["validation during training"] > 0, phases
    assert (phases["calibration"] > 0) == (ALLOCATOR.get(variant, variant) != "topk")  # TopK: no thresholds
    assert "  time: initialisation " in proc.stdout
    # the selection's dtype and why, in metrics.json and the summary (auto on this CPU)
    if variant == "jumprelu":  # its step compares z′ with θ in full precision
        assert metrics["affinity_dtype"] == "float32" and "thresholds" in metrics["affinity_dtype_reason"]
    else:
        assert metrics["affinity_dtype"] in ("float32", "bfloat16")
        assert metrics["affinity_dtype_reason"].startswith("auto")
        assert f"batch selection read z′ in {metrics['affinity_dtype']} (auto: this CPU" in proc.stdout
    assert (run_dir / "config.yaml").read_text().count(f"allocator: {ALLOCATOR.get(variant, variant)}") == 1
    extra = {"jumprelu": "train/loss_sparsity", "matryoshka_topk": "train/loss_matryoshka"}.get(variant)
    if extra is not None:  # the variant's own term, logged each step
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run_dir / "tb"))
        acc.Reload()
        assert extra in acc.Tags()["scalars"] and all(e.value >= 0 for e in acc.Scalars(extra))
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-step6.ckpt", "final.ckpt", "last.ckpt"]
    # the last step is the best here: one file on disk for the three roles (hard links)
    assert (ckpts / "last.ckpt").samefile(ckpts / "final.ckpt") and (ckpts / "best-step6.ckpt").samefile(
        ckpts / "final.ckpt"
    )
    for png in ("l0_per_token.png", "density_by_rank.png", "fvu_vs_l0.png"):
        assert (run_dir / png).is_file(), png
    # TensorBoard: the figures as images, and an HParams session with the final metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert {"figures/l0_per_token", "figures/density_by_rank", "figures/fvu_vs_l0"} <= set(acc.Tags()["images"])
    assert "hparams/batch_fvu" in acc.Tags()["scalars"]
    assert acc.Scalars("hparams/batch_fvu")[-1].value == pytest.approx(metrics["val/batch/fvu"], rel=1e-5)
    assert "_hparams_/session_start_info" in acc.PluginTagToContent("hparams")
    assert not list(run_dir.rglob("*.tmp-*"))  # no half-written file left behind


def test_mixed_precision_trains_with_gradient_clipping(cli, tmp_path):
    """Lightning refuses to clip the gradients of a fused Adam under mixed precision (it unscales
    them itself); optim.fused=auto takes the plain kernel there, so the default recipe (clipping
    at 1.0) runs with trainer.precision=bf16-mixed."""
    proc = cli("train.py", f"out_dir={tmp_path}", *TINY, "variant.k=8", "trainer.max_steps=4", "progress=none",
               "trainer.precision=bf16-mixed", timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4


@pytest.mark.slow
def test_train_py_runs_under_ddp_on_cpu(tmp_path):
    """Two CPU processes (gloo): each rank trains its own batches; tokens count both."""
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "variant=mutual_choice",
            f"out_dir={tmp_path}",
            *TINY,
            "variant.k=8",
            "trainer.max_steps=6",
            "trainer.val_check_interval=3",
            "progress=none",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=hang_guard(600),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens"] == 6 * 128 * 2
    assert 0 < metrics["val/batch/fvu"] < 10
