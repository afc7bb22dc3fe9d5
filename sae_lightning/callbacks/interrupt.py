"""``checkpoints/last.ckpt`` where Lightning's ModelCheckpoint does not write it: when training
ends (its last validation may lie steps before), and on Ctrl-C (SIGINT) or SIGTERM, which
finish the current step, save, and stop. No finished step is lost; a second signal
interrupts at once.

The stop is decided at a step boundary, so the checkpoint is exactly resumable (weights,
Adam state, statistics, data position). Under DDP the ranks agree on the step to stop at.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L

from ..errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop(L.Callback):
    def __init__(self, checkpoint_path: Path):
        self.path = Path(checkpoint_path)
        self.requested: int | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame) -> None:
        if self.requested is not None:  # a second signal: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
            "(press Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.requested is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop and self.stopped_at is None:
            trainer.save_checkpoint(self.path, weights_only=False)  # the whole training state
            self.stopped_at = trainer.global_step
            # raised, not trainer.should_stop: Lightning would first run a validation (and, on a
            # causal model's cache, the ΔCE pass) before stopping
            raise Interrupted(f"stopped at step {self.stopped_at}: saved {self.path}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        trainer.save_checkpoint(self.path, weights_only=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
