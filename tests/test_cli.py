"""Hydra's own errors, reworded to one line with the options or a did-you-mean."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from sae_lightning.cli import describe_hydra_error

from .conftest import ROOT


def hydra_error(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        with pytest.raises(HydraException) as e:
            compose("train", overrides=overrides)
    return describe_hydra_error(e.value)


def test_a_key_typo_gets_a_did_you_mean_and_how_to_add_a_key():
    line = hydra_error(["model.n_latent=64"])
    assert line == (
        "config error: model.n_latent=64: the config has no key model.n_latent; did you mean "
        "model.n_latents? (to add a new key on purpose, write +model.n_latent=64)"
    )


def test_a_key_under_a_missing_section_suggests_a_key_that_exists():
    """run.out_dir: there is no section run; the suggestion is the top-level out_dir, never
    the key that was typed (it once said 'did you mean run.out_dir?')."""
    line = hydra_error(["run.out_dir=/tmp/x"])
    assert "the config has no key run.out_dir; did you mean out_dir?" in line


def test_a_missing_group_option_lists_the_options():
    line = hydra_error(["variant=mutual"])
    assert (
        "Could not find 'variant/mutual'" in line
        and "feature_choice, jumprelu, matryoshka_mutual_choice, matryoshka_topk, mutual_choice, topk" in line
    )
    assert "did you mean mutual_choice?" in line and "\n" not in line


PROBE = """
import builtins, os, runpy, sys
seen = []
real = builtins.__import__
def spy(name, *args, **kwargs):
    if name == "torch" and not seen:
        seen.append(os.environ.get("OMP_WAIT_POLICY"))
    return real(name, *args, **kwargs)
builtins.__import__ = spy
sys.argv = [sys.argv[1], "--cfg", "job"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("policy when torch loaded:", seen)
"""


@pytest.mark.parametrize("script, chosen", [("train.py", None), ("harvest.py", None), ("train.py", "ACTIVE")])
def test_the_entry_points_make_openmp_threads_sleep_before_torch_loads(script, chosen):
    """OMP_WAIT_POLICY=PASSIVE is in the environment when torch (and its OpenMP runtime) first
    loads, unless the user chose a policy (docs/performance.md#sharing-the-cores)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if chosen is not None:
        env["OMP_WAIT_POLICY"] = chosen
    r = subprocess.run([sys.executable, "-c", PROBE, script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert f"policy when torch loaded: [{chosen or 'PASSIVE'!r}]" in r.stdout, r.stdout[-500:] + r.stderr[-2000:]
