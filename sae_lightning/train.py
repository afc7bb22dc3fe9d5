"""One training run: check everything, then fit, calibrate, evaluate both modes, write results.

:func:`prepare` does every check a run can fail on before anything is written (the config,
the data and its cache, the checkpoint to resume from, the output folder); only a missing
activation cache is harvested there. :func:`fit` then writes, under the run folder:
``config.yaml`` (resolved), ``tb/`` (TensorBoard), ``checkpoints/`` (``last.ckpt``, the best
by validation FVU, and ``final.ckpt`` with calibrated thresholds), ``sae.safetensors`` (the
weights alone, see ``runs.py``), ``metrics.json`` and the PNG plots. A resumed run continues its own folder (see ``resume.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import OmegaConf

from . import resume as resume_mod
from . import tb
from .atomic import atomic_write_json, atomic_write_text, check_writable
from .callbacks import AtomicCheckpointIO, LatentStatsMonitor, ThresholdCalibration
from .callbacks.downstream import DownstreamLoss
from .callbacks.figures import RunFigures
from .callbacks.interrupt import GracefulStop
from .callbacks.last_step import ValidateLastStep
from .callbacks.phases import ValidationTimer
from .callbacks.progress import Progress
from .cli import command
from .config import TrainConfig, load_config, normalised, resolve
from .errors import ConfigError, DataError, Interrupted
from .glibc_malloc import keep_freed_memory
from .metrics import VALIDATION_METRICS
from .module import SAEModule
from .provenance import code_version
from .rules import RULES, evaluate_rules, own_rule, rules_of
from .runs import NATIVE, new_run_dir, save_native
from .spec import flatten
from .sweep.pruning import OptunaPruning, TrialContext


@dataclass
class Plan:
    """Everything a run needs, checked; nothing written yet."""

    config: TrainConfig
    datamodule: Any  # a DataSource
    run_dir: Path | None  # None: a new folder under out_dir/runs, made by fit()
    resume: resume_mod.ResumePoint | None = None
    changed: list[str] = field(default_factory=list)  # keys a resumed run changed


def _remove_if_empty(run_dir: Path | None) -> None:
    try:
        if run_dir is not None and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()
    except OSError:
        pass


def _check_checkpoint(point: resume_mod.ResumePoint, datamodule) -> None:
    """The checkpoint fits the data: d_model, and for an activation cache the same cache and stream."""
    d = point.state["state_dict"]["sae.W_enc"].shape[1]
    if d != datamodule.d_model:
        raise ConfigError(
            "resume",
            str(point.checkpoint),
            f"a checkpoint of an SAE with d_model {datamodule.d_model} (the data's); this one has {d}",
        )
    data_state = point.state.get(type(datamodule).__qualname__)
    if data_state:
        datamodule.load_state_dict(data_state)


def prepare(cfg, run_dir: Path | None = None, overrides: list[str] | None = None) -> Plan:
    """Check the run as configured (``overrides``: the command line's, which a resumed run
    applies to its saved config; None when ``cfg`` is the whole config on purpose)."""
    try:
        composed = resolve(cfg)
        point: resume_mod.ResumePoint | None = None
        changed: list[str] = []
        if composed.get("resume"):
            point = resume_mod.read(str(composed["resume"]))
            composed, changed = resume_mod.resumed_config(point.config, composed, overrides, normalised)
        config = load_config(composed)
        if config.variant.allocator_class.learns_thresholds and "sparsity" not in config.variant.losses:
            raise ConfigError(
                "variant.losses",
                sorted(config.variant.losses),
                "a sparsity term (losses.sparsity) for jumprelu: without it nothing holds its thresholds up "
                "and L0 grows without bound",
            )
        datamodule = config.data.build()
        datamodule.open()  # an activation cache is harvested on first use, then checked
        beta = config.variant.params.gradient_ranking.beta
        if beta > 0:
            if not datamodule.has_gradients():
                raise ConfigError(
                    "variant.gradient_ranking.beta",
                    beta,
                    f"0 for data {config.data.kind!r} without gradients ∇ₓL; gradient ranking needs an activation "
                    "cache harvested with data.harvest.gradients=true (a causal model, e.g. data=smollm2_grad)",
                )
            datamodule.use_gradients()
        if point is not None:
            _check_checkpoint(point, datamodule)
            if point.run_dir is not None:  # continue in place (a sweep's retry too: its new folder goes)
                if run_dir is not None and run_dir != point.run_dir:
                    _remove_if_empty(run_dir)
                run_dir = point.run_dir
        if run_dir is None:
            check_writable(config.out_dir, "out_dir")
    except (ConfigError, DataError):
        _remove_if_empty(run_dir)
        raise
    return Plan(config, datamodule, run_dir, point, changed)


def run(cfg, run_dir: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one SAE as configured; returns the final metrics (also in metrics.json)."""
    keep_freed_memory()
    return fit(prepare(cfg, run_dir, overrides))


RUN_DIR_ENV = "SAE_LIGHTNING_RUN_DIR"  # rank 0's run folder, for the processes of its other ranks


def _process_rank() -> int:
    """This process's global rank as the launcher set it (0 for a single process)."""
    for key in ("RANK", "SLURM_PROCID"):
        if key in os.environ:
            return int(os.environ[key])
    return int(os.environ.get("LOCAL_RANK", 0))


def _run_dir(plan: Plan) -> Path:
    """Rank 0 makes (or reuses) the run folder and writes config.yaml; other ranks of a
    multi-process run get rank 0's folder and write nothing there."""
    config = plan.config
    if _process_rank() != 0:
        return Path(os.environ.get(RUN_DIR_ENV) or plan.run_dir or config.out_dir)
    name = f"{config.variant.label()}_k{config.variant.params.k}_F{config.model.n_latents}"
    run_dir = plan.run_dir or new_run_dir(config.out_dir, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config.as_dict())))
    os.environ[RUN_DIR_ENV] = str(run_dir)  # Lightning's DDP launcher starts the other ranks with this environment
    return run_dir


def _trainer(plan: Plan, run_dir: Path) -> tuple[L.Trainer, ThresholdCalibration, ValidationTimer]:
    config, point = plan.config, plan.resume
    logger = L.pytorch.loggers.TensorBoardLogger(
        str(run_dir),
        name="tb",
        version="",
        default_hp_metric=False,
        # a resumed run drops the events its previous session wrote after the checkpoint
        purge_step=point.step + 1 if point is not None else None,
    )
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-step{step}",
        monitor="val/batch/fvu",
        mode="min",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,  # a resumed run overwrites last.ckpt, never adds last-v1.ckpt beside it
    )
    stop = GracefulStop(ckpt_dir / "last.ckpt")
    calibration = ThresholdCalibration(
        config.calibration.enabled, config.calibration.match_l0, config.calibration.every_validation
    )
    timer = ValidationTimer()
    batch_size = config.data.batch_size
    callbacks = [
        checkpoint,
        stop,
        ValidateLastStep(),
        calibration,
        LatentStatsMonitor(config.logging.histogram_every_n_steps),
        L.pytorch.callbacks.LearningRateMonitor(logging_interval="step"),
        Progress(config.progress, batch_size),
        RunFigures(run_dir),
        *DownstreamLoss.of(plan.datamodule.downstream(), batch_size),
        timer,  # last: the validation's time includes the hooks above that end it
    ]
    if config.sweep_trial is not None:  # a trial of an Optuna sweep
        callbacks.append(OptunaPruning(TrialContext.from_spec(config.sweep_trial)))
    trainer = L.Trainer(
        **config.trainer.args,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    return trainer, calibration, timer


def fit(plan: Plan) -> dict[str, Any]:
    config, datamodule, point = plan.config, plan.datamodule, plan.resume
    run_dir = _run_dir(plan)
    if point is not None:
        changed = f"; changed: {', '.join(plan.changed)}" if plan.changed else ""
        print(f"resuming {run_dir} at step {point.step}{changed}", flush=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    module = SAEModule(config, datamodule.d_model)
    module.restoring = point is not None
    trainer, calibration, timer = _trainer(plan, run_dir)
    start = time.perf_counter()
    try:
        # weights-only, as resume.read opened it (nothing in a checkpoint is called: checkpoint_file.py)
        ckpt_path = str(point.checkpoint) if point is not None else None
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Interrupted as e:
        raise Interrupted(f"{e}; continue with: {command('train.py', f'resume={run_dir}')}") from None
    except DataError as e:  # found while training (a cache opened with data.verify=size): the folder stays
        raise DataError(f"{e} (found during training; the run folder {run_dir} keeps what was written)") from None
    train_seconds = module.train_seconds()
    fitted = time.perf_counter()
    trainer.validate(module, datamodule=datamodule, verbose=False)
    validated = time.perf_counter()
    trainer.save_checkpoint(run_dir / "checkpoints" / "final.ckpt", weights_only=False)  # resumable, not weights alone
    if trainer.is_global_zero:
        one_file_per_checkpoint(run_dir / "checkpoints", trainer.global_step)
        save_native(module, run_dir / NATIVE, config.as_dict())
    # this session's time by phase (docs/performance.md): trainer.fit's, split, then what follows it
    saved = time.perf_counter()
    test = test_figures(module, datamodule, config, run_dir) if trainer.is_global_zero else {}
    phases = {
        "initialisation": module.init_seconds,
        "training steps": fitted - start - module.init_seconds - timer.seconds - calibration.seconds,
        "validation during training": timer.seconds,
        "calibration": calibration.seconds,
        "final validation": validated - fitted,
        "final checkpoint and weights": saved - validated,
        "test split": time.perf_counter() - saved,
    }

    tokens = trainer.global_step * config.data.batch_size * trainer.world_size  # every rank its own batch
    metrics = {
        "variant": config.variant.name,
        "run_dir": str(run_dir),
        "k": config.variant.params.k,
        "n_latents": config.model.n_latents,
        "steps": trainer.global_step,
        "tokens": tokens,
        "train_seconds": round(train_seconds, 2),
        "tokens_per_second": round(tokens / max(train_seconds, 1e-9), 1),
        "calibration": calibration.figures,
        **module.results.scalars,
        "code": code_version(),  # which code made the run (provenance.py)
        "code_versions": module.code_versions(),  # every session's, for a resumed run
        "affinity_dtype": str(module.selection_dtype()).removeprefix("torch."),
        "affinity_dtype_reason": module.selection_dtype_reason(),
        "phase_seconds": {name: round(seconds, 2) for name, seconds in phases.items()},
        **test,
    }
    if module.results.l0_sweep:
        metrics["val/threshold/l0_sweep"] = module.results.l0_sweep
    finals = {
        f"hparams/{k.removeprefix('val/').replace('/', '_')}": float(module.results.scalars[k])
        for k in HPARAM_METRICS
        if k in module.results.scalars
    }
    tb.hparams(trainer, hparams_of(config), finals)
    if trainer.is_global_zero:
        atomic_write_json(run_dir / "metrics.json", metrics, sort_keys=True)
        print_summary(metrics, run_dir, config)
    return metrics


RULES_FILE = "rules_test.json"


def test_figures(module: SAEModule, datamodule, config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """The trained SAE on the test split, read by ``evaluation.test_rules`` (rules.py): each
    rule's figures as ``test/<rule>/<figure>`` (the own rule's also as ``test/<figure>``: the
    headline), its per-context sums into ``rules_test.json`` (paired statistics across runs)."""
    asked = config.evaluation.test_rules
    if asked == "none" or config.data.test_tokens == 0:
        return {}
    x = datamodule.test_tensor()
    own = own_rule(module)
    dl = (own,) if config.evaluation.description_length else ()
    curve = (own,) if config.evaluation.dl_curve else ()
    found = evaluate_rules(
        module, datamodule.calibration_tokens(), x, datamodule.contexts("test"), rules_of(module, asked), dl, curve
    )
    atomic_write_json(run_dir / RULES_FILE, {"own_rule": own, "k": module.k, "rules": found}, sort_keys=True)
    out: dict[str, Any] = {"test/own_rule": own}
    for rule, got in found.items():
        figures = {key: value for key, value in got["figures"].items() if isinstance(value, (int, float))}
        out.update({f"test/{rule}/{key}": value for key, value in figures.items()})
        if rule == own:
            out.update({f"test/{key}": value for key, value in figures.items()})
    return out


def one_file_per_checkpoint(folder: Path, step: int) -> None:
    """At the end of training ``last.ckpt`` (and ``best-step<N>.ckpt`` when the last step is
    the best) hold the weights ``final.ckpt`` holds: they become hard links to it, one file on
    disk. final.ckpt is a full training checkpoint, so resuming from it continues the run (its
    calibration is dropped then: see SAEModule.on_load_checkpoint)."""
    final = folder / "final.ckpt"
    for path in (folder / "last.ckpt", folder / f"best-step{step}.ckpt"):
        if path.is_file() and not path.samefile(final):
            tmp = path.with_name(f".{path.name}.link")
            tmp.unlink(missing_ok=True)
            os.link(final, tmp)
            os.replace(tmp, path)


HPARAM_METRICS = (
    "val/batch/fvu",
    "val/threshold/fvu",
    "val/threshold/fvu_at_k",
    "val/threshold/description_length",
    "val/batch/l0_mean",
    "val/threshold/l0_mean",
    "val/dead_fraction",
    "val/underused_fraction",
    "val/batch/delta_ce",
    "val/threshold/delta_ce",
    "test/delta_ce_at_k",
)


def hparams_of(config: TrainConfig) -> dict[str, Any]:
    """What distinguishes runs, flat: the variant with its allocator and loss settings, the
    dictionary, the optimiser, the data, the training length."""
    flat = flatten(
        {
            "variant": config.variant.as_dict(),
            "model": {
                "n_latents": config.model.n_latents,
                "normalisation": config.model.normalisation,
                "init_encoder_scale": config.model.init_encoder_scale,
            },
            "optim": {"lr": config.optim.lr},
            "data": {"kind": config.data.kind, "batch_size": config.data.batch_size},
            "trainer": {"max_steps": config.trainer.max_steps},
            "seed": config.seed,
        }
    )
    return {k: v for k, v in flat.items() if not isinstance(v, (dict, list))}


def _cell(cell, figures: dict[str, float]) -> str:
    try:
        return cell(figures)
    except KeyError:  # a figure this mode did not measure
        return "-"


def print_summary(metrics: dict[str, Any], run_dir: Path, config: TrainConfig | None = None) -> None:
    """The final figures on the console, each with what it means. The running-EMA threshold
    mode is left out once calibrated thresholds exist (it lags early in training; it stays in
    metrics.json and TensorBoard); under-used figures are in metrics.json only."""
    calibrated = "val/threshold/fvu" in metrics
    modes = [("batch", "batch (the allocator on each batch)"), ("threshold", "threshold (calibrated, per token)")]
    if not calibrated:
        modes.append(("threshold_ema", "threshold (running EMA; calibration off)"))
    with_dl = any(f"val/{mode}/description_length" in metrics for mode, _ in modes)
    # a column per summary cell of each registered validation metric (metrics.ValidationMetric.summary)
    columns = [(title, cell) for cls in VALIDATION_METRICS.values() for title, cell in cls.summary.items()]
    rows = [("mode", *(title for title, _ in columns), *(("DL bits/token",) if with_dl else ()))]
    for mode, label in modes:
        if f"val/{mode}/fvu" in metrics:
            prefix = f"val/{mode}/"
            figures = {key[len(prefix) :]: value for key, value in metrics.items() if key.startswith(prefix)}
            dl = metrics.get(f"val/{mode}/description_length")
            rows.append(
                (
                    label,
                    *(_cell(cell, figures) for _, cell in columns),
                    *((f"{dl:.1f}" if dl is not None else "-",) if with_dl else ()),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"\n{metrics['variant']}: k={metrics['k']}, F={metrics['n_latents']}, {metrics['tokens']} tokens "
        f"in {metrics['train_seconds']} s ({metrics['tokens_per_second']:.0f} tokens/s)"
    )
    if "phase_seconds" in metrics:
        print("  time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in metrics["phase_seconds"].items()))
    for r in rows:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    if "affinity_dtype" in metrics:
        print(f"  batch selection read z′ in {metrics['affinity_dtype']} ({metrics['affinity_dtype_reason']})")
    if "val/threshold/fvu_at_k" in metrics and "val/threshold/l0_sweep" in metrics:
        print(
            f"  at L0 = k in threshold mode (the thresholds scaled by one factor, interpolated on the validation "
            f"tokens): FVU {metrics['val/threshold/fvu_at_k']:.4f}"
        )
    if "test/fvu_at_k" in metrics:  # the headline, on tokens no choice was made on
        by_rule = ", ".join(
            f"{rule} {metrics[f'test/{rule}/fvu_at_k']:.4f}" for rule in RULES if f"test/{rule}/fvu_at_k" in metrics
        )
        print(
            f"  test split ({metrics['test/tokens']} tokens), FVU at L0 = k read token by token by each inference "
            f"rule (its own: {metrics['test/own_rule']}): {by_rule} (the rules: docs/method_choices.md)"
        )
    if with_dl:
        mode = "threshold" if "val/threshold/description_length" in metrics else "batch"
        print(
            f"  DL: description length of the codes (which latents fire, their values to the precision "
            f"{metrics[f'val/{mode}/dl_precision']:.3g} that keeps FVU within "
            f"{100 * metrics[f'val/{mode}/dl_tolerance']:g}%); {mode} mode: naive L0·(log2 F + b) "
            f"{metrics[f'val/{mode}/dl_naive_bits']:.1f}, the raw activation at that precision "
            f"{metrics[f'val/{mode}/dl_raw_bits']:.1f}"
        )
    if config is not None:
        window = config.stats.dead_window_tokens
        dead = (
            f"dead {100 * metrics['val/dead_fraction']:.1f}%: latents that fired on none of the last {window} training tokens"
            if metrics["tokens"] >= window
            else f"dead: not measured yet (a latent is dead after {window} training tokens without firing)"
        )
        expected = metrics.get("val/expected_never_fired_fraction")
        rare = (
            f"; at their training firing rates {100 * expected:.1f}% would fire on none of them (rare, not dead)"
            if expected is not None
            else " (a rare latent may not occur there)"
        )
        print(
            f"  never fired on val: latents with no activation on the {config.data.val_tokens} validation tokens{rare}"
        )
        print(f"  {dead}")
    if "val/recovery_mean_max_cos" in metrics:
        print(
            "  feature recovery (synthetic data, known features): the best decoder cosine per true feature, mean "
            f"{metrics['val/recovery_mean_max_cos']:.3f}; share above 0.9 {metrics['val/recovery_share_above_0.9']:.3f}"
            + (" (short runs recover few)" if metrics["val/recovery_share_above_0.9"] < 0.5 else "")
        )
    if "val/absorption" in metrics:
        print(
            "  absorption (the data's feature hierarchy, threshold mode): the share of a parent feature's latent "
            f"firing lost where a child co-fires, mean {metrics['val/absorption']:.3f} (0: none; its rate with the "
            f"parent alone {metrics['val/parent_latent_rate_alone']:.3f}, the parents' best decoder cosine "
            f"{metrics['val/parent_recovery_mean_max_cos']:.3f})"
        )
    if "val/ce_clean" in metrics:
        print(
            f"  downstream: CE clean {metrics['val/ce_clean']:.3f}, zero-ablated {metrics['val/ce_zero_ablation']:.3f}; "
            + "; ".join(
                f"{mode}: ΔCE {metrics[f'val/{mode}/delta_ce']:.3f}, loss recovered "
                f"{100 * metrics[f'val/{mode}/loss_recovered']:.1f}%"
                for mode in ("batch", "threshold")
                if f"val/{mode}/delta_ce" in metrics
            )
            + (
                f"; at L0 = k in threshold mode (on the {metrics['val/downstream_tokens']} test tokens spliced): "
                f"ΔCE {metrics['test/delta_ce_at_k']:.3f}, KL {metrics['test/kl_div_at_k']:.4f}"
                if "test/delta_ce_at_k" in metrics
                else ""
            )
        )
    print(f"  results in {run_dir}")
