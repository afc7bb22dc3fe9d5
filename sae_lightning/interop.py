"""Weights in and out: SAELens's on-disk format both ways (our own file, ``sae.safetensors``,
is written by every run: see ``runs.py``).

    python -m sae_lightning.interop export outputs/runs/<run> <folder>      # for SAELens
    python -m sae_lightning.interop import <saelens folder> [data=minilm ...] [--out RUN]

**SAELens export** (:func:`export_saelens`): ``cfg.json`` + ``sae_weights.safetensors`` that
``sae_lens.SAE.load_from_disk`` loads. SAELens's SAE takes raw activations x and computes
``z = act(W_enc·(x − b_dec) + b_enc)``, ``x̂ = W_dec·z + b_dec``; ours normalises first
(``x_n = c·x``) and centres on ``b_pre``. Folding ``c`` in (``b_dec = b_pre/c``,
``W_enc ← c·W_enc``, ``W_dec ← W_dec/c``) gives the same codes and the same x̂ with
``normalize_activations = none``. TopK exports as ``topk`` with its k; Mutual Choice, Feature
Choice and JumpReLU export their **threshold mode** (each token on its own, the only mode that
exists for a single token) as ``jumprelu``: Mutual Choice's one calibrated θ broadcast to every
latent, Feature Choice's θ_j (a latent with no capacity gets θ = +inf), JumpReLU's learned θ_j
scaled to L0 = k on the calibration tokens. Batch allocation has no
SAELens counterpart. ``layernorm`` runs are refused: SAELens's ``layer_norm`` normalises
without the learned centring ours applies first, so the two would not agree.

**SAELens import** (:func:`import_saelens`): a ``topk``, ``jumprelu`` or ``standard`` (ReLU,
θ = 0) SAE becomes a run folder (``config.yaml``, ``checkpoints/final.ckpt``,
``sae.safetensors``, ``imported.json``) that ``evaluate`` and ``browser`` read like a run
of our own (a ``jumprelu`` one with its thresholds as imported); the data overrides name the
cache to evaluate it on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import atomic_path, atomic_write_json, atomic_write_text
from .checkpoint_file import check_plain
from .cli import describe_hydra_error, fail, is_hydra_error, user_errors
from .errors import ConfigError, DataError
from .runs import NATIVE, load_run, new_run_dir, save_native, thresholds

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
IMPORTABLE = ("topk", "jumprelu", "standard")


# ---- SAELens export ---------------------------------------------------------------------------
def saelens_state(module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """SAELens's config fields and weights for one of our SAEs (the dataset scale folded in)."""
    sae, alloc = module.sae, module.variant.allocator
    if sae.normalisation == "layernorm":
        raise ConfigError(
            "model.normalisation", "layernorm", "dataset_scale or none for a SAELens export (see sae_lightning.interop)"
        )
    c = float(sae.scale) if sae.normalisation == "dataset_scale" else 1.0
    W_enc, b_enc, W_dec = sae.folded()  # a free decoder's norms folded in (SAELens's rescale off)
    with torch.no_grad():
        weights = {
            "W_enc": (W_enc * c).t(),  # [d_in, d_sae]
            "b_enc": b_enc.clone(),
            "W_dec": W_dec / c,  # [d_sae, d_in]
            "b_dec": sae.b_pre / c,
        }
    cfg: dict[str, Any] = {
        "d_in": sae.d_model,
        "d_sae": sae.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if alloc == "topk":
        cfg.update(architecture="topk", k=int(module.k), rescale_acts_by_decoder_norm=False)
    else:
        theta = thresholds(module)
        if theta is None:
            raise ConfigError("variant.allocator", alloc, "an allocator with a threshold mode (topk exports as topk)")
        if not module.allocator.thresholds_ready():
            raise DataError(
                f"the {alloc} run has no calibrated thresholds (calibration.enabled was false): "
                "its threshold mode is the running EMA, which is not exported; retrain with calibration on"
            )
        cfg["architecture"] = "jumprelu"
        weights["threshold"] = theta
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    return cfg, weights


def export_saelens(run_dir: Path, out: Path) -> Path:
    """Write ``out/cfg.json`` and ``out/sae_weights.safetensors`` for a finished run. ``out``
    must not exist yet; it appears whole or not at all."""

    out = Path(out)
    if out.exists():
        raise DataError(f"{out} already exists: name a new folder for the export")
    module, data = load_run(Path(run_dir))
    cfg, weights = saelens_state(module)
    meta: dict[str, Any] = {"sae_lightning_run": str(Path(run_dir).resolve()), "allocator": module.variant.allocator}
    from .data.activations import ActivationsData
    from .data.shards import read_manifest

    manifest = None
    if isinstance(data, ActivationsData):
        manifest = read_manifest(Path(data.path))
    if manifest:
        lm = manifest.get("harvest", {}).get("lm", {})
        h = manifest["harvest"]  # SAELens names hooks as TransformerLens does: blocks.<layer>.hook_<site>
        meta.update(model_name=lm.get("name"), hook_name=f"blocks.{h['layer']}.hook_{h['site']}", hook_site=h["site"])
    cfg["metadata"] = meta
    tmp = out.with_name(f".{out.name}.tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with atomic_path(tmp / SAELENS_WEIGHTS) as weights_tmp:
            save_file(weights, str(weights_tmp))
        atomic_write_json(tmp / SAELENS_CFG, cfg)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- SAELens import ---------------------------------------------------------------------------
def read_saelens(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A SAELens folder's config and weights, checked for what this package can represent."""
    folder = Path(folder)
    cfg_path, w_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise DataError(f"{p} does not exist: a SAELens folder holds {SAELENS_CFG} and {SAELENS_WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{cfg_path} is not JSON ({e})") from None
    arch = cfg.get("architecture", "standard")
    if arch not in IMPORTABLE:
        raise ConfigError(f"{cfg_path}: architecture", arch, "one of " + ", ".join(map(repr, IMPORTABLE)))
    for key, want in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if cfg.get(key, "none") != want:
            raise ConfigError(f"{cfg_path}: {key}", cfg[key], f"{want!r} (the only one imported)")
    if cfg.get("rescale_acts_by_decoder_norm", False):
        raise ConfigError(f"{cfg_path}: rescale_acts_by_decoder_norm", True, "false (the only one imported)")
    weights = load_file(str(w_path))
    need = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if arch == "jumprelu" else set())
    missing = sorted(need - set(weights))
    if missing:
        raise DataError(f"{w_path} lacks {', '.join(missing)} (a {arch} SAE has {', '.join(sorted(need))})")
    d, F = weights["W_enc"].shape
    if weights["W_dec"].shape != (F, d):
        raise DataError(f"{w_path}: W_dec is {tuple(weights['W_dec'].shape)}, expected ({F}, {d}) after W_enc {(d, F)}")
    return cfg, weights


def import_saelens(folder: Path, overrides: list[str], out: Path | None = None) -> Path:
    """A SAELens SAE as a run folder of ours (see the module docstring); returns the folder."""
    from hydra import compose, initialize_config_dir

    from .config import load_config
    from .data import build_datamodule
    from .module import SAEModule

    cfg, w = read_saelens(folder)
    arch = cfg.get("architecture", "standard")
    d, F = w["W_enc"].shape
    k = int(cfg.get("k", 32))
    variant = "topk" if arch == "topk" else "jumprelu"
    base = [f"variant={variant}", f"variant.k={min(k, F)}", f"model.n_latents={F}"]
    base += ["model.normalisation=none", "model.b_pre_init=zeros", "calibration.enabled=false"]
    # a saved SAELens SAE selects on z' as it is (rescale_acts_by_decoder_norm folded in, read_saelens
    # refuses it otherwise): no ranking by decoder norm, which our default (free) would add
    base += ["model.decoder_norm=unit"]
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            composed = compose("train", overrides=base + list(overrides))
    except Exception as e:  # Hydra's own errors (an unknown group or key) as one line
        if not is_hydra_error(e):
            raise
        fail(describe_hydra_error(e), 2)
    config = load_config(composed)
    source = build_datamodule(config.data.as_dict())
    if source.d_model != d:
        raise ConfigError(
            "data", config.data.kind, f"data with d_model {d} (the SAE's d_in); this data has {source.d_model}"
        )
    if out is not None and Path(out).exists():
        raise DataError(f"{out} already exists: name a new folder for the imported run")

    module = SAEModule(config, d)
    with torch.no_grad():
        sae = module.sae
        b_dec = w["b_dec"].float()
        b_enc = w["b_enc"].float()
        if not cfg.get("apply_b_dec_to_input", True):  # z = W_enc·x + b_enc = W_enc·(x − b_dec) + (b_enc + W_enc·b_dec)
            b_enc = b_enc + b_dec @ w["W_enc"].float()
        sae.W_enc.copy_(w["W_enc"].float().t())
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(w["W_dec"].float())
        sae.b_pre.copy_(b_dec)
        sae.initialised.fill_(True)
        if variant == "jumprelu":
            theta = w["threshold"].float() if arch == "jumprelu" else torch.zeros(F)
            module.allocator.get_parameter("log_theta").copy_(theta.expand(F).log())  # θ = 0 (ReLU): −inf

    name = f"imported_{arch}_k{k}_F{F}" if arch == "topk" else f"imported_{arch}_F{F}"
    run_dir = Path(out) if out is not None else new_run_dir(config.out_dir, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        from omegaconf import OmegaConf

        config_dict = config.as_dict()
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config_dict)))
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        state = {"hyper_parameters": {"config": config_dict, "d_model": d}, "state_dict": module.state_dict()}
        check_plain(state)
        with atomic_path(run_dir / "checkpoints" / "final.ckpt") as tmp:
            torch.save(state, tmp)
        save_native(module, run_dir / NATIVE, config_dict)
        atomic_write_json(
            run_dir / "imported.json",
            {"from": str(Path(folder).resolve()), "saelens_cfg": cfg, "when": time.strftime("%Y-%m-%d %H:%M:%S")},
        )
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_dir


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description="SAE weights in and out: SAELens's on-disk format both ways")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a finished run to a SAELens folder (cfg.json + sae_weights.safetensors)")
    e.add_argument("run", type=Path, help="a finished run folder (checkpoints/final.ckpt)")
    e.add_argument("out", type=Path, help="the folder to create (must not exist)")
    i = sub.add_parser("import", help="a SAELens folder (topk, jumprelu, standard) to a run folder of ours")
    i.add_argument("folder", type=Path, help="a SAELens folder (cfg.json + sae_weights.safetensors)")
    i.add_argument("overrides", nargs="*", help="config overrides naming the data to evaluate on, e.g. data=minilm")
    i.add_argument("--out", type=Path, default=None, help="the run folder (default: outputs/runs/<date>_imported_...)")
    a = p.parse_args(argv)
    with user_errors():
        if a.command == "export":
            out = export_saelens(a.run, a.out)
            print(f"written {out} (load it with sae_lens.SAE.load_from_disk({str(out)!r}))")
        else:
            out = import_saelens(a.folder, a.overrides, a.out)
            print(f"written {out} (evaluate it: python -m sae_lightning.evaluate {out})")
    return out


if __name__ == "__main__":
    main()
