"""Opening a run never runs code from it: every entry point that reads a checkpoint refuses one
whose pickle would call something, with one line, exit 2, and nothing written."""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning import SAEModule
from sae_lightning.browser import main as browser
from sae_lightning.checkpoint_file import ALLOWED, check_plain, load
from sae_lightning.errors import DataError
from sae_lightning.evaluate import main as evaluate
from sae_lightning.interop import main as interop


class Payload:
    """Pickles as a call of os.system that creates ``marker``: what a crafted checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(path: Path, marker: Path) -> None:
    """A torch file shaped like our checkpoints, with the payload among its hyperparameters."""
    torch.save({"state_dict": {}, "hyper_parameters": {"config": Payload(marker), "d_model": 4}}, path)


def test_the_payload_would_run_if_unpickled(tmp_path):
    """The stand-in is real: the ordinary unpickler runs it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    crafted(tmp_path / "evil.ckpt", marker)
    torch.load(tmp_path / "evil.ckpt", weights_only=False)
    assert marker.exists()


def test_load_refuses_a_global_naming_the_file_and_the_object(tmp_path):
    marker = tmp_path / "ran"
    crafted(tmp_path / "evil.ckpt", marker)
    with pytest.raises(DataError) as e:
        load(tmp_path / "evil.ckpt", "resume=x")
    msg = str(e.value)
    assert msg.startswith(f"resume=x: {tmp_path / 'evil.ckpt'} holds a posix.system object"), msg
    assert "refused without loading it" in msg
    assert not marker.exists()


def test_load_names_a_damaged_file_as_unreadable(tmp_path):
    (tmp_path / "bad.ckpt").write_bytes(b"not a torch file")
    with pytest.raises(DataError, match=r"bad\.ckpt is not a readable checkpoint .*; use another checkpoint"):
        load(tmp_path / "bad.ckpt", "run")


def test_the_allowlist_is_empty_and_plain_content_loads(tmp_path):
    """Our checkpoints need nothing beyond torch's default: tensors and plain containers."""
    assert ALLOWED == ()
    tree = {"a": [1, 2.5, "s", None, True], "b": OrderedDict(x=torch.ones(2)), "c": (torch.Size([2]), torch.float32),
            "hyper_parameters": {"config": {"seed": 0}}, "state_dict": OrderedDict()}  # fmt: skip
    check_plain(tree)
    torch.save(tree, tmp_path / "ok.ckpt")
    back = load(tmp_path / "ok.ckpt", "x")
    assert back["a"] == tree["a"] and torch.equal(back["b"]["x"], torch.ones(2)) and back["c"] == tree["c"]
    # a plain torch file that is not a run's checkpoint: one message, whichever reader opened it
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    with pytest.raises(
        DataError, match=r"^x: .*other\.ckpt is a torch file but not a checkpoint of an sae_lightning run"
    ):
        load(tmp_path / "other.ckpt", "x")


@pytest.mark.parametrize(
    "value, where",
    [
        (np.float64(1.0), "checkpoint['a']"),  # a float subclass pickles as numpy's scalar: refused on load
        (Path("x"), "checkpoint['a']"),
        ({1.5: 1}, "checkpoint['a'] has a key of type float"),
        ([object()], "checkpoint['a'][0]"),
    ],
)
def test_check_plain_names_what_the_loader_would_refuse(value, where):
    with pytest.raises(TypeError) as e:
        check_plain({"a": value})
    assert str(e.value).startswith(where), str(e.value)


def test_every_checkpoint_a_run_writes_opens_weights_only(cache_run):
    """The real thing: a finished run's checkpoints (with a data stream's state) load weights-only."""
    paths = sorted((cache_run / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in paths} >= {"final.ckpt", "last.ckpt"}
    for path in paths:
        state = torch.load(path, weights_only=True)
        check_plain(state)
    module = SAEModule.load_from_checkpoint(cache_run / "checkpoints" / "final.ckpt")
    assert not module.training and module.allocator.thresholds_ready()


@pytest.fixture
def evil_run(cache_run, tmp_path):
    """A copy of a finished run whose every checkpoint carries the payload."""
    run = tmp_path / "run"
    shutil.copytree(cache_run, run)
    marker = tmp_path / "ran"
    for path in (run / "checkpoints").glob("*.ckpt"):
        path.unlink()
        crafted(path, marker)
    return run, marker


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("entry", ["evaluate", "evaluate --core", "browser", "export", "load_from_checkpoint"])
def test_each_entry_point_refuses_a_crafted_checkpoint(entry, evil_run, tmp_path, capsys):
    run, marker = evil_run
    before = listing(tmp_path)
    if entry == "load_from_checkpoint":
        with pytest.raises(DataError, match="holds a posix.system object"):
            SAEModule.load_from_checkpoint(run / "checkpoints" / "final.ckpt")
    else:
        argv = {
            "evaluate": [str(run)],
            "evaluate --core": [str(run), "--core"],
            "browser": [str(run)],
            "export": ["export", str(run), str(tmp_path / "exported")],
        }[entry]
        main = {"evaluate": evaluate, "evaluate --core": evaluate, "browser": browser, "export": interop}[entry]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("error: "), err
        assert f"{run / 'checkpoints' / 'final.ckpt'} holds a posix.system object" in err, err
    assert not marker.exists()
    assert listing(tmp_path) == before  # nothing written, nothing touched


def test_resume_refuses_a_crafted_checkpoint(evil_run, tmp_path, cli):
    run, marker = evil_run
    before = listing(tmp_path)
    r = cli("train.py", f"resume={run}", "progress=none")
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip()
    assert line.count("\n") == 0, line
    assert line == (
        f"error: resume={run}: {run / 'checkpoints' / 'last.ckpt'} holds a posix.system object, which a checkpoint "
        "of sae_lightning never holds; refused without loading it (a checkpoint may hold only tensors, numbers, "
        "strings, lists and dicts: loading anything else could run code from the file)"
    )
    assert not marker.exists()
    assert listing(tmp_path) == before
