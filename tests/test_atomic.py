"""Atomic writes and the inter-process lock: nothing half-written, no lock file left behind."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from sae_lightning.atomic import atomic_write_text, file_lock

from .helpers.cli import hang_guard


def test_an_atomic_write_leaves_the_old_file_on_an_error(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")

    class Boom(Exception):
        pass

    from sae_lightning.atomic import atomic_path

    with pytest.raises(Boom):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise Boom
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_the_lock_file_and_the_folders_made_for_it_are_removed(tmp_path):
    lock = tmp_path / "a" / "b" / ".x.lock"
    with file_lock(lock):
        assert lock.exists()
    assert not (tmp_path / "a").exists()
    (tmp_path / "keep").mkdir()
    with file_lock(tmp_path / "keep" / ".y.lock"):
        pass
    assert (tmp_path / "keep").is_dir() and not any((tmp_path / "keep").iterdir())


def _hold(path: str, waiting, entered, release, log: str) -> None:
    with file_lock(path, on_wait=waiting.set):
        with open(log, "a") as f:
            f.write(f"in {os.getpid()}\n")
        entered.set()
        release.wait(30)
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\n")


def test_waiters_take_the_lock_one_at_a_time_though_its_file_is_removed(tmp_path):
    """The holder removes the file when it leaves. B, which waited on that (now removed) file,
    must lock the file at the path afresh; otherwise C, starting after the removal, would
    create a new file, lock it, and hold the lock together with B."""
    ctx = multiprocessing.get_context("fork")
    path, log = str(tmp_path / ".c.lock"), str(tmp_path / "log")
    (a_wait, a_in, a_out), (b_wait, b_in, b_out), (c_wait, c_in, c_out) = [
        (ctx.Event(), ctx.Event(), ctx.Event()) for _ in range(3)
    ]
    a = ctx.Process(target=_hold, args=(path, a_wait, a_in, a_out, log))
    b = ctx.Process(target=_hold, args=(path, b_wait, b_in, b_out, log))
    c = ctx.Process(target=_hold, args=(path, c_wait, c_in, c_out, log))
    a.start()
    assert a_in.wait(hang_guard(10)) and not a_wait.is_set()
    b.start()
    assert b_wait.wait(hang_guard(10))  # B found A's file locked: it blocks on that file
    a_out.set()
    assert b_in.wait(hang_guard(10))  # A left (and removed its file); B holds the lock
    c.start()
    assert c_wait.wait(hang_guard(10)), "C took the lock while B held it"  # C found it held, and waits
    assert not c_in.is_set()
    b_out.set()
    assert c_in.wait(hang_guard(10))
    c_out.set()
    for p in (a, b, c):
        p.join(30)
        assert p.exitcode == 0
    lines = open(log).read().split()
    assert lines[0::2] == ["in", "out"] * 3 and lines[1::2][0::2] == lines[1::2][1::2]
    assert not os.path.exists(path)
