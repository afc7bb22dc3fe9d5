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
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Time limits in the tests guard against hangs; they assert no speed. They are written for an idle
# 2-core machine and multiplied by SAE_TEST_SLACK (default 4), so that the suite also passes while
# other jobs share the cores; raise it on a slower or busier machine.
SLACK = float(os.environ.get("SAE_TEST_SLACK", "4"))


def hang_guard(seconds: float) -> float:
    """A time limit of ``seconds`` on an idle machine, with the slack for a busy one."""
    return seconds * SLACK


def wait_for(predicate, timeout: float = 120, what: str = "") -> None:
    """Poll ``predicate`` until it holds; TimeoutError past the (slackened) ``timeout``."""
    end = time.monotonic() + hang_guard(timeout)
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.05)


def signal_when(running: Running, predicate, sig: int, timeout: float = 120, what: str = "") -> None:
    """Send ``sig`` to a running entry point once ``predicate`` holds (a checkpoint on disk, say).
    The process is frozen (SIGSTOP) the moment the predicate is seen, the signal sent, then it
    goes on (SIGCONT): it cannot run on to its end between the event and the signal, however
    starved the test process is. AssertionError if it ended before the event."""
    wait_for(lambda: predicate() or not running.alive(), timeout, what)
    os.kill(running.pid, signal.SIGSTOP)
    assert running.alive() and predicate(), f"{running.what} ended before {what}: {running.wait().stderr[-2000:]}"
    os.kill(running.pid, sig)
    os.kill(running.pid, signal.SIGCONT)


def as_typed(line: str, cwd: Path = ROOT, timeout: float = 300) -> Result:
    """A command line a run printed for the user, run as typed in a new shell: no virtual
    environment active, only the system's PATH (and the offline switches of the tests)."""
    import subprocess

    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "SAE_TEST_SLACK": str(SLACK)}  # fmt: skip
    r = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=hang_guard(timeout))  # fmt: skip
    return Result(r.returncode, r.stdout, r.stderr)


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


def _child(script: str, args: list[str], out: str, err: str, env: dict[str, str], cwd: str, umask: int | None) -> None:
    # Ctrl-C as on a terminal, even when the test session was started with SIGINT ignored
    # (a background job of a shell without job control)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    os.environ.update(env)
    if umask is not None:  # the fork server's umask is the one it started with, not the test's
        os.umask(umask)
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

    def start(
        self, script: str, *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, umask: int | None = None
    ) -> Running:
        """Start the entry point (in the folder ``cwd``, under ``umask`` if given) and return at
        once (to signal or kill it, or run several together)."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
        p = self.ctx.Process(target=_child, args=(script, list(args), str(out), str(err), env, str(cwd), umask))
        p.start()
        return Running(p, out, err, f"{script} {' '.join(args)}")

    def __call__(
        self,
        script: str,
        *args: str,
        timeout: float = 120,
        env: dict[str, str] | None = None,
        cwd: Path = ROOT,
        umask: int | None = None,
    ) -> Result:
        return self.start(script, *args, env=env, cwd=cwd, umask=umask).wait(timeout)


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
        """Wait for the process; kill it and raise TimeoutError past the (slackened) ``timeout``."""
        limit = hang_guard(timeout)
        self.process.join(limit)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"{self.what} ran past {limit:.0f} s (a hang? SAE_TEST_SLACK={SLACK:g})")
        return Result(self.process.exitcode, self.out.read_text(), self.err.read_text())
