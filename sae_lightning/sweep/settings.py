"""The sweeper's settings (``hydra.sweeper``): one typed spec, parsed by the project's one
parser, whose defaults are the only ones (the Hydra plugin registers them, the trial's pruning
context takes them from here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import require
from ..spec import setting

Direction = Literal["minimize", "maximize"]
Sampler = Literal["tpe", "nsga2", "random"]


@dataclass
class PrunerSpec:
    enabled: bool = True  # stop a trial early when finished ones dominate it
    min_trials: int = setting(4, ge=1)  # prune when this many finished trials dominate (FVU, L0) at the same step
    margin: float = setting(0.05, ge=0)  # ... with an FVU lower by this relative margin


@dataclass
class SweeperSpec:
    study_name: str = "sae_sweep"  # the Optuna study (resumed when it exists in the storage)
    # threshold mode at the calibrated thresholds: each token on its own, as a user deploys the SAE
    objectives: list[str] = setting(default_factory=lambda: ["val/threshold/fvu", "val/threshold/l0_mean"])
    directions: list[Direction] = setting(default_factory=lambda: ["minimize", "minimize"])  # one per objective
    n_trials: int = setting(20, ge=1)  # the study's total, over every worker
    sampler: Sampler = "tpe"  # tpe | nsga2 | random
    seed: int | None = 0  # the sampler's seed
    n_startup_trials: int = setting(8, ge=0)  # random trials before the sampler models the results
    storage: str | None = None  # null: sqlite:///<out_dir>/sweeps/<study_name>.db; or any SQLAlchemy URL
    params: dict[str, Any] = setting(
        default_factory=dict
    )  # key: a Hydra sweep (choice, interval, range, tag(log, ...))
    params_by_variant: dict[str, Any] = setting(
        default_factory=dict
    )  # variant: {key: sweep}, for that variant's trials
    pruner: PrunerSpec = setting(default_factory=PrunerSpec)
    heartbeat_seconds: int = setting(60, ge=1)  # a trial whose worker died is retried after 2x this without one
    max_retries: int | None = setting(3, ge=0, allowed="null (no limit) or an integer >= 0")  # retries of a trial

    def check(self, prefix: str) -> None:
        require(len(self.objectives) >= 1, f"{prefix}.objectives", self.objectives, "one or more metric keys")
        require(
            len(self.directions) == len(self.objectives),
            f"{prefix}.directions",
            self.directions,
            f"one of 'minimize'/'maximize' per objective ({len(self.objectives)})",
        )
