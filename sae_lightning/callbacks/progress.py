"""Training progress counted in optimizer steps, so that it reads right after a resume.

``mode``: ``bar`` (a tqdm bar: step / max_steps, tokens/s, FVU, L0), ``lines`` (a plain line
at most every ``every_seconds`` and at each validation: for log files and sweeps), ``none``.
``auto`` picks ``bar`` on a terminal and ``lines`` otherwise.
"""

from __future__ import annotations

import sys
import time

import lightning as L

from ..progress import format_eta, resolve_mode


class Progress(L.Callback):
    """``batch_size``: tokens per step on one process; the rate counts every process's, from the
    trainer's own world size (which resolves ``devices=-1`` and ``auto``)."""

    def __init__(self, mode: str = "auto", batch_size: int = 0, every_seconds: float = 30.0):
        self.mode = resolve_mode(mode)
        self.batch_size, self.every_seconds = batch_size, every_seconds
        self.tokens_per_step = batch_size
        self.bar = None

    def _figures(self, trainer) -> dict[str, float]:
        m = trainer.progress_bar_metrics
        return {k: float(m[k]) for k in ("fvu", "l0") if k in m}

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or self.mode == "none":
            return
        self.tokens_per_step = self.batch_size * trainer.world_size
        self._start_step, self._t0 = trainer.global_step, time.perf_counter()
        self._last = self._t0
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=trainer.max_steps,
                initial=trainer.global_step,
                unit="step",
                desc="train",
                dynamic_ncols=True,
                file=sys.stderr,
            )
        elif trainer.global_step:
            self._line(trainer, "resumed")

    def _rate(self, trainer) -> float:
        elapsed = time.perf_counter() - self._t0
        return (trainer.global_step - self._start_step) * self.tokens_per_step / max(elapsed, 1e-9)

    def _line(self, trainer, note: str = "") -> None:
        figures = ", ".join(f"{k} {v:.4g}" for k, v in self._figures(trainer).items())
        step, total = trainer.global_step, trainer.max_steps
        done = step - self._start_step
        eta = ""
        if 0 < done and step < total:  # the steps left at this session's pace (validations included)
            eta = f", ETA {format_eta((total - step) * (time.perf_counter() - self._t0) / done)}"
        print(
            f"step {step}/{total} ({100 * step / max(total, 1):.0f}%), {self._rate(trainer):.0f} tokens/s{eta}"
            + (f", {figures}" if figures else "")
            + (f" [{note}]" if note else ""),
            flush=True,
        )
        self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.is_global_zero or self.mode == "none":
            return
        if self.bar is not None:
            self.bar.n = trainer.global_step
            self.bar.set_postfix(
                {"tok/s": f"{self._rate(trainer):.0f}", **{k: f"{v:.4g}" for k, v in self._figures(trainer).items()}},
                refresh=False,
            )
            self.bar.refresh()
        elif time.perf_counter() - self._last >= self.every_seconds:
            self._line(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.mode == "none" or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        if "val/batch/fvu" not in m:
            return
        text = (
            f"validation at step {trainer.global_step}: FVU {float(m['val/batch/fvu']):.4f} "
            f"(L0 {float(m['val/batch/l0_mean']):.2f})"
        )
        # before calibration (at the end of training) the threshold mode is the running EMA, which lags
        for mode, label in (("threshold", "calibrated thresholds"), ("threshold_ema", "running-EMA thresholds")):
            if f"val/{mode}/fvu" in m:
                text += f"; {label}: FVU {float(m[f'val/{mode}/fvu']):.4f} (L0 {float(m[f'val/{mode}/l0_mean']):.2f})"
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.n = trainer.global_step
            self.bar.close()
            self.bar = None
        elif trainer.is_global_zero and self.mode == "lines":
            self._line(trainer, "end of training")

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
