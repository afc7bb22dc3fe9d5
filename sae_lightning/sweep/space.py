"""Search spaces in Hydra's own sweep grammar, turned into Optuna distributions.

``choice(a, b, ...)`` → categorical; ``range(start, stop[, step])`` → integers;
``interval(lo, hi)`` → float, ``int(interval(lo, hi))`` → integer, ``tag(log, ...)`` →
log scale. The same strings work in a preset's ``hydra.sweeper.params`` and as sweep
overrides on the command line (``variant.k='tag(log,int(interval(4,64)))'``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from ..errors import ConfigError


@dataclass
class Param:
    name: str
    sweep: Any  # ChoiceSweep | RangeSweep | IntervalSweep

    def suggest(self, trial: optuna.Trial) -> Any:
        s = self.sweep
        log = "log" in (s.tags or set())
        if isinstance(s, ChoiceSweep):
            return trial.suggest_categorical(self.name, list(s.list))
        if isinstance(s, RangeSweep):
            if all(isinstance(v, int) for v in (s.start, s.stop, s.step)):
                return trial.suggest_int(self.name, s.start, s.stop - 1, step=s.step)
            return trial.suggest_categorical(self.name, list(s.range()))
        if isinstance(s, int) or (isinstance(s.start, int) and isinstance(s.end, int)):
            return trial.suggest_int(self.name, s.start, s.end, log=log)
        return trial.suggest_float(self.name, float(s.start), float(s.end), log=log)


def parse(key: str, value: Any, where: str) -> Override:
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
    try:
        return OverridesParser.create().parse_overrides([f"{key}={text}"])[0]
    except Exception as e:
        raise ConfigError(f"{where}.{key}", value, f"a value or a Hydra sweep (choice, range, interval, tag(log, ...)): {e}")


def to_param(override: Override, where: str) -> Param:
    v = override.value()
    if isinstance(v, IntervalSweep) and "log" in (v.tags or set()) and float(v.start) <= 0:
        raise ConfigError(f"{where}.{override.get_key_element()}", override.input_line, "a log interval with low > 0")
    if isinstance(v, ChoiceSweep) and not v.list:
        raise ConfigError(f"{where}.{override.get_key_element()}", override.input_line, "choice(...) with a value")
    return Param(override.get_key_element(), v)


def split_space(spec: dict, where: str) -> tuple[list[Param], list[str]]:
    """A preset's ``{key: value or sweep}`` → (searched parameters, fixed overrides)."""
    params, fixed = [], []
    for key, value in (spec or {}).items():
        ov = parse(key, value, where)
        if ov.is_sweep_override():
            params.append(to_param(ov, where))
        else:
            fixed.append(ov.input_line)
    return params, fixed


def format_override(name: str, value: Any) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{name}={value}"
