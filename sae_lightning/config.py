"""Validation of the composed training config, before any work is done or anything written.

Every check raises :class:`ConfigError` naming the key, the value and what is allowed. The
checks call the same constructors the run uses (allocators, losses, data), so what passes
here builds.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, get_args

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .allocators import get_allocator_class
from .errors import ConfigError, did_you_mean, non_finite_keys, require, require_choice
from .losses import build_losses
from .callbacks.progress import MODES as PROGRESS_MODES
from .module import ALLOCATOR_META_KEYS
from .sae import B_PRE_INITS, NORMALISATIONS


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def resolve(cfg: DictConfig | dict) -> dict:
    """The config as a plain dict with every interpolation resolved."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as e:
        raise ConfigError(e.full_key, "???", "a value: this key has no default (set it on the command line)") from e


# Trainer arguments the run sets itself (or replaces: progress=...)
TRAINER_OWN = ("logger", "callbacks", "plugins", "default_root_dir", "enable_model_summary", "enable_progress_bar")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")


def validate_trainer(t: dict) -> None:
    """Keys from ``lightning.Trainer``'s own signature (did-you-mean on a typo), the values this
    project depends on, then a dry construction that catches what Lightning itself refuses."""
    import lightning as L
    from lightning.fabric.connector import _PRECISION_INPUT_INT, _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS
    from lightning.pytorch.strategies import StrategyRegistry

    known = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for key, value in t.items():
        if key == "enable_progress_bar":
            raise ConfigError("trainer.enable_progress_bar", value, "no value here: the top-level key "
                              "progress=auto|bar|lines|none chooses how training progress is shown")
        if key in TRAINER_OWN:
            raise ConfigError(f"trainer.{key}", value, "not set here: the run sets it itself")
        if key not in known:
            hint = did_you_mean(f"trainer.{key}", [f"trainer.{k}" for k in known if k not in TRAINER_OWN])
            raise ConfigError(f"trainer.{key}", value, f"an argument of lightning.Trainer{hint or ' (see its documentation)'}")
    require(_int(t.get("max_steps")) and t["max_steps"] >= 1, "trainer.max_steps", t.get("max_steps"), "an integer >= 1")
    v = t.get("val_check_interval")
    require(v is None or (_int(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1), "trainer.val_check_interval",
            v, "null, an integer >= 1 (training steps between validations) or a fraction in (0, 1]")
    c = t.get("check_val_every_n_epoch")
    require(c is None or (_int(c) and c >= 1), "trainer.check_val_every_n_epoch", c, "null or an integer >= 1")
    lv = t.get("limit_val_batches", 1.0)
    require((_int(lv) and lv >= 0) or (isinstance(lv, float) and 0 <= lv <= 1), "trainer.limit_val_batches", lv,
            "an integer >= 0 (batches) or a fraction in [0, 1]")
    n = t.get("log_every_n_steps", 50)
    require(_int(n) and n >= 1, "trainer.log_every_n_steps", n, "an integer >= 1")
    require_choice("trainer.accelerator", t.get("accelerator", "auto"), ACCELERATORS)
    d = t.get("devices", "auto")
    require(d == "auto" or (_int(d) and (d >= 1 or d == -1)) or (isinstance(d, list) and d and all(_int(i) for i in d)),
            "trainer.devices", d, "auto, an integer >= 1 (-1: all), or a list of device indices")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    st = t.get("strategy", "auto")
    require(st in strategies, "trainer.strategy", st, "a Lightning strategy: auto, ddp, ddp_spawn, ddp_fork, fsdp, "
            f"deepspeed, ... (lightning.pytorch.strategies.StrategyRegistry){did_you_mean(str(st), strategies)}")
    main = get_args(_PRECISION_INPUT_STR)
    precisions = [*main, *get_args(_PRECISION_INPUT_INT), *get_args(_PRECISION_INPUT_STR_ALIAS)]
    require(t.get("precision", "32-true") in precisions, "trainer.precision", t.get("precision"),
            "one of " + ", ".join(repr(p) for p in main) + " (or the short forms 64, 32, 16, 'bf16')")
    g = t.get("gradient_clip_val")
    require(g is None or (isinstance(g, (int, float)) and not isinstance(g, bool) and g >= 0), "trainer.gradient_clip_val",
            g, "null or a finite number >= 0")
    require(t.get("deterministic", False) in (True, False, "warn"), "trainer.deterministic", t.get("deterministic"),
            "true, false or 'warn'")
    a = t.get("accumulate_grad_batches", 1)
    require(_int(a) and a >= 1, "trainer.accumulate_grad_batches", a, "an integer >= 1")
    # what Lightning itself refuses (an accelerator this machine lacks, devices it does not have, ...)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = rank_zero.level
    rank_zero.setLevel(logging.ERROR)
    try:
        L.Trainer(**t, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    except Exception as e:  # MisconfigurationException, ValueError, RuntimeError, ...
        message = " ".join(str(e).split())[:300]
        key = next((k for k in ("accelerator", "devices", "strategy", "precision", "num_nodes") if k in message
                    or (str(t.get(k, "auto")) != "auto" and str(t.get(k)).lower() in message.lower())), None)
        raise ConfigError(f"trainer.{key}" if key else "trainer", t.get(key) if key else t,
                          f"a setting Lightning accepts on this machine ({message})") from None
    finally:
        rank_zero.setLevel(level)


def validate_config(cfg: DictConfig | dict) -> tuple[dict, Any]:
    """Resolve and check ``cfg``; returns the plain resolved dict and the built DataModule."""
    c = resolve(cfg)
    for section in ("variant", "model", "optim", "stats", "data", "trainer"):
        require(isinstance(c.get(section), dict), section, c.get(section), "a config section (mapping)")
    for key, value in non_finite_keys({k: v for k, v in c.items() if k != "hydra"}):
        raise ConfigError(key, value, "a finite number")
    require(isinstance(c.get("out_dir"), str) and c["out_dir"], "out_dir", c.get("out_dir"), "a folder path")
    require_choice("progress", c.get("progress", "auto"), PROGRESS_MODES)
    c.setdefault("progress", "auto")

    require(_int(c.get("seed")), "seed", c.get("seed"), "an integer")
    m = c["model"]
    require(_int(m.get("n_latents")) and m["n_latents"] >= 1, "model.n_latents", m.get("n_latents"), "an integer >= 1")
    require_choice("model.normalisation", m.get("normalisation"), NORMALISATIONS)
    require_choice("model.b_pre_init", m.get("b_pre_init"), B_PRE_INITS)
    require_choice("model.affinity_dtype", m.get("affinity_dtype"), ("float32", "bfloat16"))
    require_choice("model.init_encoder_scale", m.get("init_encoder_scale"), ("fit", "gao", "none"))
    require(_int(m.get("init_sample_tokens")) and m["init_sample_tokens"] >= 1, "model.init_sample_tokens",
            m.get("init_sample_tokens"), "an integer >= 1")

    v = c["variant"]
    cls = get_allocator_class(v.get("allocator"))
    params = {key: value for key, value in v.items() if key not in ALLOCATOR_META_KEYS}
    cfg_obj = cls.parse_config(params)
    cls.validate(cfg_obj, m["n_latents"], c["data"].get("batch_size") or 1)

    o = c["optim"]
    require(o.get("lr") is None or (isinstance(o["lr"], (int, float)) and o["lr"] > 0), "optim.lr", o.get("lr"),
            "null (2e-4 / sqrt(n_latents / 2^14)) or a number > 0")
    require(_int(o.get("warmup_steps")) and o["warmup_steps"] >= 0, "optim.warmup_steps", o.get("warmup_steps"), "an integer >= 0")
    betas = o.get("betas")
    require(isinstance(betas, list) and len(betas) == 2 and all(0 <= b < 1 for b in betas), "optim.betas", betas,
            "two numbers in [0, 1)")
    require(isinstance(o.get("eps"), (int, float)) and o["eps"] > 0, "optim.eps", o.get("eps"), "a number > 0")
    require(o.get("fused") in ("auto", True, False), "optim.fused", o.get("fused"), "one of 'auto', true, false")

    s = c["stats"]
    for key in ("dead_window_tokens", "density_time_constant_tokens"):
        require(_int(s.get(key)) and s[key] >= 1, f"stats.{key}", s.get(key), "an integer >= 1 (tokens)")
    require(isinstance(s.get("underused_ratio"), (int, float)) and s["underused_ratio"] >= 0, "stats.underused_ratio",
            s.get("underused_ratio"), "a number >= 0")
    require(isinstance(s.get("zipf_alpha"), (int, float)) and s["zipf_alpha"] >= 0, "stats.zipf_alpha", s.get("zipf_alpha"), "a number >= 0")
    require(isinstance(s.get("zipf_beta"), (int, float)) and s["zipf_beta"] > -1, "stats.zipf_beta", s.get("zipf_beta"), "a number > -1")

    validate_trainer(c["trainer"])

    from .data import build_datamodule

    datamodule = build_datamodule(c["data"])
    # an activation cache not harvested yet knows its d_model only after the harvest (run() does it)
    d_model = datamodule.known_d_model if hasattr(datamodule, "known_d_model") else datamodule.d_model
    if v.get("losses") is not None and not isinstance(v.get("losses"), dict):
        raise ConfigError("variant.losses", v.get("losses"), "a mapping {loss_name: {param: value}}")
    build_losses(v.get("losses"), d_model or 0)
    return c, datamodule
