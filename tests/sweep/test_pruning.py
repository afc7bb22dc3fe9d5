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
