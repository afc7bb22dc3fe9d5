"""One training run: validate the config, fit, calibrate, evaluate both modes, write results.

Writes under the run folder: ``config.yaml`` (resolved), ``tb/`` (TensorBoard),
``checkpoints/`` (``last.ckpt``, the best by validation FVU, and ``final.ckpt`` with
calibrated thresholds), ``metrics.json`` and two PNG plots.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from .atomic import atomic_write_text
from .callbacks import AtomicCheckpointIO, DownstreamLoss, LatentStatsMonitor, ThresholdCalibration
from .config import validate_config
from .errors import ConfigError, DataError
from .module import SAEModule
from .plots import save_run_plots
from .sweep import pruning


def _remove_if_empty(run_dir: Path) -> None:
    try:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass


def _check_resume(ckpt: str | None, datamodule) -> None:
    """Before anything is written: the checkpoint exists, fits the data's d_model, and (for an
    activation cache) was trained on the same cache and stream."""
    if not ckpt:
        return
    if not Path(ckpt).is_file():
        raise ConfigError("resume", ckpt, "null or the path of an existing checkpoint (.ckpt)")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)
    d = checkpoint["state_dict"]["sae.W_enc"].shape[1]
    if d != datamodule.d_model:
        raise ConfigError("resume", ckpt, f"a checkpoint of an SAE with d_model {datamodule.d_model} (the data's); "
                          f"this one has {d}")
    data_state = checkpoint.get(type(datamodule).__qualname__)
    if data_state:
        datamodule.load_state_dict(data_state)


def run(cfg, run_dir: Path) -> dict[str, Any]:
    """Train one SAE as configured; returns the final metrics (also in metrics.json)."""
    try:
        config, datamodule = validate_config(cfg)
        if hasattr(datamodule, "prepare_data"):
            datamodule.prepare_data()  # an activation cache is harvested on first use
        _check_resume(config.get("resume"), datamodule)
    except (ConfigError, DataError):
        _remove_if_empty(run_dir)
        raise
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))
    L.seed_everything(config["seed"], workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")

    module = SAEModule(config, datamodule.d_model)
    logger = L.pytorch.loggers.TensorBoardLogger(str(run_dir), name="tb", version="", default_hp_metric=False)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-step{step}", monitor="val/batch/fvu", mode="min",
        save_top_k=1, save_last=True, auto_insert_metric_name=False)
    calibration = ThresholdCalibration(enabled=config["calibration"]["enabled"])
    callbacks = [checkpoint, calibration, LatentStatsMonitor(config["logging"]["histogram_every_n_steps"]),
                 L.pytorch.callbacks.LearningRateMonitor(logging_interval="step")]
    downstream = getattr(datamodule, "downstream", None) or {}
    manifest = getattr(datamodule, "manifest", None)
    if manifest is not None and manifest["harvest"]["lm"].get("causal") and downstream.get("enabled", True):
        callbacks.append(DownstreamLoss(datamodule.path, manifest, downstream.get("contexts", 16),
                                        config["data"]["batch_size"], downstream.get("final_contexts", 128)))
    if pruning.ACTIVE is not None:  # a trial of an Optuna sweep
        callbacks.append(pruning.OptunaPruning(pruning.ACTIVE))
    trainer = L.Trainer(**config["trainer"], logger=logger, callbacks=callbacks, default_root_dir=str(run_dir),
                        plugins=[AtomicCheckpointIO()], enable_model_summary=False)

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=config.get("resume"))
    train_seconds = time.perf_counter() - start
    tokens_per_step = config["data"]["batch_size"] * trainer.world_size  # every rank trains its own batch
    session_tokens = (trainer.global_step - module.first_step) * tokens_per_step
    trainer.validate(module, datamodule=datamodule, verbose=False)
    trainer.save_checkpoint(run_dir / "checkpoints" / "final.ckpt")

    tokens = trainer.global_step * tokens_per_step
    metrics = {
        "variant": config["variant"]["name"],
        "run_dir": str(run_dir),
        "k": config["variant"]["k"],
        "n_latents": config["model"]["n_latents"],
        "steps": trainer.global_step,
        "tokens": tokens,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(session_tokens / max(train_seconds, 1e-9), 1),
        "calibration": calibration.figures,
        **module.last_val,
    }
    if trainer.is_global_zero:
        atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        save_run_plots(module, run_dir)
        print_summary(metrics, run_dir)
    return metrics


def print_summary(metrics: dict[str, Any], run_dir: Path) -> None:
    rows = [("mode", "FVU", "L0 mean", "L0 p10-p90", "never fired")]
    for mode in ("batch", "threshold", "threshold_ema"):
        if f"val/{mode}/fvu" in metrics:
            rows.append((mode, f"{metrics[f'val/{mode}/fvu']:.4f}", f"{metrics[f'val/{mode}/l0_mean']:.2f}",
                         f"{metrics[f'val/{mode}/l0_p10']:.0f}-{metrics[f'val/{mode}/l0_p90']:.0f}",
                         f"{100 * metrics[f'val/{mode}/never_fired_fraction']:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\n{metrics['variant']}: k={metrics['k']}, F={metrics['n_latents']}, {metrics['tokens']} tokens "
          f"in {metrics['train_seconds']} s ({metrics['tokens_per_second']:.0f} tokens/s)")
    for r in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    if "val/recovery_mean_max_cos" in metrics:
        print(f"  dead {100 * metrics['val/dead_fraction']:.1f}%, feature recovery: mean max cos "
              f"{metrics['val/recovery_mean_max_cos']:.3f}, share > 0.9 {metrics['val/recovery_share_above_0.9']:.3f}")
    if "val/ce_clean" in metrics:
        print(f"  downstream: CE clean {metrics['val/ce_clean']:.3f}, zero-ablated {metrics['val/ce_zero_ablation']:.3f}; "
              + "; ".join(f"{mode}: ΔCE {metrics[f'val/{mode}/delta_ce']:.3f}, loss recovered "
                          f"{100 * metrics[f'val/{mode}/loss_recovered']:.1f}%" for mode in ("batch", "threshold")))
    print(f"  results in {run_dir}")
