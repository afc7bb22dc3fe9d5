"""Calibrates the allocator's inference thresholds on held-out tokens when fitting ends (and,
with ``match_l0``, scales them so that the mean L0 on those tokens is k)."""

from __future__ import annotations

import time

import lightning as L


class ThresholdCalibration(L.Callback):
    def __init__(self, enabled: bool = True, match_l0: bool = True):
        self.enabled, self.match_l0 = enabled, match_l0
        self.figures: dict[str, float] = {}
        self.seconds = 0.0  # how long calibration took (train.py's phase table)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not (self.enabled and pl_module.allocator.has_thresholds):
            return
        start = time.perf_counter()
        x = trainer.datamodule.calibration_tokens()
        self.figures = pl_module.calibrate(x, match_l0=self.match_l0)
        self.seconds = time.perf_counter() - start
        shown = ", ".join(f"{key}={value:.4g}" for key, value in self.figures.items())
        pl_module.print(f"calibrated thresholds on {x.shape[0]} held-out tokens: {shown}")
