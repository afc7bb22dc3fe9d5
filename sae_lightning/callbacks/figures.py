"""The run's figures (plots.py) as TensorBoard images at every validation, and as PNG files in
the run folder after the final one."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from .. import plots, tb


class RunFigures(L.Callback):
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        figs = plots.run_figures(pl_module)
        try:
            for name, fig in figs.items():
                tb.figure(trainer, f"figures/{name}", fig, trainer.global_step)
            if trainer.state.fn == "validate":  # the final validation, after calibration
                for name, fig in figs.items():
                    plots.save(fig, self.run_dir / plots.FILES[name])
        finally:
            plots.close(figs)
