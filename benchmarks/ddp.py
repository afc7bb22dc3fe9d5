"""What global allocation costs under DDP: ``python -m benchmarks.ddp``.

For each variant, the real training step (a Lightning ``Trainer`` with ``strategy=ddp_spawn``,
gloo, on CPU ranks; forward, allocation, losses, backward, gradient all-reduce, Adam) is timed on
2 ranks with ``variant.global_allocation=true`` (the allocation over both ranks' tokens) and
``false`` (each rank its own batch), one thread per rank, the same pre-made batches for both.
TopK allocates each token on its own, so its two rows measure the noise. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import cast

import lightning as L
import torch
from torch.utils.data import IterableDataset

from benchmarks.step import build_module
from sae_lightning.atomic import atomic_write_json
from sae_lightning.cli import quiet


class RankBatches(IterableDataset):
    """Rank r's step i reads pre-made batch (i·W + r) mod n: distinct batches on each rank."""

    def __init__(self, batches: list[torch.Tensor], steps: int):
        self.batches, self.steps = batches, steps

    def __iter__(self):
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        for i in range(self.steps):
            yield self.batches[(i * world + rank) % len(self.batches)]


class RankZeroTimer(L.Callback):
    """Wall time of each training batch on rank 0 (the ranks wait for each other in the all-reduce),
    written to ``path`` when training ends."""

    def __init__(self, path: str):
        self.path, self.times = path, cast(list[float], [])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0:
            Path(self.path).write_text(json.dumps(self.times))


def time_ddp(variant: str, global_allocation: bool, args, folder: Path) -> float:
    extra = [f"variant.global_allocation={str(global_allocation).lower()}", *args.overrides]
    module, dm = build_module(variant, args.d, args.latents, args.k, args.batch, "float32", extra)
    g = torch.Generator().manual_seed(0)
    batches = [dm.source.batch(args.batch, g)[0] for _ in range(8)]
    module.init_from_data(torch.cat(batches[:4]))
    path = folder / f"{variant}_{global_allocation}.json"
    trainer = L.Trainer(
        max_steps=args.steps + args.warmup,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RankZeroTimer(str(path))],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=args.ranks,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader(RankBatches(batches, args.steps + args.warmup), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return statistics.median(json.loads(path.read_text())[args.warmup :])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=["topk", "mutual_choice", "feature_choice"])
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1024, help="tokens per rank")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("outputs/benchmarks/ddp.json"))
    p.add_argument("overrides", nargs="*", help="extra train.py overrides")
    args = p.parse_args(argv)
    quiet()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per rank
    torch.set_num_threads(1)
    folder = args.out.parent
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{args.ranks} gloo ranks, B = {args.batch} tokens per rank, d = {args.d}, F = {args.latents}, k = {args.k}")
    print(f"{'variant':16} {'global ms':>10} {'per-rank ms':>12} {'ratio':>6}")
    for variant in args.variants:
        t_global = time_ddp(variant, True, args, folder)
        t_local = time_ddp(variant, False, args, folder)
        rows.append({"variant": variant, "global_s": t_global, "per_rank_s": t_local, "ratio": t_global / t_local})
        print(f"{variant:16} {1e3 * t_global:10.1f} {1e3 * t_local:12.1f} {t_global / t_local:6.2f}", flush=True)
    atomic_write_json(args.out, {"args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows})


if __name__ == "__main__":
    main()
