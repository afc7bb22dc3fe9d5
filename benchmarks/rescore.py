"""How exact the re-scored bf16 selection is over training: ``python -m benchmarks.rescore``.

For each variant (default losses) one fp32 training run on the synthetic data at the step
benchmark's size; at every step, on the step's own batch and parameters, three selections:

- the fp32 path's (``model.affinity_dtype=float32``): what training uses;
- the bf16 path's, re-scored (``rescore.py``): candidates on the bf16 matrix, exact values by
  the sampled product;
- the bf16 candidates re-scored with the fp32 matrix's own values: it differs from the fp32
  selection only where a pair of the fp32 selection was not among the candidates (a *miss*: the
  margin was too small).

Counted over the positive pairs (the code: ReLU drops the rest): pairs of the bf16 code not in
the fp32 code (and the reverse), and misses. A pair that differs without a miss is a near-tie:
two values that the dense product and the sampled product round differently (a few ulps).
And how deep the fp32 selection reaches into the bf16 order beyond each cut, in ranks and in bf16
steps, against what the re-scoring allows (the *slack*; a miss needs a negative one): what the
band and the margin are sized by.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

from sae_lightning.allocators.base import BatchContext
from sae_lightning.glibc_malloc import keep_freed_memory
from sae_lightning.rescore import BAND, ROW_BAND, batch_margin
from sae_lightning.sae import ExactRanked

from .step import FreshBatches, bare_trainer, build_module, size_arguments, write_rows


class _Gathered:
    """The fp32 matrix's own values at pairs (token-major or latent-major layout)."""

    def __init__(self, z: torch.Tensor, layout: str, xn: torch.Tensor, sae):
        self.z, self.layout, self.xn, self.sae = z, layout, xn, sae

    def __call__(self, tokens, latents):
        return self.z[tokens, latents] if self.layout == "token" else self.z[latents, tokens]

    def latent_rows(self, tokens):
        return self.sae.affinities(self.xn[tokens], layout="latent")


def _pairs(sel, z, layout) -> set[int]:
    """The positive pairs of a selection, as token·F + latent keys."""
    values = z[sel.rows, sel.cols] if layout == "token" else z[sel.cols, sel.rows]
    keep = values > 0
    n_latents = z.shape[1] if layout == "token" else z.shape[0]
    return set((sel.rows[keep] * n_latents + sel.cols[keep]).tolist())


def _depth(kind: str, sel, z32: torch.Tensor, z16: torch.Tensor) -> tuple[int, int, int]:
    """How deep the fp32 selection reaches into the bf16 order, per group of the cut (a token's
    row for TopK, a latent's for Feature Choice, the batch for Mutual Choice), from the group's
    worst positive selected pair: in ranks (the group's entries whose bf16 value is at least
    that pair's, less the cut k, m_j or M) and in bf16 steps (ulps) below the group's own bf16
    value at the cut's rank. Returns the largest of each over the groups, and the smallest
    slack: what the re-scoring allows less what was reached (the band's steps for TopK and
    Feature Choice, the M/8 margin in ranks for Mutual Choice; negative: a miss). z32, z16 in
    the allocator's layout."""
    token_major = kind != "latent"
    v32 = z32[sel.rows, sel.cols] if token_major else z32[sel.cols, sel.rows]
    group = {"token": sel.rows, "latent": sel.cols, "batch": torch.zeros_like(sel.rows)}[kind]
    n_groups = z16.shape[0] if kind != "batch" else 1
    cut = torch.bincount(group, minlength=n_groups)
    keep = v32 > 0
    v16 = (z16[sel.rows, sel.cols] if token_major else z16[sel.cols, sel.rows])[keep].float()
    worst = torch.full((n_groups,), float("inf")).scatter_reduce(0, group[keep], v16, "amin")
    has = torch.isfinite(worst)
    keys = z16.view(torch.int16)  # positive values: their int16 views order as the floats
    if kind == "batch":
        needed = (z16.float() >= worst).sum().reshape(1)
        at_cut = torch.topk(keys.reshape(-1), int(cut[0])).values[-1:].long()
    else:
        needed = (z16.float() >= worst.unsqueeze(1)).sum(1)
        top = torch.topk(keys, max(1, int(cut.max())), dim=1).values.long()
        at_cut = top.gather(1, (cut - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    depth = (needed - cut)[has]
    if depth.numel() == 0:
        return 0, 0, 0
    worst_key = torch.where(has, worst, torch.zeros_like(worst)).to(torch.bfloat16).view(torch.int16).long()
    ulps = (at_cut - worst_key)[has & (worst > 0)]
    deepest_ulps = int(ulps.max()) if ulps.numel() else 0
    band = ROW_BAND if kind == "token" else BAND  # (TopK's top-(k + k/2) besides: see rescore.py)
    slack = batch_margin(int(cut[0])) - int(depth.max()) if kind == "batch" else band - deepest_ulps
    return int(depth.max()), deepest_ulps, slack


KINDS = {"topk": "token", "mutual_choice": "batch", "feature_choice": "latent"}


class _Counts:
    """The three selections of batches, compared and counted, and the depth of the fp32
    selection in the bf16 order (:func:`_depth`)."""

    def __init__(self):
        self.counts = {"pairs": 0, "only_fp32": 0, "only_bf16": 0, "misses": 0, "steps_with_difference": 0}
        self.counts.update({"deepest": 0, "least_slack": 1 << 62, "deepest_ulps": 0})

    @torch.no_grad()
    def compare(self, module, x: torch.Tensor, step: int = 0) -> None:
        alloc, layout = module.allocator, module.allocator.layout
        xn, _ = module.sae.normalise(x)
        z32 = module.sae.affinities(xn, layout=layout)
        z16 = module.sae.affinities(xn, layout=layout, dtype=torch.bfloat16)
        sel32 = alloc.allocate(z32, BatchContext(step=step))  # no update: no state changes
        fp32 = _pairs(sel32, z32, layout)
        rescored = _pairs(alloc.allocate(z16, BatchContext(step=step, exact=ExactRanked(module.sae, xn))), z32, layout)
        candidates = _pairs(
            alloc.allocate(z16, BatchContext(step=step, exact=_Gathered(z32, layout, xn, module.sae))), z32, layout
        )
        c = self.counts
        c["pairs"] += len(fp32)
        c["only_fp32"] += len(fp32 - rescored)
        c["only_bf16"] += len(rescored - fp32)
        c["misses"] += len(fp32 - candidates)
        c["steps_with_difference"] += int(fp32 != rescored)
        deepest, ulps, slack = _depth(KINDS[alloc.name], sel32, z32, z16)
        c["deepest"], c["least_slack"] = max(c["deepest"], deepest), min(c["least_slack"], slack)
        c["deepest_ulps"] = max(c["deepest_ulps"], ulps)


class _Compare(_Counts, L.Callback):
    """Before each training step: the three selections of its batch."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.compare(module, batch, trainer.global_step)


def measure_run(run: Path) -> dict:
    """A finished run's SAE on its calibration tokens (held-out, real data), a training batch at a time."""
    from sae_lightning.runs import load_run

    module, spec = load_run(run)
    dm = spec.build()
    x = dm.calibration_tokens()
    counts = _Counts()
    B = module.batch_size
    for i in range(0, x.shape[0] - B + 1, B):
        counts.compare(module, x[i : i + B])
    return {"variant": module.variant.allocator, "run": str(run), "steps": x.shape[0] // B, **counts.counts}


def measure(variant: str, d: int, F: int, k: int, B: int, steps: int, extra: list[str]) -> dict:
    """A fp32 training run of ``steps`` steps (Lightning, as train.py), each step's batch compared."""
    module, dm = build_module(variant, d, F, k, B, "float32", extra)
    module.init_from_data(dm.source.batch(4 * B, torch.Generator().manual_seed(0))[0])
    compare = _Compare()
    trainer = bare_trainer(steps, [compare], progress=True)
    loader = torch.utils.data.DataLoader(FreshBatches(dm.source, B, steps), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return {"variant": variant, "steps": steps, **compare.counts}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size_arguments(p)
    p.add_argument("--steps", type=int, default=200, help="training steps per variant, each one compared")
    p.add_argument(
        "--runs", nargs="+", type=Path, help="instead: finished run folders, compared on their calibration tokens"
    )
    p.add_argument("--out", default="outputs/bench/rescore.json")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    a = p.parse_args(argv)
    keep_freed_memory()
    if a.runs:
        rows = [measure_run(run) for run in a.runs]
        print("\nfinished runs on their calibration tokens, a training batch at a time (positive pairs)")
    else:
        rows = [measure(v, a.d, a.latents, a.k, a.batch, a.steps, a.overrides) for v in a.variants]
        print(f"\nd={a.d} F={a.latents} k={a.k} B={a.batch}, {a.steps} training steps each (positive pairs)")
    for r in rows:
        print(
            f"  {r.get('run', r['variant'])}: {r['pairs']} pairs; bf16 re-scored vs fp32: {r['only_fp32']} only in fp32, "
            f"{r['only_bf16']} only in bf16 ({r['steps_with_difference']} steps differ); misses {r['misses']}; "
            f"deepest {r['deepest']} beyond the cut ({r['deepest_ulps']} bf16 steps), least slack {r['least_slack']}"
        )
    write_rows(a.out, a, rows)
    return rows


if __name__ == "__main__":
    main()
