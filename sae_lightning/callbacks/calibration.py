"""Calibrates the allocator's inference thresholds on held-out tokens when fitting ends (and,
with ``match_l0``, scales them so that the mean L0 on those tokens is k); with
``every_validation``, also before each validation during training (learning curves of the
threshold mode)."""

from __future__ import annotations

import time

import lightning as L


class ThresholdCalibration(L.Callback):
    def __init__(self, enabled: bool = True, match_l0: bool = True, every_validation: bool = False):
        self.enabled, self.match_l0, self.every_validation = enabled, match_l0, every_validation
        self.figures: dict[str, float] = {}
        self.seconds = 0.0  # how long calibration took (train.py's phase table)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not (self.every_validation and self.enabled and pl_module.allocator.has_thresholds):
            return
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        pl_module.calibrate(trainer.datamodule.calibration_tokens(), match_l0=self.match_l0)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not (self.enabled and pl_module.allocator.has_thresholds):
            return
        start = time.perf_counter()
        x = trainer.datamodule.calibration_tokens()
        self.figures = pl_module.calibrate(x, match_l0=self.match_l0)
        self.seconds = time.perf_counter() - start
        shown = ", ".join(f"{key}={value:.4g}" for key, value in self.figures.items())
        pl_module.print(f"calibrated thresholds on {x.shape[0]} held-out tokens: {shown}")
