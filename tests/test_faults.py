"""Faults lose no finished work: Ctrl-C and kill -9 mid-run resume to the same result, in the same
folder and TensorBoard run; runs started together get their own folders; a sweep worker that
dies or is stopped mid-trial leaves a study that the same command completes, exactly."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import optuna
import pytest

from sae_lightning.sweep.study import Census

from .conftest import TINY
from .helpers.cli import as_typed, hang_guard, signal_when

# make test-all: kill -9, Ctrl-C and DDP runs of hundreds of steps (minutes)
pytestmark = pytest.mark.slow

RUN = [*TINY, "variant.k=8", "progress=lines", "trainer.log_every_n_steps=10", "trainer.val_check_interval=100"]
TIMINGS = {"train_seconds", "tokens_per_second", "run_dir", "phase_seconds"}
PROVENANCE = {"code", "code_versions"}  # which code made each session (the tree may change between them)
VARIANTS = {
    "topk": ["variant=topk"],
    "mutual_choice": ["variant=mutual_choice"],
    # capacities drawn by seeded stochastic rounding each step, from a demand EMA
    "fc_demand": ["variant=feature_choice", "variant.capacity=demand"],
    # blockwise affinities (100 latents of 256 a block): demand sampled in the selection's pass
    "fc_blocks": ["variant=feature_choice", "model.block_latents=100"],
    # learned thresholds (their Adam state and parameter group) and the Matryoshka term
    "jumprelu": ["variant=jumprelu"],
    "matryoshka_mc": ["variant=matryoshka_mutual_choice"],
}


def only_run(out: Path) -> Path:
    (run,) = (out / "runs").iterdir()
    return run


def tb_steps(run: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def uninterrupted(cli, tmp_path_factory):
    """Each variant trained 600 steps without a break: the reference."""
    runs = {}
    for variant, args in VARIANTS.items():
        out = tmp_path_factory.mktemp(f"ref_{variant}")
        r = cli("train.py", f"out_dir={out}", *args, "trainer.max_steps=600", *RUN)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[variant] = only_run(out)
    return runs


def assert_same_run(resumed: Path, reference: Path) -> None:
    a = json.loads((resumed / "metrics.json").read_text())
    b = json.loads((reference / "metrics.json").read_text())
    skip = TIMINGS | PROVENANCE
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}
    assert a["code_versions"][-1] == a["code"]  # the resumed run lists its sessions' code, its own last
    # one TensorBoard run, its steps continuous and each once, the same values as without the break
    steps = tb_steps(resumed)
    assert [s for s, _ in steps] == sorted({s for s, _ in steps}), "a step logged twice"
    assert steps == tb_steps(reference)
    assert len(list((resumed.parent).iterdir())) == 1  # no second folder
    assert not list((resumed / "checkpoints").glob("*-v*.ckpt")), "a versioned checkpoint (last-v1.ckpt) was left"


@pytest.mark.parametrize(
    "variant,sig",
    [
        ("topk", signal.SIGINT),
        ("mutual_choice", signal.SIGKILL),
        ("fc_demand", signal.SIGKILL),
        ("fc_blocks", signal.SIGKILL),
        ("jumprelu", signal.SIGKILL),
        ("matryoshka_mc", signal.SIGKILL),
    ],
)
def test_a_stopped_run_resumes_in_place_to_the_uninterrupted_result(variant, sig, cli, uninterrupted, tmp_path):
    out = tmp_path / "out"
    p = cli.start("train.py", f"out_dir={out}", *VARIANTS[variant], "trainer.max_steps=600", *RUN)
    signal_when(p, lambda: bool(list(out.glob("runs/*/checkpoints/last.ckpt"))), sig, what="the first checkpoint")
    r = p.wait(60)
    run = only_run(out)
    assert not (run / "metrics.json").exists()
    if sig == signal.SIGINT:  # the step in progress is finished and saved, then the run stops
        assert r.returncode == 130, r.stderr[-2000:]
        assert "stopped at step" in r.stderr and "Traceback" not in r.stderr
        (line,) = re.findall(r"continue with: (.*)$", r.stderr.strip(), re.M)
        assert line.endswith(f"train.py resume={run}"), line
        again = as_typed(line)  # the command works as printed, in a new shell without the venv active
    else:
        assert r.returncode == -signal.SIGKILL
        again = cli("train.py", f"resume={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run} at step" in again.stdout
    assert_same_run(run, uninterrupted[variant])


def test_runs_started_together_get_a_folder_each(cli, tmp_path):
    out = tmp_path / "out"
    procs = [
        cli.start(
            "train.py",
            f"out_dir={out}",
            "variant=topk",
            "trainer.max_steps=3",
            *TINY,
            "variant.k=4",
            f"seed={i}",
            "progress=none",
        )
        for i in range(4)
    ]
    results = [p.wait(300) for p in procs]
    assert all(r.returncode == 0 for r in results), [r.stderr[-1000:] for r in results]
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 4
    seeds = sorted(
        json.loads((run / "metrics.json").read_text())
        and int((run / "config.yaml").read_text().split("\nseed: ")[1].split()[0])
        for run in runs
    )
    assert seeds == [0, 1, 2, 3]  # each run wrote its own config and metrics
    for run in runs:
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-step3.ckpt", "final.ckpt", "last.ckpt"]
        assert len(list((run / "tb").glob("events.out.tfevents.*"))) >= 1


# ---- sweeps ------------------------------------------------------------------------------------
SWEEP = [
    "-m",
    "sweeps=pareto",
    "hydra.sweeper.study_name=f",
    "hydra.sweeper.n_trials=3",
    # a beat a second on an idle machine, slower with the slack: a starved live trial must not look dead
    f"hydra.sweeper.heartbeat_seconds={max(1, round(hang_guard(1)))}",
    *TINY,
    "variant.k=4",
    "trainer.max_steps=400",
    "trainer.val_check_interval=100",
    "hydra.sweeper.pruner.enabled=false",
]


def study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="f", storage=f"sqlite:///{out}/sweeps/f.db")


def first_checkpoint(out: Path) -> bool:
    return bool(list(out.glob("sweeps/f/trial_*/checkpoints/last.ckpt")))


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_sweep_worker_stopped_mid_trial_leaves_a_study_the_same_command_completes(sig, cli, tmp_path):
    out = tmp_path / "out"
    p = cli.start("train.py", *SWEEP, f"out_dir={out}")
    signal_when(p, lambda: first_checkpoint(out), sig, what="a trial's first checkpoint")
    r = p.wait(60)
    s = study(out)
    (stopped,) = [t for t in s.trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)]
    if sig == signal.SIGINT:
        assert r.returncode == 130, r.stderr[-2000:]
        assert f"Trial {stopped.number} is queued again" in r.stderr and "Traceback" not in r.stderr
        assert [t.state.name for t in s.trials][-2:] == ["FAIL", "WAITING"]
    else:
        assert stopped.state == optuna.trial.TrialState.RUNNING  # dead, but nothing else knows yet

    again = cli("train.py", *SWEEP, f"out_dir={out}", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    s = study(out)
    census = Census(s)
    assert [t.state.name for t in census.counted] == ["COMPLETE"] * 3
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in s.trials)
    (retried,) = [t for t in s.trials if t.system_attrs.get("retry_history") == [stopped.number]]
    # the retry continued the stopped trial's run from its checkpoint, in its folder
    assert retried.state == optuna.trial.TrialState.COMPLETE and retried.params == stopped.params
    assert retried.user_attrs["run_dir"] == stopped.user_attrs["run_dir"]
    assert f"resume={stopped.user_attrs['run_dir']}" in retried.user_attrs["overrides"]
    assert json.loads((Path(retried.user_attrs["run_dir"]) / "metrics.json").read_text())["steps"] == 400


DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "variant=mutual_choice"]


def test_a_two_rank_ddp_run_killed_resumes_in_place_to_the_uninterrupted_result(cli, tmp_path):
    """kill -9 of a 2-rank DDP run (global allocation, gloo): the other rank ends on its own (its
    peer's connection drops), and resume= continues in place to the uninterrupted run's result."""
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    run_args = [*DDP, "trainer.max_steps=300", *RUN]
    ref = cli("train.py", f"out_dir={ref_out}", *run_args)
    assert ref.returncode == 0, ref.stderr[-3000:]
    p = cli.start("train.py", f"out_dir={out}", *run_args)
    checkpointed = lambda: bool(list(out.glob("runs/*/checkpoints/last.ckpt")))  # noqa: E731
    signal_when(p, checkpointed, signal.SIGKILL, what="the first checkpoint")
    p.wait(60)
    run = only_run(out)
    again = cli("train.py", f"resume={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run} at step" in again.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["tokens"] == 300 * 128 * 2  # both ranks' batches counted
    assert_same_run(run, only_run(ref_out))
