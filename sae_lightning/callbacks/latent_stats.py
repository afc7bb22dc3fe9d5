"""Dead-feature tracking in TensorBoard: dead and under-used fractions, the log10 density
histogram of the latents and its Zipf fit, read from the module's LatentStats."""

from __future__ import annotations

import lightning as L

from .. import tb
from ..zipf import fit_zipf


class LatentStatsMonitor(L.Callback):
    def __init__(self, every_n_steps: int = 200):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stats = pl_module.stats
        if step % max(1, trainer.log_every_n_steps) == 0:
            summary = stats.summary()
            pl_module.log_dict(
                {
                    "train/dead_fraction": summary["dead_fraction"],
                    "train/underused_fraction": summary["underused_fraction"],
                }
            )
        if self.every_n_steps and step % self.every_n_steps == 0:
            density = stats.density
            tb.histogram(trainer, "train/log10_density", density[density > 0].log10(), step)
            fit = fit_zipf(density)
            if fit is not None:
                pl_module.log_dict({"train/zipf_fit_alpha": fit[0], "train/zipf_fit_beta": fit[1]})
