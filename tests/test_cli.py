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
    assert "Could not find 'variant/mutual'" in line and "feature_choice, jumprelu, mutual_choice, topk" in line
    assert "did you mean mutual_choice?" in line and "\n" not in line
