"""A Hydra sweeper on current Optuna: ``python train.py -m sweeps=<preset>``.

Why our own: the published ``hydra-optuna-sweeper`` (1.3) pins ``optuna<3``, which drags in
a four-year-old Optuna and old SQLAlchemy. Hydra's sweeper interface is two methods, so
this file implements it directly on Optuna 5. It runs one trial at a time in this
process (Hydra's basic launcher); to run trials in parallel, start more workers on the same
storage: every worker asks the shared study for trials until it holds ``n_trials`` finished.

Faults. The sweep space is checked before the study is opened (a bad range is one error
line, and no trial is created). While a trial runs, a thread records its heartbeat in the
storage; a trial whose worker died (kill -9, a lost machine) stops beating, and after
``2 × heartbeat_seconds`` any worker fails it and queues a retry with the same parameters,
which resumes from the dead trial's last checkpoint when it has one. Ctrl-C stops the trial
at a step boundary with its checkpoint saved, queues its retry the same way, and ends the
worker with status 130. A worker whose study has no trial left to start waits for the
trials other workers are running (they finish, or go stale and come back to be retried),
so every worker ends with the study complete.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, cast

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..atomic import file_lock
from ..errors import ConfigError, DataError, Interrupted
from ..spec import parse
from .settings import SweeperSpec
from .space import Param, format_override, split_space, to_param
from .study import STORAGE_ENV, Census, Heartbeat, default_storage, make_sampler, masked, redact, retry

log = logging.getLogger(__name__)


class OptunaSweeper(Sweeper):
    def __init__(self, **settings: Any):
        """``settings``: the ``hydra.sweeper`` section (see settings.SweeperSpec), parsed and
        checked by :meth:`_validate` before the study is opened, so a bad one is one error line."""
        self.raw = {
            k: OmegaConf.to_container(v, resolve=True) if isinstance(v, (DictConfig, ListConfig)) else v
            for k, v in settings.items()
        }
        self._apply(SweeperSpec())  # the defaults until _validate parses the section
        self.config: DictConfig = OmegaConf.create()  # the composed config, from setup()
        self.launcher: Any = None  # Hydra's launcher, from setup()

    def _apply(self, spec: SweeperSpec) -> None:
        self.spec = spec
        self.study_name, self.objectives, self.directions = (
            spec.study_name,
            list(spec.objectives),
            list(spec.directions),
        )
        self.n_trials, self.sampler_name, self.seed, self.n_startup = (
            spec.n_trials,
            spec.sampler,
            spec.seed,
            spec.n_startup_trials,
        )
        self.storage, self.heartbeat, self.max_retries = spec.storage, spec.heartbeat_seconds, spec.max_retries
        self.params_spec = dict(spec.params)
        self.by_variant_spec = {k: dict(v or {}) for k, v in spec.params_by_variant.items()}
        self.pruner = spec.pruner

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---- set-up: everything checked before the study is opened --------------------------------
    def _validate(self) -> None:
        self._apply(parse(SweeperSpec, self.raw, "hydra.sweeper"))

    def _space(self, parsed) -> tuple[list[Param], list[str], dict[str, tuple[list[Param], list[str]]]]:
        """The preset's space with the command line on top: a sweep override on the command
        line replaces (or adds) that parameter's range, a plain override fixes it."""
        base, fixed = split_space(self.params_spec, "hydra.sweeper.params")
        by_variant = {
            var: split_space(spec, f"hydra.sweeper.params_by_variant.{var}")
            for var, spec in self.by_variant_spec.items()
        }
        user = {ov.get_key_element().lstrip("+~"): ov for ov in parsed}

        def keep(params, fixed_list):
            return (
                [p for p in params if p.name not in user],
                [f for f in fixed_list if f.split("=", 1)[0].lstrip("+~") not in user],
            )

        base, fixed = keep(base, fixed)
        base += [to_param(ov, "command line") for ov in parsed if ov.is_sweep_override()]
        by_variant = {var: keep(*pf) for var, pf in by_variant.items()}
        return base, fixed, by_variant

    def _check_composes(self, plain: list[str], fixed: list[str], base: list[Param], by_variant) -> None:
        """Every key of the space composes with the config (one sample per variant), so a typo
        fails here, not in every trial."""

        def first(p: Param) -> str:
            d = p.distribution()
            value = d.choices[0] if isinstance(d, optuna.distributions.CategoricalDistribution) else d.low
            return format_override(p.name, value)

        variants: list[Any] = [None]
        for p in base:
            d = p.distribution()
            if p.name == "variant" and isinstance(d, optuna.distributions.CategoricalDistribution):
                variants = list(d.choices)
        for variant in variants:
            sample = plain + fixed + [first(p) if p.name != "variant" else f"variant={variant}" for p in base]
            v_params, v_fixed = by_variant.get(variant, ([], []))
            sample += v_fixed + [first(p) for p in v_params]
            try:
                self.validate_batch_is_legal([sample])
            except Exception as e:
                said = self._in_sweep_syntax(e, [*base, *v_params])
                if said is e:
                    raise
                raise said from None

    @staticmethod
    def _in_sweep_syntax(err: Exception, params: list[Param]) -> Exception:
        """A searched key the config lacks: Hydra's message shows one sampled value and advises
        ``+key=value``, which would fix that value; say it with the sweep as written instead."""
        from ..cli import describe_hydra_error, is_hydra_error

        if not is_hydra_error(err):
            return err
        text = describe_hydra_error(err)
        missing = re.search(r"the config has no key ([^\s;]+)", text)
        hint = re.search(r"; did you mean ([^\s?]+)\?", text)
        for p in params:
            if missing and p.name.lstrip("+") == missing.group(1):
                fix = f"; did you mean {hint.group(1)}={p.text}?" if hint else ""
                allowed = f"a key of the config to sweep{fix} (to sweep a new key on purpose: +{p.name}={p.text})"
                return ConfigError(p.name, p.text, allowed)
        return err

    def _study(self) -> optuna.Study:
        storage_url = self.storage or default_storage(str(self.config.out_dir), self.study_name)
        sqlite = storage_url.startswith("sqlite:///")
        if sqlite:
            folder = Path(storage_url.removeprefix("sqlite:///")).parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DataError(
                    f"hydra.sweeper.storage={masked(storage_url)}: cannot make the folder {folder} for the SQLite file "
                    f"({e.strerror}); give a path this user can write, or another SQLAlchemy URL"
                ) from None
        # workers starting together on a new SQLite file would race to create its tables
        # ("table studies already exists"): they open it one at a time
        lock = file_lock(storage_url.removeprefix("sqlite:///") + ".lock") if sqlite else contextlib.nullcontext()
        try:
            with lock:
                self._storage = optuna.storages.RDBStorage(
                    storage_url,
                    heartbeat_interval=self.heartbeat,
                    grace_period=2 * self.heartbeat,
                    heartbeat_stale_trial_callback=self._retry_stale,
                    engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                )
                study = optuna.create_study(
                    study_name=self.study_name,
                    storage=self._storage,
                    directions=cast(Any, self.directions),
                    load_if_exists=True,
                )
        except ValueError as e:  # e.g. the study exists with other directions
            raise ConfigError("hydra.sweeper.directions", self.directions, f"the study's own ({e})") from None
        except Exception as e:  # sqlalchemy: a bad URL, a missing driver, no server
            detail = redact(str(e).splitlines()[0][:200] if str(e) else "", storage_url)
            raise DataError(
                f"hydra.sweeper.storage={masked(storage_url)}: cannot open the study storage "
                f"({type(e).__name__}: {detail})"
            ) from None
        seed = self.seed
        if seed is not None:  # a resumed or second worker must not replay the first one's draws
            seed = seed + len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(self.sampler_name, seed if seed is not None else os.getpid(), self.n_startup)
        study.set_metric_names(list(self.objectives))
        self.storage_url = storage_url
        os.environ[STORAGE_ENV] = storage_url  # the trials connect with it; their configs hold masked(storage_url)
        return study

    def _retry_stale(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        retries = len(trial.system_attrs.get("retry_history", []))
        if self.max_retries is None or retries < self.max_retries:
            log.warning(f"trial {trial.number} stopped beating (its worker died): queued again")
            retry(study, trial)

    # ---- the sweep ----------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> Any:
        self._validate()
        try:
            parsed = OverridesParser.create().parse_overrides(arguments)
        except Exception as e:
            raise ConfigError("command line", " ".join(arguments), f"Hydra overrides ({e})") from None
        base, fixed, by_variant = self._space(parsed)
        plain = [str(ov.input_line) for ov in parsed if not ov.is_sweep_override()]
        self._check_composes(plain, fixed, base, by_variant)
        study = self._study()
        log.info(
            f"study {self.study_name!r} in {masked(self.storage_url)}: {self.n_trials} trials, sampler {self.sampler_name}"
        )
        results, said_waiting = [], False
        while True:
            optuna.storages.fail_stale_trials(study)  # trials of dead workers: failed and queued again
            census = Census(study)
            if census.finished >= self.n_trials:
                break
            if not census.waiting and len(census.counted) >= self.n_trials:
                if not said_waiting:  # the rest are running in other workers: wait for them
                    log.info(f"waiting for {census.running} trial(s) running in other workers")
                    said_waiting = True
                time.sleep(min(5.0, self.heartbeat))
                continue
            said_waiting = False
            trial = study.ask()
            if self._over_budget(study, trial):
                continue
            overrides = plain + fixed
            for param in base:
                overrides.append(format_override(param.name, param.suggest(trial)))
            variant = trial.params.get("variant", OmegaConf.select(self.config, "variant.name"))
            v_params, v_fixed = by_variant.get(variant, ([], []))
            overrides += v_fixed
            for param in v_params:
                overrides.append(format_override(param.name, param.suggest(trial)))
            resume = self._resumable(trial)
            if resume:
                overrides.append(f"resume={resume}")
            trial.set_user_attr("overrides", overrides)
            results.append(self._run_trial(study, trial, overrides))
        census = Census(study)
        states = {s.name: sum(t.state == s for t in census.counted) for s in optuna.trial.TrialState}
        log.info("study %r: %s", self.study_name, ", ".join(f"{k.lower()} {v}" for k, v in states.items() if v))
        return results

    def _over_budget(self, study: optuna.Study, trial: optuna.Trial) -> bool:
        """Two workers that both saw room for one more trial: the later one gives its trial
        back (recorded as failed, marked, not counted)."""
        census = Census(study)
        mine = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        if "retry_history" in mine.system_attrs:
            return False
        earlier = sum(t.number < trial.number for t in census.counted)
        if earlier < self.n_trials:
            return False
        trial.set_user_attr("over_budget", True)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return True

    @staticmethod
    def _resumable(trial: optuna.Trial) -> str | None:
        """A retry continues the replaced trial's run from its last checkpoint, if it has one."""
        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and (Path(run_dir) / "checkpoints" / "last.ckpt").is_file():
            return run_dir
        return None

    def _trial_override(self, trial: optuna.Trial) -> str:
        """``sweep_trial={...}``: which trial the run is and how it is pruned (see TrialSpec)."""

        def q(v) -> str:
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):  # quoted: storage URLs hold ':' and '/'
                return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
            return str(v)

        spec = {
            "storage": masked(self.storage_url),  # the trial connects with the real one (study.unmasked)
            "study": self.study_name,
            "trial_id": trial._trial_id,
            "number": trial.number,
            "fvu_key": self.objectives[0],
            "l0_key": self.objectives[1] if len(self.objectives) > 1 else "val/threshold/l0_mean",
            "min_trials": self.pruner.min_trials,
            "margin": self.pruner.margin,
            "pruning": self.pruner.enabled,
        }
        return "sweep_trial={" + ",".join(f"{k}:{q(v)}" for k, v in spec.items()) + "}"

    def _run_trial(self, study: optuna.Study, trial: optuna.Trial, overrides: list[str]):
        try:
            with Heartbeat(self._storage, trial._trial_id, self.heartbeat):
                job = [*overrides, self._trial_override(trial)]
                self.validate_batch_is_legal([job])
                (ret,) = self.launcher.launch([job], initial_job_idx=trial.number)
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside training: stop now
            self._interrupted(study, trial, "interrupted (Ctrl-C)")
        except Exception as e:  # the overrides do not compose: a failed trial, not a failed sweep
            return self._fail(study, trial, e)
        run_dir = str(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else None
        if run_dir and "run_dir" not in trial.user_attrs:
            trial.set_user_attr("run_dir", run_dir)
        if ret.status != JobStatus.COMPLETED:
            err = ret._return_value
            if isinstance(err, optuna.TrialPruned):
                trial.set_user_attr("reason", str(err))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log.info(f"trial {trial.number} pruned: {err}")
                return ret
            if isinstance(err, Interrupted):  # Ctrl-C or SIGTERM: the trial saved its checkpoint
                self._interrupted(study, trial, str(err))
            return self._fail(study, trial, err)
        metrics = ret.return_value or {}
        raw = [metrics.get(key) for key in self.objectives]
        values = [float(v) for v in raw if v is not None]
        if len(values) != len(raw) or not all(math.isfinite(v) for v in values):
            return self._fail(study, trial, ValueError(f"objectives {self.objectives} missing or not finite: {raw}"))
        study.tell(trial, values)
        log.info(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" for k, v in zip(self.objectives, values)))
        return ret

    def _interrupted(self, study: optuna.Study, trial: optuna.Trial, message: str):
        """The trial is failed and queued again (to resume from its checkpoint); the worker ends."""
        trial.set_user_attr("reason", message[:2000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        retry(study, frozen)
        raise Interrupted(f"{message}. Trial {trial.number} is queued again; the same command continues the sweep")

    @staticmethod
    def _fail(study: optuna.Study, trial: optuna.Trial, err: BaseException):
        reason = f"{type(err).__name__}: {err}"
        trial.set_user_attr("reason", reason[:2000])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        log.warning(f"trial {trial.number} failed: {reason}")
        return err
