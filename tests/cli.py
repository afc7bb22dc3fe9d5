"""Run the command-line entry points (train.py, harvest.py) as a user would, fast.

Each call forks a fresh process from a fork server that has the heavy modules imported (and
has done no work, so no thread pools to inherit), sets ``sys.argv``, and runs the script as
``__main__``: the exit status, stdout and stderr are exactly what the shell would see, at a
fraction of a new interpreter's start-up (about 7 s of imports).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = [
    "lightning",
    "hydra",
    "optuna",
    "transformers",
    "sae_lightning.train",
    "sae_lightning.sweep.sweeper",
    "sae_lightning.data.harvest",
    "sae_lightning.cli",
]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def _child(script: str, args: list[str], out: str, err: str, env: dict[str, str]) -> None:
    os.chdir(ROOT)
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(handle, fd)
        os.close(handle)
    sys.argv = [script, *args]
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class CLI:
    def __init__(self, workdir: Path):
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload(PRELOAD)
        self.workdir = Path(workdir)
        self.n = 0

    def start(self, script: str, *args: str, env: dict[str, str] | None = None) -> Running:
        """Start the entry point and return at once (to signal or kill it, or run several together)."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
        p = self.ctx.Process(target=_child, args=(script, list(args), str(out), str(err), env))
        p.start()
        return Running(p, out, err, f"{script} {' '.join(args)}")

    def __call__(self, script: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None) -> Result:
        return self.start(script, *args, env=env).wait(timeout)


@dataclass
class Running:
    process: multiprocessing.process.BaseProcess
    out: Path
    err: Path
    what: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.is_alive()

    def wait(self, timeout: float = 120) -> Result:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"{self.what} ran past {timeout} s")
        return Result(self.process.exitcode, self.out.read_text(), self.err.read_text())
