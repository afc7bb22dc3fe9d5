"""Validate the last training step inside ``fit``, so that best-checkpoint tracking sees the end
of every run: Lightning validates only at multiples of ``val_check_interval`` (a run shorter
than one interval would never be validated during training and get no best checkpoint).
Lightning runs a validation when training is asked to stop; this asks at the last step."""

from __future__ import annotations

import lightning as L


class ValidateLastStep(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
