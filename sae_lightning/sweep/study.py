"""The study's bookkeeping, shared by every worker through the storage: where it is stored,
its sampler, which trials count towards ``n_trials`` (a retried trial is counted once), the
retry of a trial whose worker died, and the heartbeat that tells a live trial from a dead one."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path

import optuna

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
RUNNING, WAITING = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING


def default_storage(out_dir: str, study_name: str) -> str:
    path = Path(out_dir).resolve() / "sweeps" / f"{study_name}.db"
    return f"sqlite:///{path}"


# the storage URL with its password, for the trials the sweeper runs: their config holds the masked one
STORAGE_ENV = "SAE_LIGHTNING_SWEEP_STORAGE"


def masked(url: str) -> str:
    """The storage URL as it may be shown or saved: its password replaced by ``***``
    (``postgresql://user:***@host/db``); a URL without one unchanged."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: mask what looks like user:password@
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
    return parsed.render_as_string(hide_password=True) if parsed.password is not None else url


def redact(text: str, url: str | None) -> str:
    """``text`` with the password of ``url`` (and the URL itself) masked wherever it occurs."""
    if not url:
        return text
    from sqlalchemy.engine import make_url

    text = text.replace(url, masked(url))
    try:
        password = make_url(url).password
    except Exception:
        password = None
    return text.replace(str(password), "***") if password else text


def unmasked(shown: str) -> str:
    """The URL to connect with for a trial's ``sweep_trial.storage`` (the masked URL): the one
    the sweeper put in :data:`STORAGE_ENV` when it masks to the same, else ``shown`` itself."""
    real = os.environ.get(STORAGE_ENV)
    return real if real and masked(real) == shown else shown


def make_sampler(name: str, seed: int | None, n_startup: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup))
    return optuna.samplers.RandomSampler(seed=seed)


def retry(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue a trial again with the same parameters and attributes; the retry remembers which
    trials it replaces (``retry_history``), so they are not counted towards ``n_trials``."""
    system_attrs = {
        **trial.system_attrs,
        "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
        "retry_history": [*trial.system_attrs.get("retry_history", []), trial.number],
    }
    study.add_trial(
        optuna.trial.create_trial(
            state=WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=trial.user_attrs,
            system_attrs=system_attrs,
        )
    )


class Census:
    """The study's trials as counted towards ``n_trials``: a trial replaced by a retry, and a
    trial created beyond the budget by a worker racing another, do not count."""

    def __init__(self, study: optuna.Study):
        trials = study.get_trials(deepcopy=False)
        replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
        self.counted = [t for t in trials if t.number not in replaced and not t.user_attrs.get("over_budget")]
        self.finished = sum(t.state in FINISHED for t in self.counted)
        self.running = sum(t.state == RUNNING for t in self.counted)
        self.waiting = sum(t.state == WAITING for t in self.counted)


class Heartbeat:
    """Records a running trial's heartbeat in the storage every ``interval`` seconds."""

    def __init__(self, storage, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{trial_id}")

    def _beat(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; a dead storage fails the trial anyway
                self.storage.record_heartbeat(self.trial_id)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
