"""Hydra plugin shim: Hydra only loads plugins from the ``hydra_plugins`` namespace. The
sweeper itself lives in ``sae_lightning.sweep.sweeper``; this registers its config under
``hydra/sweeper=sae_optuna`` and puts the repository's ``sweeps/`` presets on the search path."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.plugins.search_path_plugin import SearchPathPlugin

from sae_lightning.sweep.sweeper import OptunaSweeper

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class SAEOptunaSweeperConf:
    _target_: str = "hydra_plugins.sae_lightning_sweeper.SAEOptunaSweeper"
    study_name: str = "sae_sweep"
    objectives: Any = field(default_factory=lambda: ["val/batch/fvu", "val/batch/l0_mean"])
    directions: Any = field(default_factory=lambda: ["minimize", "minimize"])
    n_trials: int = 20
    sampler: str = "tpe"
    seed: int | None = 0
    n_startup_trials: int = 8
    storage: str | None = None
    params: Any = field(default_factory=dict)
    params_by_variant: Any = field(default_factory=dict)
    pruner: Any = field(default_factory=lambda: {"enabled": True, "min_trials": 4, "margin": 0.05})
    heartbeat_seconds: int = 60  # a trial whose worker died is retried after 2x this without a heartbeat
    max_retries: int | None = 3  # retries of one trial (null: no limit)


class SAEOptunaSweeper(OptunaSweeper):
    """Hydra accepts plugin classes defined under ``hydra_plugins`` only."""


ConfigStore.instance().store(
    group="hydra/sweeper", name="sae_optuna", node=SAEOptunaSweeperConf, provider="sae_lightning"
)


class SweepPresets(SearchPathPlugin):
    """Makes ``sweeps/*.yaml`` the config group ``sweeps`` (``python train.py -m sweeps=NAME``)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if (ROOT / "sweeps").is_dir():
            search_path.append(provider="sae_lightning", path=f"file://{ROOT}")
