"""Tiny Optuna studies through `train.py -m`: run, resume, failures, two workers."""

from __future__ import annotations

import os
import subprocess
import sys

import optuna
import pytest

from ..conftest import ROOT, TINY
from ..helpers.cli import hang_guard

# make test-all: whole Optuna studies through train.py -m
pytestmark = pytest.mark.slow

FAST = [*TINY, "variant.k=4", "trainer.max_steps=6", "trainer.val_check_interval=3"]


def sweep(cli, tmp_path, *extra, study="s"):
    return cli(
        "train.py",
        "-m",
        "sweeps=pareto",
        f"out_dir={tmp_path}",
        f"hydra.sweeper.study_name={study}",
        *FAST,
        *extra,
        timeout=600,
    )


def load(tmp_path, study="s"):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{tmp_path}/sweeps/{study}.db")


def states(study):
    return sorted(t.state.name for t in study.get_trials())


def test_study_runs_resumes_and_reports(cli, tmp_path):
    proc = sweep(cli, tmp_path, "hydra.sweeper.n_trials=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(tmp_path)
    assert states(study) == ["COMPLETE"] * 3
    for t in study.trials:
        assert (
            tmp_path / "sweeps" / "s" / f"trial_{t.number}_{t.params['variant']}_k4_F256" / "metrics.json"
        ).is_file()
        assert t.params["variant"] in (
            "topk",
            "mutual_choice",
            "feature_choice",
            "jumprelu",
            "matryoshka_mutual_choice",
        )
        # threshold mode: L0 = k on the calibration tokens, near it on validation
        assert abs(t.values[1] - 4.0) <= 0.15 * 4.0
    # the same command again: nothing to do; a larger budget: only the missing trials run
    assert sweep(cli, tmp_path, "hydra.sweeper.n_trials=3").returncode == 0
    assert len(load(tmp_path).trials) == 3
    assert sweep(cli, tmp_path, "hydra.sweeper.n_trials=4").returncode == 0
    assert states(load(tmp_path)) == ["COMPLETE"] * 4

    rep = subprocess.run(
        [sys.executable, "-m", "sae_lightning.sweep.report", "--study", "s", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=hang_guard(120),
    )
    assert rep.returncode == 0, rep.stderr
    folder = tmp_path / "sweeps" / "s"
    for name in ("trials.csv", "pareto.csv", "pareto.json", "pareto.png"):
        assert (folder / name).is_file(), name
    assert "Pareto front" in rep.stdout and "run_dir" in (folder / "pareto.csv").read_text()


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(cli, tmp_path):
    # k = 5 > n_latents = 4 is infeasible: those trials fail with the config error as reason
    proc = sweep(
        cli,
        tmp_path,
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.sampler=random",
        "variant=topk",
        "model.n_latents=4",
        "variant.k=choice(3,5)",
        study="f",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(tmp_path, "f")
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(study.trials) == 5 and failed and complete
    assert all(t.params["variant.k"] == 5 for t in failed) and all(t.params["variant.k"] == 3 for t in complete)
    assert all("variant.k=5" in t.user_attrs["reason"] and "n_latents = 4" in t.user_attrs["reason"] for t in failed)


def test_two_workers_share_one_study(cli, tmp_path):
    args = [
        "-m",
        "sweeps=pareto",
        f"out_dir={tmp_path}",
        "hydra.sweeper.study_name=w",
        "hydra.sweeper.n_trials=4",
        *FAST,
    ]
    workers = [cli.start("train.py", *args) for _ in range(2)]
    for w in workers:
        r = w.wait(600)
        assert r.returncode == 0, r.stderr[-3000:]
    study = load(tmp_path, "w")
    assert states(study) == ["COMPLETE"] * 4
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    dirs = {t.user_attrs["run_dir"] for t in study.trials}
    assert len(dirs) == 4  # no trial ran twice into the same folder


def test_the_mdl_preset_optimises_description_length_against_fvu(cli, tmp_path):
    """sweeps=mdl: two objectives, threshold-mode FVU and description length (bits per token),
    both measured at the final validation; the report draws that front."""
    proc = cli("train.py", "-m", "sweeps=mdl", f"out_dir={tmp_path}", *FAST, "hydra.sweeper.n_trials=2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = load(tmp_path, "mdl")
    assert study.metric_names == ["val/threshold/fvu", "val/threshold/description_length"]
    assert states(study) == ["COMPLETE"] * 2
    for t in study.trials:
        assert 0 < t.values[0] < 2 and 0 < t.values[1] < 4 * (8 + 12)  # L0·(log2 F + a few value bits)
    rep = subprocess.run(
        [sys.executable, "-m", "sae_lightning.sweep.report", "--study", "mdl", "--out-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=hang_guard(120),
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    assert (tmp_path / "sweeps" / "mdl" / "pareto.png").is_file() and "description_length" in rep.stdout


def test_a_sweep_under_a_strict_umask_writes_only_files_its_user_can_read(cli, tmp_path):
    """The SQLite study, its lock (seen while held) and every file of a trial's run get the mode
    the umask gives (0600 under 077): a sweep's files are the user's, not the world's."""
    from sae_lightning.atomic import file_lock

    old = os.umask(0o077)
    try:
        with file_lock(tmp_path / "locks" / "s.db.lock"):
            assert (tmp_path / "locks" / "s.db.lock").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
    out = tmp_path / "out"
    proc = cli("train.py", "-m", "sweeps=pareto", f"out_dir={out}", "hydra.sweeper.study_name=s",
               "hydra.sweeper.n_trials=1", *FAST, timeout=600, umask=0o077)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "s.db" for p in files) and any(p.suffix == ".ckpt" for p in files), files
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o077}
    assert not wrong, wrong
