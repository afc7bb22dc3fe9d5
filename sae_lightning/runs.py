"""Run folders: a new one for a run, the native weights file every run writes, and a finished
run read back (its SAE and the spec of its data) for ``evaluate``, ``browser`` and ``interop``.

The native file (``<run>/sae.safetensors``, :func:`save_native`): the parameters in our layout
and units (``W_enc``, ``W_dec`` as [F, d], ``b_enc``, ``b_pre``, the dataset scale ``scale``),
the threshold mode's thresholds ``theta`` where the allocator has them, and the resolved config
as JSON metadata. Reading it needs only ``safetensors``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from . import checkpoint_file
from .atomic import atomic_path
from .data import DataSpec
from .errors import ConfigError, DataError
from .module import SAEModule
from .resume import upgraded

NATIVE = "sae.safetensors"


def new_run_dir(out_dir: str, variant: str) -> Path:
    """A new run folder ``<out_dir>/runs/<date>_<time>_<variant>_k<k>_F<n_latents>``, unique even when runs start
    in the same second (``_2``, ``_3``, ... appended; ``mkdir`` decides, atomically)."""
    runs = Path(out_dir).expanduser() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    base = f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{variant}"
    for i in range(1, 10_000):
        path = runs / (base if i == 1 else f"{base}_{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise ConfigError("out_dir", out_dir, f"a folder with room for another run named {base}")


def thresholds(module) -> Tensor | None:
    """The threshold mode's θ per latent ([F]), or None for an allocator without thresholds."""
    alloc = module.allocator
    if not alloc.has_thresholds:
        return None
    theta = alloc.current_theta("calibrated").detach().to(torch.float32)
    return theta.expand(module.sae.n_latents).clone() if theta.dim() == 0 else theta.clone()


def save_native(module, path: Path, config: dict) -> None:
    """``sae.safetensors``: the SAE in our own layout and units (see the module docstring)."""
    sae = module.sae
    W_enc, b_enc, W_dec = sae.folded()  # a free decoder's norms folded in: unit rows, same codes and x̂
    tensors = {
        "W_enc": W_enc,
        "b_enc": b_enc,
        "W_dec": W_dec,
        "b_pre": sae.b_pre,
        "scale": sae.scale.reshape(1),
    }
    theta = thresholds(module)
    if theta is not None:
        tensors["theta"] = theta
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    meta = {"format": "sae_lightning", "allocator": module.variant.allocator, "config": json.dumps(config, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_run(run_dir: Path, device: str = "cpu") -> tuple[SAEModule, DataSpec]:
    """A finished run's SAE (``checkpoints/final.ckpt``) and the spec of the data it was trained on."""
    path = Path(run_dir) / "checkpoints" / "final.ckpt"
    if not path.is_file():
        raise DataError(f"{path} does not exist: {run_dir} is not a finished run folder")
    ckpt = checkpoint_file.load(path, str(run_dir), map_location=device)
    module = SAEModule.from_checkpoint(ckpt).to(device)
    return module, DataSpec.from_raw(upgraded(ckpt["hyper_parameters"]["config"])["data"], "data")
