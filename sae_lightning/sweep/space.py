"""Search spaces in Hydra's own sweep grammar, turned into Optuna distributions.

``choice(a, b, ...)`` → categorical; ``range(start, stop[, step])`` → integers;
``interval(lo, hi)`` → float, ``int(interval(lo, hi))`` → integer, ``tag(log, ...)`` →
log scale. The same strings work in a preset's ``hydra.sweeper.params`` and as sweep
overrides on the command line (``variant.k='tag(log,int(interval(4,64)))'``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from ..errors import ConfigError

Distribution = (
    optuna.distributions.CategoricalDistribution
    | optuna.distributions.IntDistribution
    | optuna.distributions.FloatDistribution
)


@dataclass
class Param:
    name: str
    sweep: Any  # ChoiceSweep | RangeSweep | IntervalSweep
    text: str = ""  # the sweep as written (``tag(log,interval(1e-4,1e-3))``), for messages

    def distribution(self) -> Distribution:
        """The Optuna distribution of this parameter (constructing it checks the range)."""
        s: Any = self.sweep  # Hydra's sweep types leave their bounds Optional; a parsed sweep has them
        log = "log" in (s.tags or set())
        D = optuna.distributions
        if isinstance(s, ChoiceSweep):
            return D.CategoricalDistribution(cast(Any, list(s.list)))
        if isinstance(s, RangeSweep):
            start, stop, step = cast(Any, (s.start, s.stop, s.step))
            if all(isinstance(v, int) for v in (start, stop, step)):
                return D.IntDistribution(start, stop - 1, step=step)
            return D.CategoricalDistribution(list(s.range()))
        if isinstance(s.start, int) and isinstance(s.end, int):
            return D.IntDistribution(s.start, s.end, log=log)
        return D.FloatDistribution(float(s.start), float(s.end), log=log)

    def suggest(self, trial: optuna.Trial) -> Any:
        d = self.distribution()
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            return trial.suggest_categorical(self.name, list(d.choices))
        if isinstance(d, optuna.distributions.IntDistribution):
            return trial.suggest_int(self.name, d.low, d.high, step=d.step, log=d.log)
        return trial.suggest_float(self.name, d.low, d.high, step=d.step, log=d.log)


def parse(key: str, value: Any, where: str) -> Override:
    text = value if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
    try:
        return OverridesParser.create().parse_overrides([f"{key}={text}"])[0]
    except Exception as e:
        raise ConfigError(
            f"{where}.{key}", value, f"a value or a Hydra sweep (choice, range, interval, tag(log, ...)): {e}"
        ) from None


def to_param(override: Override, where: str) -> Param:
    """A sweep override as a parameter, checked as Optuna would check it when a trial asks for
    it (so a bad range is refused before any trial exists, not in the middle of one)."""
    v = override.value()
    key = f"{where}.{override.get_key_element()}" if where != "command line" else override.get_key_element()

    def bad(allowed: str) -> ConfigError:
        return ConfigError(key, str(override.input_line).split("=", 1)[-1], allowed)

    if isinstance(v, ChoiceSweep) and not v.list:
        raise bad("choice(...) with at least one value")
    if isinstance(v, RangeSweep) and not list(v.range()):
        raise bad("range(start, stop[, step]) that holds at least one value (start < stop for a positive step)")
    if isinstance(v, IntervalSweep):
        low, high = v.start, v.end
        if not (
            isinstance(low, (int, float))
            and isinstance(high, (int, float))
            and math.isfinite(low)
            and math.isfinite(high)
        ):
            raise bad("interval(low, high) with finite numbers")
        if low > high:
            raise bad(f"interval(low, high) with low <= high (low {low} > high {high})")
        if "log" in (v.tags or set()) and low <= 0:
            raise bad("a log interval with low > 0")
    param = Param(override.get_key_element(), v, str(override.input_line).split("=", 1)[-1])
    try:
        param.distribution()
    except (ValueError, TypeError) as e:
        raise bad(f"a range Optuna accepts ({e})") from None
    return param


def split_space(spec: dict, where: str) -> tuple[list[Param], list[str]]:
    """A preset's ``{key: value or sweep}`` → (searched parameters, fixed overrides)."""
    params: list[Param] = []
    fixed: list[str] = []
    for key, value in (spec or {}).items():
        ov = parse(key, value, where)
        if ov.is_sweep_override():
            params.append(to_param(ov, where))
        else:
            fixed.append(str(ov.input_line))
    return params, fixed


def format_override(name: str, value: Any) -> str:
    if isinstance(value, bool):
        value = str(value).lower()
    return f"{name}={value}"
