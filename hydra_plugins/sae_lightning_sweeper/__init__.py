"""Hydra plugin shim: Hydra only loads plugins from the ``hydra_plugins`` namespace. The
sweeper itself lives in ``sae_lightning.sweep.sweeper``; this registers its config under
``hydra/sweeper=sae_optuna`` and puts the repository's ``sweeps/`` presets on the search path."""

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sae_lightning.config import register_defaults
from sae_lightning.spec import as_dict
from sae_lightning.sweep.settings import SweeperSpec
from sae_lightning.sweep.sweeper import OptunaSweeper

ROOT = Path(__file__).resolve().parents[2]


class SAEOptunaSweeper(OptunaSweeper):
    """Hydra accepts plugin classes defined under ``hydra_plugins`` only."""


register_defaults()  # the training config's defaults, from its specs (sae_lightning/config.py)

# the settings' keys and defaults, from the one spec (sae_lightning/sweep/settings.py)
ConfigStore.instance().store(
    group="hydra/sweeper",
    name="sae_optuna",
    node={"_target_": "hydra_plugins.sae_lightning_sweeper.SAEOptunaSweeper", **as_dict(SweeperSpec())},
    provider="sae_lightning",
)


def register_presets(folder: Path = ROOT / "sweeps") -> None:
    """Makes ``sweeps/*.yaml`` the config group ``sweeps`` (``python train.py -m sweeps=NAME``),
    each at the global package as its header says. Stored one by one rather than by putting the
    repository's root on Hydra's search path: Hydra would take every folder there (``.venv``,
    ``outputs``, ...) for a config group, and ``--help`` walks them all (it never ended)."""
    for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        ConfigStore.instance().store(
            group="sweeps", name=path.stem, node=OmegaConf.load(path), package="_global_", provider="sae_lightning"
        )


register_presets()
