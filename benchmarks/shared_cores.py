"""The default run's speed while another job shares the cores, under each OpenMP setting.

    python -m benchmarks.shared_cores [--steps 300] [--settings default passive] [--job matmul|train] [--job-setting default]

Trains the default config (`python train.py`, synthetic data) for ``--steps`` steps in a fresh
process, each setting once alone and once beside a stand-in job started before the run and
killed after it, and reports training tokens/s from the run's metrics.json. The stand-in:
``matmul``, a process running fp32 matrix products on as many threads as the machine has cores;
``train``, another default training run (many small parallel regions, as the run itself), with
the same setting. A fair share of a
machine whose cores are all busy costs about 2× on 2 cores; OpenMP threads that spin-wait at
every parallel region for a thread the scheduler has parked cost far more.

Settings (environment of the run):
- ``default``: as it is (``OMP_WAIT_POLICY`` unset);
- ``passive``: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once instead of spinning);
- ``active``: ``OMP_WAIT_POLICY=ACTIVE`` (threads spin);
- ``one_thread``: ``OMP_NUM_THREADS=1``;
- ``spin_10k``: ``GOMP_SPINCOUNT=10000`` (GNU OpenMP's threads spin that many times, then sleep).
Writes outputs/bench/shared_cores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sae_lightning.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},
    "one_thread": {"OMP_NUM_THREADS": "1"},
    "spin_10k": {"GOMP_SPINCOUNT": "10000"},
}
STAND_IN = (
    "import torch, time\n"
    "torch.set_num_threads({threads})\n"
    "a = torch.randn(1024, 1024)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a / 32)\n"
)


def environment(setting: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    return {**env, **SETTINGS[setting], "SAE_LIGHTNING_RUN_DIR": ""}


def stand_in(kind: str, setting: str, out: Path) -> subprocess.Popen:
    if kind == "matmul":
        return subprocess.Popen([sys.executable, "-c", STAND_IN.format(threads=os.cpu_count() or 2)])
    folder = tempfile.mkdtemp(dir=out)
    cmd = [sys.executable, "train.py", f"out_dir={folder}", "trainer.max_steps=1000000", "progress=none"]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=environment(setting), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def one_run(setting: str, steps: int, job_kind: str | None, out: Path, job_setting: str | None = None) -> dict:
    """tokens/s of ``steps`` default training steps under ``setting``, beside a stand-in job of
    ``job_kind`` (None: alone) under ``job_setting`` (None: the run's own)."""
    job = stand_in(job_kind, job_setting or setting, out) if job_kind else None
    try:
        if job is not None:
            time.sleep(3 if job_kind == "matmul" else 15)  # the stand-in at full speed before the run starts
        folder = Path(tempfile.mkdtemp(dir=out))
        cmd = [
            sys.executable,
            "train.py",
            f"out_dir={folder}",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "progress=none",
            "evaluation.description_length=false",
        ]
        r = subprocess.run(cmd, cwd=ROOT, env=environment(setting), capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"error: the {setting} run failed: {r.stderr[-1000:]}")
        (run,) = (folder / "runs").iterdir()
        metrics = json.loads((run / "metrics.json").read_text())
    finally:
        if job is not None:
            job.kill()
            job.wait()
    return {"setting": setting, "job": job_kind, "tokens_per_second": metrics["tokens_per_second"]}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--settings", nargs="+", default=["default", "passive"], choices=list(SETTINGS))
    p.add_argument("--job", choices=["matmul", "train"], default="train", help="the stand-in job (see above)")
    p.add_argument(
        "--job-setting",
        choices=list(SETTINGS),
        default=None,
        help="the stand-in training job's setting (default: the run's own)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench")
    a = p.parse_args(argv)
    if a.steps < 1:
        raise SystemExit(f"error: --steps={a.steps} is not allowed; expected an integer >= 1")
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=a.out) as tmp:
        for setting in a.settings:
            alone = one_run(setting, a.steps, None, Path(tmp))
            shared = one_run(setting, a.steps, a.job, Path(tmp), a.job_setting)
            row = {
                "setting": setting,
                "alone_tok_s": alone["tokens_per_second"],
                "shared_tok_s": shared["tokens_per_second"],
            }
            row["slowdown"] = round(row["alone_tok_s"] / max(row["shared_tok_s"], 1e-9), 2)
            rows.append(row)
            print(
                f"{setting:>10}: alone {row['alone_tok_s']:>8.0f} tok/s, beside a {a.job} job "
                f"{row['shared_tok_s']:>8.0f} tok/s ({row['slowdown']:.2f}× slower)",
                flush=True,
            )
    atomic_write_json(
        a.out / "shared_cores.json", {"steps": a.steps, "job": a.job, "job_setting": a.job_setting, "rows": rows}
    )
    print(f"written {a.out / 'shared_cores.json'}")
    return rows


if __name__ == "__main__":
    main()
