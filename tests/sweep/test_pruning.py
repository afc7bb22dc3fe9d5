import optuna

from sae_lightning.sweep.pruning import TrialContext


def study_with(finished):
    study = optuna.create_study(directions=["minimize", "minimize"])
    for step_values in finished:
        t = study.ask()
        t.set_user_attr("intermediate", {str(s): v for s, v in step_values.items()})
        study.tell(t, [0.1, 10])
    return study


def test_pruned_only_when_enough_finished_trials_dominate_at_the_same_step():
    study = study_with([{100: [0.20, 16]}] * 3 + [{100: [0.50, 4]}])
    trial = study.ask()
    ctx = TrialContext(study, trial, "val/batch/fvu", "val/batch/l0_mean", min_trials=3, margin=0.05, enabled=True)
    assert ctx.should_prune(100, 0.30, 16)  # three trials with FVU 0.20 at the same L0
    assert not ctx.should_prune(100, 0.30, 8)  # sparser than all of them: on the front, kept
    assert not ctx.should_prune(100, 0.205, 16)  # within the margin
    assert not ctx.should_prune(200, 0.90, 16)  # nothing recorded at that step
    ctx.record(100, 0.3, 16)
    assert trial.user_attrs["intermediate"] == {"100": [0.3, 16]}
    assert not TrialContext(
        study, trial, "val/batch/fvu", "val/batch/l0_mean", min_trials=4, margin=0.05, enabled=True
    ).should_prune(100, 0.30, 16)


def test_threshold_objectives_are_compared_in_batch_mode_before_calibration():
    """Thresholds are calibrated when fitting ends: at the validations before, a threshold-mode
    objective (sweeps=pareto) is read in batch mode, every trial alike; a figure it has is used."""
    from types import SimpleNamespace

    import torch

    from sae_lightning.sweep.pruning import OptunaPruning

    study = study_with([{10: [0.20, 16]}] * 3)
    trial = study.ask()
    ctx = TrialContext(study, trial, "val/threshold/fvu", "val/threshold/l0_mean", min_trials=3, margin=0.05,
                       enabled=True)  # fmt: skip
    callback = OptunaPruning(ctx)

    def validate(metrics):
        trainer = SimpleNamespace(sanity_checking=False, state=SimpleNamespace(fn="fit"), global_step=10,
                                  callback_metrics={k: torch.tensor(v, dtype=torch.float64) for k, v in metrics.items()})  # fmt: skip
        callback.on_validation_end(trainer, None)

    validate({"val/batch/fvu": 0.19, "val/batch/l0_mean": 16.0})  # no threshold figures yet: batch mode's
    assert trial.user_attrs["intermediate"] == {"10": [0.19, 16.0]}
    validate({"val/batch/fvu": 0.5, "val/batch/l0_mean": 16.0, "val/threshold/fvu": 0.18,
              "val/threshold/l0_mean": 16.0})  # fmt: skip
    assert trial.user_attrs["intermediate"]["10"] == [0.18, 16.0]
    try:
        validate({"val/batch/fvu": 0.5, "val/batch/l0_mean": 16.0})  # dominated by the three finished trials
    except optuna.TrialPruned as e:
        assert "pruned at step 10" in str(e)
    else:
        raise AssertionError("a dominated trial was not pruned")
