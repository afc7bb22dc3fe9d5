"""Data sources by kind: each kind parses and validates its config and builds a DataModule."""

from __future__ import annotations

import dataclasses

from ..errors import ConfigError, require, require_choice
from .synthetic import SyntheticDataModule, SyntheticSpec

LOADER_KEYS = ("kind", "batch_size", "val_tokens", "calibration_tokens", "num_workers")


def _synthetic(cfg: dict) -> SyntheticDataModule:
    spec_fields = {f.name for f in dataclasses.fields(SyntheticSpec)}
    for key in cfg:
        if key not in spec_fields and key not in LOADER_KEYS:
            raise ConfigError(f"data.{key}", cfg[key], f"a key of data kind 'synthetic': {sorted(spec_fields | set(LOADER_KEYS))}")
    spec = SyntheticSpec(**{key: value for key, value in cfg.items() if key in spec_fields})
    spec.validate()
    return SyntheticDataModule(spec, batch_size=cfg["batch_size"], val_tokens=cfg["val_tokens"],
                               calibration_tokens=cfg["calibration_tokens"], num_workers=cfg.get("num_workers", 0))


def _activations(cfg: dict):
    from .activations import KEYS, ActivationsDataModule
    from .harvest import HarvestSpec

    for key in cfg:
        if key not in KEYS:
            raise ConfigError(f"data.{key}", cfg[key], f"a key of data kind 'activations': {sorted(KEYS)}")
    require(isinstance(cfg.get("path"), str) and cfg["path"], "data.path", cfg.get("path"), "the folder of an activation cache")
    d = cfg.get("d_model")
    require(d is None or (isinstance(d, int) and d >= 1), "data.d_model", d, "null (the cache's) or an integer >= 1")
    require(isinstance(cfg.get("seed", 0), int), "data.seed", cfg.get("seed"), "an integer")
    buf = cfg.get("shuffle_buffer_tokens", 262144)
    require(isinstance(buf, int) and buf >= 1, "data.shuffle_buffer_tokens", buf, "an integer >= 1")
    require_choice("data.verify", cfg.get("verify", "checksum"), ("checksum", "size"))
    spec = HarvestSpec.parse(cfg["harvest"]) if cfg.get("harvest") is not None else None
    down = cfg.get("downstream") or {}
    require(isinstance(down, dict), "data.downstream", down, "a mapping")
    allowed = {"enabled": (bool,), "during_training": (bool,), "contexts": (int,), "final_contexts": (int,)}
    for key, value in down.items():
        require(key in allowed and isinstance(value, allowed[key]), f"data.downstream.{key}", value,
                "enabled / during_training: true|false, contexts / final_contexts: an integer >= 1")
    for key in ("contexts", "final_contexts"):
        require(down.get(key, 16) >= 1, f"data.downstream.{key}", down.get(key), "an integer >= 1")
    return ActivationsDataModule(cfg, spec, down)


DATA_KINDS = {"synthetic": _synthetic, "activations": _activations}


def build_datamodule(cfg: dict):
    require_choice("data.kind", cfg.get("kind"), sorted(DATA_KINDS))
    for key in ("batch_size", "val_tokens", "calibration_tokens"):
        require(isinstance(cfg.get(key), int) and cfg[key] >= 1, f"data.{key}", cfg.get(key), "an integer >= 1")
    require(isinstance(cfg.get("num_workers", 0), int) and cfg.get("num_workers", 0) >= 0, "data.num_workers",
            cfg.get("num_workers"), "an integer >= 0")
    return DATA_KINDS[cfg["kind"]](cfg)


__all__ = ["DATA_KINDS", "build_datamodule", "SyntheticDataModule", "SyntheticSpec"]
