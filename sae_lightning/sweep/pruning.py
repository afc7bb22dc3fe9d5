"""Pruning of unpromising trials on their intermediate validation figures.

Optuna's pruners are single-objective, and pruning on FVU alone would kill every trial with
a small k, which the front needs. A trial is pruned at step s when at least ``min_trials``
finished trials dominate its (FVU, L0) at the same step s, FVU by a relative ``margin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import optuna

from .study import unmasked


@dataclass
class TrialContext:
    study: optuna.Study
    trial: optuna.Trial
    fvu_key: str
    l0_key: str
    min_trials: int
    margin: float
    enabled: bool

    @classmethod
    def from_spec(cls, spec) -> TrialContext:
        """The trial a run is, from ``config.sweep_trial`` (set by the sweeper): the study is
        opened from its storage, so a trial can run in any process that reaches it."""
        study = optuna.load_study(study_name=spec.study, storage=unmasked(spec.storage))
        return cls(
            study,
            optuna.trial.Trial(study, spec.trial_id),
            spec.fvu_key,
            spec.l0_key,
            spec.min_trials,
            spec.margin,
            spec.pruning,
        )

    def record(self, step: int, fvu: float, l0: float) -> None:
        history = dict(self.trial.user_attrs.get("intermediate", {}))
        history[str(step)] = [fvu, l0]
        self.trial.set_user_attr("intermediate", history)

    def should_prune(self, step: int, fvu: float, l0: float) -> bool:
        if not self.enabled:
            return False
        dominating = 0
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            other = t.user_attrs.get("intermediate", {}).get(str(step))
            if other is not None and other[0] * (1 + self.margin) < fvu and other[1] <= l0:
                dominating += 1
        return dominating >= self.min_trials


class OptunaPruning(L.Callback):
    """Records the trial's run folder when it starts (so that a retry of a trial whose worker
    died resumes from its checkpoint) and each validation's FVU and L0, and prunes by the rule
    above."""

    def __init__(self, ctx: TrialContext):
        self.ctx = ctx

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.ctx.trial.set_user_attr("run_dir", str(trainer.default_root_dir))

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        # thresholds are calibrated when fitting ends: a threshold-mode objective is compared in
        # batch mode at the validations before (every trial alike, step by step)
        fvu_key, l0_key = (
            key if key in m else key.replace("/threshold/", "/batch/") for key in (self.ctx.fvu_key, self.ctx.l0_key)
        )
        if fvu_key not in m or l0_key not in m:
            return
        step, fvu, l0 = trainer.global_step, float(m[fvu_key]), float(m[l0_key])
        self.ctx.record(step, fvu, l0)
        if self.ctx.should_prune(step, fvu, l0):
            raise optuna.TrialPruned(f"pruned at step {step}: FVU {fvu:.4f} at L0 {l0:.1f} is dominated")
