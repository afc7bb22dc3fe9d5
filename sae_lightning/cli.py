"""What the command-line entry points share: one ``error:`` line for every mistake, a console
without known-harmless noise, and OpenMP threads that sleep while they wait (see below).

``run_entry(main)`` runs a ``@hydra.main`` function. Hydra's own errors (an unknown key, a
missing config group option, an override it cannot parse) and ours (:class:`ConfigError`,
:class:`DataError`) end in one line on stderr and exit status 2; a run that diverged
(:class:`TrainingDiverged`) in one line and status 1; Ctrl-C in status 130 (after the
run saved its work: :class:`Interrupted` says how to continue). Anything else is
a bug and keeps its full traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from .errors import ConfigError, DataError, Interrupted, TrainingDiverged, did_you_mean

# The entry points import this module before torch, so that GNU OpenMP (torch's thread pool) reads
# this when it starts: its threads sleep as soon as they wait instead of spinning first. Beside
# another CPU job a spinning thread burns the slice its partner needs, at every parallel region;
# measured (benchmarks.shared_cores, docs/performance.md#sharing-the-cores): the default run
# 3.2-3.5x slower beside a second training run with spinning threads, 1.3-1.4x with sleeping ones,
# and no cost alone. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# known-harmless messages of the libraries, dropped from the console
_QUIET_LOGS = re.compile(
    r"^(💡 Tip: For seamless cloud logging|`Trainer\(limit_\w+=1\.0\)` was configured so|GPU available: False|"
    r"TPU available: False|Restoring states from the checkpoint|Restored all states from|"
    r"`Trainer\.fit` stopped: )"  # our progress prints the end of training
)
_QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*",  # torch's pytree deprecation, triggered inside Lightning
    r".*does not have many workers.*",  # an in-memory or streaming loader needs none
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*Heartbeat of storage is supposed to be used with Study\.optimize.*",  # our sweeper keeps its own heartbeat
    r".*fail_stale_trials is experimental.*",
    r".*Argument ``(heartbeat_interval|grace_period|heartbeat_stale_trial_callback)`` is an experimental feature.*",
    r".*Checkpoint directory .* exists and is not empty.*",  # resuming in place
    r".*Found keys that are not in the model state dict but in the checkpoint.*",
    # validation figures are computed from metrics synced across ranks (or from every rank's copy
    # of the same held-out tensor): equal on every rank, nothing for sync_dist to average
    r".*when logging on epoch level in distributed setting.*",
)


class _DropHarmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _QUIET_LOGS.match(record.getMessage())


def quiet() -> None:
    """Silence the known-harmless log lines and warnings of Lightning, torch and Optuna."""
    for name in (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.pytorch.trainer.connectors.checkpoint_connector",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless())
    for pattern in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorBoard's optional TensorFlow import


REPO = Path(__file__).resolve().parents[1]  # where train.py and harvest.py lie


def shown_path(path: Path | str) -> str:
    """``path`` relative to the working folder where it lies under it, else absolute."""
    path = Path(os.path.abspath(path))
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command(script: str, *args: str) -> str:
    """The command line that runs the entry point ``script`` (train.py, harvest.py) with ``args``
    as typed in a new shell here: the interpreter running now, so that it works whether or not
    its virtual environment is active (``.venv/bin/python train.py ...``)."""
    return shlex.join([shown_path(sys.executable), shown_path(REPO / script), *args])


def fail(message: str, status: int) -> NoReturn:
    """One line on stderr, then exit."""
    line = " ".join(str(message).split())  # one line, whatever the message held
    print(line if line.startswith("error:") else f"error: {line}", file=sys.stderr, flush=True)
    sys.exit(status)


def describe_hydra_error(err: BaseException) -> str:
    """Hydra's multi-line errors as one line, with the options or a did-you-mean."""
    text = str(err)
    cause = err.__cause__
    # an override of a key the config does not have: "Could not override 'a.b'. ... Key 'b' is not in struct"
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        hint = ""
        parent = getattr(cause, "parent_node", None)
        if parent is not None and hasattr(parent, "keys"):
            # the deepest node that exists: for run.out_dir it is the root, whose keys are not run.*
            path = parent._get_full_key(None) if hasattr(parent, "_get_full_key") else key.rpartition(".")[0]
            prefix = f"{path}." if path else ""
            hint = did_you_mean(key, [prefix + str(k) for k in parent.keys() if prefix + str(k) != key])
        value = re.search(r"use \+\S+?=(.*)$", text, re.M)
        shown = f"{key}={value.group(1).strip()}" if value else key
        return f"config error: {shown}: the config has no key {key}{hint} (to add a new key on purpose, write +{shown})"
    # a config group option that does not exist: "Could not find 'variant/switch'" + the available options
    m = re.search(r"Could not find '([^']+)/([^']+)'", text)
    if m:
        group, option = m.groups()
        options = re.findall(r"^\t(\S+)$", text, re.M)
        hint = did_you_mean(option, options)
        return (
            f"config error: {group}={option}: Could not find '{group}/{option}'; available options in "
            f"'{group}': {', '.join(options)}{hint}"
        )
    if type(err).__name__ == "OverrideParseException":
        first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        return f"config error: cannot parse a command-line override: {first}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    detail = "; ".join(lines[:3]) if lines else type(err).__name__
    if cause is not None and str(cause).strip():
        detail += f" ({str(cause).strip().splitlines()[0]})"
    return f"config error: {detail}"


def describe_yaml_error(err: BaseException) -> str:
    """A config file that is not valid YAML, as one line: the file, the line and column, the problem."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "a config file"
    problem = " ".join(filter(None, (getattr(err, "context", None), getattr(err, "problem", None)))) or str(err)
    return f"config error: {where} is not valid YAML: {problem}"


def is_hydra_error(err: BaseException) -> bool:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(err, (HydraException, OmegaConfBaseException))


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Our errors as one line and an exit status. Used inside a single run's task function
    (a SystemExit passes through Hydra untouched, where an exception would get Hydra's
    preamble) and around the whole entry point; not inside sweep trials, whose errors the
    sweeper records."""
    try:
        yield
    except (ConfigError, DataError) as e:
        fail(str(e), 2)
    except TrainingDiverged as e:
        fail(f"training diverged: {e}", 1)
    except Interrupted as e:
        print(str(e), file=sys.stderr, flush=True)
        sys.exit(130)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def _terminated(signum, frame) -> NoReturn:
    raise KeyboardInterrupt


def run_entry(main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` function with the error handling described above. SIGTERM (what a
    scheduler or ``kill`` sends) is a Ctrl-C: the work in progress cleans up as on Ctrl-C (a
    harvest keeps its whole shards and removes its lock; training, whose own handler takes
    both signals while it runs, saves its step) instead of dying where it stands."""
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own traceback
    quiet()
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    with user_errors():
        try:
            main()
        except Exception as e:
            import yaml

            if isinstance(e, yaml.YAMLError):
                fail(describe_yaml_error(e), 2)
            if is_hydra_error(e):
                fail(describe_hydra_error(e), 2)
            raise
