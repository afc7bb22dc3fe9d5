"""A Hydra sweeper on current Optuna: ``python train.py -m sweeps=<preset>``.

Why our own: the published ``hydra-optuna-sweeper`` (1.3) pins ``optuna<3``, which drags in
a four-year-old Optuna and old SQLAlchemy. Hydra's sweeper interface is two methods, so
this file implements it directly on Optuna 5. It runs one trial at a time in this
process (Hydra's basic launcher); to run trials in parallel, start more workers on the same
storage: every worker asks the shared study for trials until the study holds ``n_trials``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from ..atomic import file_lock
from ..errors import require, require_choice
from . import pruning
from .space import Param, format_override, split_space, to_param

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "nsga2", "random")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def default_storage(out_dir: str, study_name: str) -> str:
    path = Path(out_dir).resolve() / "sweeps" / f"{study_name}.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def make_sampler(name: str, seed: int | None, n_startup: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, n_startup))
    return optuna.samplers.RandomSampler(seed=seed)


class OptunaSweeper(Sweeper):
    def __init__(self, study_name: str, objectives: Sequence[str], directions: Sequence[str], n_trials: int,
                 sampler: str = "tpe", seed: int | None = 0, n_startup_trials: int = 8, storage: str | None = None,
                 params: dict | None = None, params_by_variant: dict | None = None, pruner: dict | None = None,
                 heartbeat_seconds: int = 60):
        self.study_name, self.objectives, self.directions = study_name, list(objectives), list(directions)
        self.n_trials, self.sampler_name, self.seed, self.n_startup = n_trials, sampler, seed, n_startup_trials
        self.storage, self.heartbeat = storage, heartbeat_seconds
        self.params_spec = dict(params or {})
        self.by_variant_spec = {k: dict(v or {}) for k, v in (params_by_variant or {}).items()}
        self.pruner = {"enabled": True, "min_trials": 4, "margin": 0.05, **dict(pruner or {})}
        self.config: DictConfig | None = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    # ---- set-up -----------------------------------------------------------------------------
    def _validate(self) -> None:
        p = "hydra.sweeper"
        require(len(self.objectives) >= 1, f"{p}.objectives", self.objectives, "one or more metric keys")
        require(len(self.directions) == len(self.objectives), f"{p}.directions", self.directions,
                f"one of 'minimize'/'maximize' per objective ({len(self.objectives)})")
        for d in self.directions:
            require_choice(f"{p}.directions", d, ("minimize", "maximize"))
        require_choice(f"{p}.sampler", self.sampler_name, SAMPLERS)
        require(isinstance(self.n_trials, int) and self.n_trials >= 1, f"{p}.n_trials", self.n_trials, "an integer >= 1")

    def _study(self) -> optuna.Study:
        storage_url = self.storage or default_storage(str(self.config.out_dir), self.study_name)
        sqlite = storage_url.startswith("sqlite:///")
        # workers starting together on a new SQLite file would race to create its tables
        # ("table studies already exists"): they open it one at a time
        lock = file_lock(storage_url.removeprefix("sqlite:///") + ".lock") if sqlite else contextlib.nullcontext()
        with lock:
            storage = optuna.storages.RDBStorage(
                storage_url, heartbeat_interval=self.heartbeat, grace_period=2 * self.heartbeat,
                engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None)
            study = optuna.create_study(study_name=self.study_name, storage=storage, directions=self.directions,
                                        load_if_exists=True)
        seed = self.seed
        if seed is not None:  # a resumed or second worker must not replay the first one's draws
            seed = seed + len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(self.sampler_name, seed if seed is not None else os.getpid(), self.n_startup)
        study.set_metric_names(list(self.objectives))
        self.storage_url = storage_url
        return study

    def _space(self, parsed) -> tuple[list[Param], list[str], dict[str, tuple[list[Param], list[str]]]]:
        """The preset's space with the command line on top: a sweep override on the command
        line replaces (or adds) that parameter's range, a plain override fixes it."""
        base, fixed = split_space(self.params_spec, "hydra.sweeper.params")
        by_variant = {var: split_space(spec, f"hydra.sweeper.params_by_variant.{var}")
                      for var, spec in self.by_variant_spec.items()}
        user = {ov.get_key_element().lstrip("+~"): ov for ov in parsed}

        def keep(params, fixed_list):
            return ([p for p in params if p.name not in user],
                    [f for f in fixed_list if f.split("=", 1)[0].lstrip("+~") not in user])

        base, fixed = keep(base, fixed)
        base += [to_param(ov, "command line") for ov in parsed if ov.is_sweep_override()]
        by_variant = {var: keep(*pf) for var, pf in by_variant.items()}
        return base, fixed, by_variant

    # ---- the sweep ----------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        self._validate()
        parsed = OverridesParser.create().parse_overrides(arguments)
        base, fixed, by_variant = self._space(parsed)
        plain = [ov.input_line for ov in parsed if not ov.is_sweep_override()]
        study = self._study()
        log.info(f"study {self.study_name!r} in {self.storage_url}: {self.n_trials} trials, sampler {self.sampler_name}")
        results = []
        while True:
            counted = [t for t in study.get_trials(deepcopy=False)
                       if t.state in FINISHED or t.state == optuna.trial.TrialState.RUNNING]
            if len(counted) >= self.n_trials:
                break
            trial = study.ask()
            overrides = plain + fixed
            for param in base:
                overrides.append(format_override(param.name, param.suggest(trial)))
            variant = trial.params.get("variant", OmegaConf.select(self.config, "variant.name"))
            v_params, v_fixed = by_variant.get(variant, ([], []))
            overrides += v_fixed
            for param in v_params:
                overrides.append(format_override(param.name, param.suggest(trial)))
            trial.set_user_attr("overrides", overrides)
            results.append(self._run_trial(study, trial, overrides))
        done = study.get_trials(deepcopy=False)
        states = {s.name: sum(t.state == s for t in done) for s in optuna.trial.TrialState}
        log.info("study %r: %s", self.study_name, ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v))
        return results

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial, overrides: list[str]):
        pruning.ACTIVE = pruning.TrialContext(study, trial, fvu_key=self.objectives[0],
                                              l0_key=self.objectives[1] if len(self.objectives) > 1 else "val/batch/l0_mean",
                                              min_trials=int(self.pruner["min_trials"]),
                                              margin=float(self.pruner["margin"]), enabled=bool(self.pruner["enabled"]))
        try:
            self.validate_batch_is_legal([overrides])
            (ret,) = self.launcher.launch([overrides], initial_job_idx=trial.number)
        except Exception as e:  # the overrides do not compose: a failed trial, not a failed sweep
            return self._fail(study, trial, e)
        finally:
            pruning.ACTIVE = None
        run_dir = str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None
        if run_dir:
            trial.set_user_attr("run_dir", run_dir)
        if ret.status != JobStatus.COMPLETED:
            err = ret._return_value
            if isinstance(err, optuna.TrialPruned):
                trial.set_user_attr("reason", str(err))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log.info(f"trial {trial.number} pruned: {err}")
                return ret
            return self._fail(study, trial, err)
        metrics = ret.return_value or {}
        values = [metrics.get(key) for key in self.objectives]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            return self._fail(study, trial, ValueError(f"objectives {self.objectives} missing or not finite: {values}"))
        study.tell(trial, [float(v) for v in values])
        log.info(f"trial {trial.number}: " + ", ".join(f"{k}={float(v):.4g}" for k, v in zip(self.objectives, values)))
        return ret

    @staticmethod
    def _fail(study: optuna.Study, trial: optuna.Trial, err: BaseException):
        reason = f"{type(err).__name__}: {err}"
        trial.set_user_attr("reason", reason[:2000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning(f"trial {trial.number} failed: {reason}")
        return err
