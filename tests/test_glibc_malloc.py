"""The C allocator tuning of training processes: applied on Linux glibc, once; opt-out by env."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = "from sae_lightning.glibc_malloc import keep_freed_memory as k; print(k(), k())"


def _run(env_extra: dict[str, str]) -> str:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_is_tuned_once_and_can_be_left_alone():
    assert _run({}).split() == ["True", "True"]
    assert _run({"SAE_LIGHTNING_MALLOC": "system"}).split() == ["False", "False"]
