"""The one place that writes to TensorBoard directly: during a run (histograms, scalars from
callbacks, figures, the HParams session; scalars of the training step go through Lightning's
``LightningModule.log``; each of those functions is a no-op without a TensorBoard logger: a bare
Trainer, non-zero ranks), and into a finished run's ``tb/`` (:func:`run_writer`:
``evaluate`` and ``browser``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def _writer(trainer: Any):
    logger = getattr(trainer, "logger", None) if trainer is not None else None
    exp = (
        getattr(logger, "experiment", None) if logger is not None and getattr(trainer, "is_global_zero", True) else None
    )
    return exp if hasattr(exp, "add_histogram") else None


def histogram(trainer: Any, tag: str, values: Tensor, step: int) -> None:
    w = _writer(trainer)
    if w is not None and values.numel():
        w.add_histogram(tag, values.detach().cpu().float(), step)


def count_histogram(trainer: Any, tag: str, counts: Tensor, step: int) -> None:
    """A histogram of the integers 0..n-1 given how often each occurs (e.g. L0 per token)."""
    histogram(trainer, tag, torch.repeat_interleave(torch.arange(counts.numel()), counts.cpu()), step)


def scalars(trainer: Any, values: dict[str, float], step: int) -> None:
    logger = getattr(trainer, "logger", None) if trainer is not None else None
    if logger is not None and getattr(trainer, "is_global_zero", True):
        logger.log_metrics(values, step=step)


def figure(trainer: Any, tag: str, fig: Any, step: int) -> None:
    """A matplotlib figure as an image (the Images tab)."""
    w = _writer(trainer)
    if w is not None:
        w.add_figure(tag, fig, step, close=False)


def hparams(trainer: Any, params: dict[str, Any], metrics: dict[str, float]) -> None:
    """The run's hyperparameters and final figures (the HParams tab: runs and sweep trials in one
    table). Values must be numbers, strings or booleans; None becomes the string 'null'."""
    logger = getattr(trainer, "logger", None) if trainer is not None else None
    if logger is not None and getattr(trainer, "is_global_zero", True) and hasattr(logger, "log_hyperparams"):
        clean = {
            k: ("null" if v is None else v)
            for k, v in params.items()
            if isinstance(v, (int, float, str, bool)) or v is None
        }
        logger.log_hyperparams(clean, metrics={k: v for k, v in metrics.items() if v == v})
        # written after the trainer closed its writer: the logger opened a new one, which nothing
        # else flushes (a process that exits without running finalisers would lose the session)
        logger.finalize("success")


@contextmanager
def run_writer(run_dir: Path) -> Iterator[Any]:
    """A SummaryWriter on a finished run's ``tb/`` folder, closed on exit."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(Path(run_dir) / "tb"))
    try:
        yield writer
    finally:
        writer.close()


def write_scalars(run_dir: Path, prefix: str, figures: dict[str, Any], skip: tuple[str, ...] = ()) -> None:
    """The float figures of an evaluation as scalars ``<prefix>/<key>`` at step 0 of the run's tb/."""
    with run_writer(run_dir) as w:
        for key, value in figures.items():
            if isinstance(value, float) and key not in skip:
                w.add_scalar(f"{prefix}/{key}", value, 0)
