"""Validation of the composed training config, before any work is done or anything written.

Every check raises :class:`ConfigError` naming the key, the value and what is allowed. The
checks call the same constructors the run uses (allocators, losses, data), so what passes
here builds.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from .allocators import get_allocator_class
from .errors import ConfigError, require, require_choice
from .losses import build_losses
from .module import ALLOCATOR_META_KEYS
from .sae import B_PRE_INITS, NORMALISATIONS


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_config(cfg: DictConfig | dict) -> tuple[dict, Any]:
    """Resolve and check ``cfg``; returns the plain resolved dict and the built DataModule."""
    if isinstance(cfg, DictConfig):
        try:
            c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            raise ConfigError(e.full_key, "???", "a value: this key has no default (set it on the command line)") from e
    else:
        c = dict(cfg)
    for section in ("variant", "model", "optim", "stats", "data", "trainer"):
        require(isinstance(c.get(section), dict), section, c.get(section), "a config section (mapping)")

    require(_int(c.get("seed")), "seed", c.get("seed"), "an integer")
    m = c["model"]
    require(_int(m.get("n_latents")) and m["n_latents"] >= 1, "model.n_latents", m.get("n_latents"), "an integer >= 1")
    require_choice("model.normalisation", m.get("normalisation"), NORMALISATIONS)
    require_choice("model.b_pre_init", m.get("b_pre_init"), B_PRE_INITS)
    require_choice("model.affinity_dtype", m.get("affinity_dtype"), ("float32", "bfloat16"))
    require_choice("model.init_encoder_scale", m.get("init_encoder_scale"), ("fit", "none"))
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

    t = c["trainer"]
    require(_int(t.get("max_steps")) and t["max_steps"] >= 1, "trainer.max_steps", t.get("max_steps"), "an integer >= 1")

    from .data import build_datamodule

    datamodule = build_datamodule(c["data"])
    # an activation cache not harvested yet knows its d_model only after the harvest (run() does it)
    d_model = datamodule.known_d_model if hasattr(datamodule, "known_d_model") else datamodule.d_model
    if v.get("losses") is not None and not isinstance(v.get("losses"), dict):
        raise ConfigError("variant.losses", v.get("losses"), "a mapping {loss_name: {param: value}}")
    build_losses(v.get("losses"), d_model or 0)
    return c, datamodule
