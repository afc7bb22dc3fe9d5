"""Sweeps on a real PostgreSQL server: two workers share one study, one is killed with kill -9
mid-trial, and the same command run again ends with exactly n_trials finished trials.

The server is the machine's own PostgreSQL (Debian's ``postgresql`` package: ``initdb`` and
``pg_ctl``), started for this module in a temporary folder on a free port, with the
``psycopg`` driver (``psycopg[binary]``) of the test extra. Without them the module is skipped, saying why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest

from sae_lightning.sweep.report import trial_rows
from sae_lightning.sweep.study import Census

from ..conftest import TINY
from ..helpers.cli import hang_guard, wait_for
from ..helpers.requires import require

# make test-all: a PostgreSQL server and two sweep workers
pytestmark = pytest.mark.slow

N_TRIALS = 4


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).exists():
            return str(folder / name)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server for this module; yields its SQLAlchemy URL."""
    require(importlib.util.find_spec("psycopg") is not None, "the psycopg driver", "the test extra: psycopg[binary]")
    initdb, pg_ctl = _tool("initdb"), _tool("pg_ctl")
    require(
        initdb is not None and pg_ctl is not None, "a PostgreSQL server (initdb, pg_ctl)", "apt-get install postgresql"
    )
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        import pwd

        runuser = shutil.which("runuser")
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pw = None
        require(pw is not None and runuser is not None, "running as root: the postgres user and runuser",
                "apt-get install postgresql, which adds the user")  # fmt: skip
        as_user = [runuser, "-u", "postgres", "--"]
    # not under pytest's own temporary folder, which only root may enter
    folder = Path(tempfile.mkdtemp(prefix="sae-lightning-pg-"))
    if as_user:
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    data, port = folder / "data", _free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "sweeps", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)  # fmt: skip
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"],
                   check=True, capture_output=True)  # fmt: skip
    try:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="sweeps", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE study")
        yield f"postgresql://sweeps@127.0.0.1:{port}/study"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def sweep(url: str, out: Path) -> list[str]:
    return [
        "-m", "sweeps=pareto", "hydra.sweeper.study_name=pg", f"hydra.sweeper.storage={url}",
        f"hydra.sweeper.n_trials={N_TRIALS}", f"hydra.sweeper.heartbeat_seconds={max(1, round(hang_guard(1)))}", "hydra.sweeper.pruner.enabled=false",
        *TINY, "variant.k=4", "trainer.max_steps=300", "trainer.val_check_interval=100", f"out_dir={out}",
    ]  # fmt: skip


def test_two_workers_one_killed_mid_trial_end_with_exactly_n_trials(postgres, cli, tmp_path):
    out = tmp_path / "out"
    a = cli.start("train.py", *sweep(postgres, out))
    wait_for(lambda: bool(list(out.glob("sweeps/pg/trial_*/checkpoints/last.ckpt"))) or not a.alive(),
             timeout=180, what="worker A's first checkpoint")  # fmt: skip
    assert a.alive(), a.wait().stderr[-2000:]
    b = cli.start("train.py", *sweep(postgres, out))  # a second worker joins the same study
    wait_for(lambda: len(list(out.glob("sweeps/pg/trial_*"))) >= 2 or not b.alive(), timeout=180,
             what="worker B's first trial")  # fmt: skip
    os.kill(a.pid, signal.SIGKILL)
    a.wait(60)
    study = optuna.load_study(study_name="pg", storage=postgres)
    killed = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert killed, "worker A died mid-trial: its trial should still read RUNNING"

    r = b.wait(600)
    assert r.returncode == 0, r.stderr[-3000:]
    again = cli("train.py", *sweep(postgres, out), timeout=600)  # the same command, after the fault
    assert again.returncode == 0, again.stderr[-3000:]

    study = optuna.load_study(study_name="pg", storage=postgres)
    states = [t.state.name for t in study.trials]
    assert [t.state.name for t in Census(study).counted] == ["COMPLETE"] * N_TRIALS, states
    assert "RUNNING" not in states and "WAITING" not in states, states
    # the killed worker's trial, and only it, failed (its heartbeat went stale) and a retry took its place
    retried = {n for t in study.trials for n in t.system_attrs.get("retry_history", [])}
    (failed,) = [t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed in {t.number for t in killed} and retried == {failed}, (states, retried)
    (retry,) = [t for t in study.trials if t.system_attrs.get("retry_history") == [failed]]
    assert retry.user_attrs["run_dir"] == study.trials[failed].user_attrs["run_dir"]  # resumed in its folder
    reasons = {row["trial"]: row["reason"] for row in trial_rows(study)}
    assert reasons[failed].startswith("its worker died") and reasons[failed].endswith(
        f"retried as trial {retry.number}"
    )
    print(f"trials: {states} (retried: {sorted(retried)})")


PASSWORD = "s3cret-Pw"


def test_a_storage_password_reaches_no_output(postgres, cli, tmp_path):
    """A sweep whose storage URL holds a password (the server trusts the loopback, so any password
    connects): nothing the sweep prints or writes holds it; what shows the URL shows it masked."""
    url = postgres.replace("sweeps@", f"sweeps:{PASSWORD}@")
    out = tmp_path / "out"
    args = ["-m", "sweeps=pareto", "hydra.sweeper.study_name=secret", f"hydra.sweeper.storage={url}",
            "hydra.sweeper.n_trials=2", "hydra.sweeper.pruner.enabled=false", *TINY, "variant.k=4",
            "trainer.max_steps=20", "trainer.val_check_interval=10", "progress=lines", f"out_dir={out}"]  # fmt: skip
    r = cli("train.py", *args, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    shown = postgres.replace("sweeps@", "sweeps:***@")
    assert shown in r.stdout + r.stderr  # the study's line names the storage, masked
    from sae_lightning.sweep.report import main as report

    report(["--study", "secret", "--storage", url, "--out-dir", str(out)])
    bad = cli("train.py", *[a.replace("/study", "/no_such_db") for a in args])  # a storage that cannot be opened
    assert bad.returncode == 2 and "cannot open the study storage" in bad.stderr, bad.stderr
    texts = {"stdout": r.stdout + bad.stdout, "stderr": r.stderr + bad.stderr}
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files) and any(p.suffix == ".ckpt" for p in files)
    assert any(p.name.startswith("events.out.tfevents") for p in files) and any(p.name == "pareto.json" for p in files)
    leaks = [name for name, text in texts.items() if PASSWORD in text]
    leaks += [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not leaks, leaks
    trial_configs = list(out.glob("sweeps/secret/trial_*/config.yaml"))
    assert trial_configs and all(shown in p.read_text() for p in trial_configs)
    assert json.loads((out / "sweeps" / "secret" / "pareto.json").read_text())["storage"] == shown
