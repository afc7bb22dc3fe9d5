"""Counting a study's trials towards n_trials: retries replace what they retry, trials created
beyond the budget by racing workers do not count."""

from __future__ import annotations

import optuna

from sae_lightning.sweep.study import Census, retry
from sae_lightning.sweep.sweeper import OptunaSweeper


def make_study():
    return optuna.create_study(directions=["minimize", "minimize"])


def test_a_retry_replaces_the_trial_it_retries():
    study = make_study()
    for _ in range(2):
        t = study.ask()
        t.suggest_int("k", 1, 9)
        study.tell(t, [0.5, 4.0])
    dead = study.ask()
    dead.suggest_int("k", 1, 9)
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    retry(study, study.trials[dead.number])
    census = Census(study)
    assert [t.number for t in census.counted] == [0, 1, 3]
    assert census.finished == 2 and census.waiting == 1
    again = study.ask()  # the queued retry comes first, with the same parameters
    assert again.number == 3 and again.suggest_int("k", 1, 9) == study.trials[dead.number].params["k"]
    study.tell(again, state=optuna.trial.TrialState.FAIL)
    retry(study, study.trials[3])
    assert study.trials[4].system_attrs["retry_history"] == [2, 3]
    assert [t.number for t in Census(study).counted] == [0, 1, 4]


def test_a_trial_beyond_the_budget_is_given_back():
    study = make_study()
    sweeper = OptunaSweeper(study_name="s", objectives=["a", "b"], directions=["minimize", "minimize"], n_trials=2)
    sweeper._validate()
    first, second = study.ask(), study.ask()  # two workers saw room for one more each
    assert not sweeper._over_budget(study, first) and not sweeper._over_budget(study, second)
    third = study.ask()
    assert sweeper._over_budget(study, third)
    assert study.trials[2].state == optuna.trial.TrialState.FAIL and study.trials[2].user_attrs["over_budget"]
    assert len(Census(study).counted) == 2


def test_the_report_says_why_a_trial_without_a_recorded_reason_failed():
    """A trial failed for a dead worker (its heartbeat went stale) carries no reason of the
    sweeper's: the report says that its worker died, when, and which trial retried it."""
    from sae_lightning.sweep.report import trial_rows

    study = make_study()
    for _ in range(2):  # trial 0: worker died, retried as 1, whose worker died too and was not retried
        dead = study.ask()
        dead.suggest_int("k", 1, 9)
        study.tell(dead, state=optuna.trial.TrialState.FAIL)
        if dead.number == 0:
            retry(study, study.trials[0])
    ok = study.ask()
    ok.set_user_attr("reason", "recorded")
    study.tell(ok, state=optuna.trial.TrialState.FAIL)
    rows = {r["trial"]: r["reason"] for r in trial_rows(study)}
    assert rows[0].startswith("its worker died: the trial's heartbeat stopped (found at 20")
    assert rows[0].endswith("retried as trial 1") and rows[1].endswith("not retried (max_retries)")
    assert rows[2] == "recorded"
