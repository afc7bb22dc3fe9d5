"""Where a run's time goes: the seconds its validations take while it trains (the rest of
``trainer.fit`` is training steps, initialisation and calibration, which the module and the
calibration callback time themselves). train.py adds the final validation and the files it
writes, and reports the table in metrics.json (``phase_seconds``)."""

from __future__ import annotations

import time

import lightning as L


class ValidationTimer(L.Callback):
    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        """Listed after every callback that works at the end of a validation (the downstream
        loss, the figures), so that their time counts as validation, not as training steps."""
        if self._start is not None and trainer.state.fn == "fit":  # the final validate() is timed by train.py
            self.seconds += time.perf_counter() - self._start
        self._start = None
