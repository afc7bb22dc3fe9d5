"""Evaluate a trained SAE's downstream loss on more held-out contexts than validation uses.

    python -m sae_lightning.evaluate outputs/runs/<run> [--contexts 128]

Loads ``checkpoints/final.ckpt`` and ``config.yaml`` of the run, opens its activation cache,
and measures CE clean / zero-ablated / spliced, ΔCE and loss recovered (both inference modes)
on the cache's last ``--contexts`` contexts, as the DownstreamLoss callback does at every
validation. Writes ``downstream_<contexts>.json`` into the run folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .atomic import atomic_write_json
from .callbacks.downstream import DownstreamLoss
from .data import DataSpec
from .data.activations import ActivationsData
from .data.shards import read_manifest
from .errors import DataError
from .module import SAEModule


def load_run(run_dir: Path, device: str = "cpu") -> tuple[SAEModule, DataSpec]:
    """A finished run's SAE (``checkpoints/final.ckpt``) and the spec of the data it was trained on."""
    path = Path(run_dir) / "checkpoints" / "final.ckpt"
    if not path.is_file():
        raise DataError(f"{path} does not exist: {run_dir} is not a finished run folder")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    config = ckpt["hyper_parameters"]["config"]
    module = SAEModule(config, ckpt["hyper_parameters"]["d_model"])
    module.load_state_dict(ckpt["state_dict"])
    module.to(device).eval()
    return module, DataSpec.from_raw(config["data"], "data")


def downstream(run_dir: Path, contexts: int, device: str = "cpu") -> dict[str, float]:
    module, data = load_run(run_dir, device)
    if not isinstance(data, ActivationsData):
        raise DataError(f"{run_dir} was trained on {data.kind} data: no language model to splice into")
    folder = Path(data.path)
    manifest = read_manifest(folder)
    if manifest is None or not manifest["harvest"]["lm"]["causal"]:
        raise DataError(f"{folder}: no cache of a causal language model (ΔCE needs next-token logits)")
    callback = DownstreamLoss(folder, manifest, contexts, data.batch_size)
    figures = callback.measure(module)
    figures["contexts"] = contexts
    figures["tokens_spliced"] = int(callback.keep.sum())
    return figures


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a run folder (with config.yaml and checkpoints/final.ckpt)")
    p.add_argument("--contexts", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    figures = downstream(a.run, a.contexts, a.device)
    out = a.run / f"downstream_{a.contexts}.json"
    atomic_write_json(out, figures, sort_keys=True)
    print(
        f"{a.run.name}: CE clean {figures['val/ce_clean']:.4f}, zero-ablated {figures['val/ce_zero_ablation']:.4f}, "
        f"{figures['tokens_spliced']} tokens spliced"
    )
    for mode in ("batch", "threshold"):
        print(
            f"  {mode}: CE {figures[f'val/{mode}/ce_spliced']:.4f}, ΔCE {figures[f'val/{mode}/delta_ce']:+.4f}, "
            f"loss recovered {100 * figures[f'val/{mode}/loss_recovered']:.2f}%"
        )
    print(f"written {out}")
    return figures


if __name__ == "__main__":
    main()
