"""Gradient-aware ranking (g-SAE) measured: ``python -m benchmarks.gradient_ranking``
(docs/gradient_ranking.md).

On SmolLM2's block-9 residual stream with ∇ₓL stored beside each token (``data=smollm2_grad``,
harvested first if missing: resumable), trains TopK + aux_k, Mutual Choice + aux_zipf and
Feature Choice (demand capacities) at k = 32 with ``variant.gradient_ranking.beta`` ∈ {0, 0.5,
2}, three training seeds each, the recipe of the claims grid (benchmarks/claims.py: 1000 steps,
F = 4096). Reports mean ± std over seeds of the figures at matched L0 (threshold mode, each token
on its own, the thresholds calibrated to L0 = k: FVU interpolated to L0 = k, ΔCE and KL of the
spliced model at the calibrated factor), batch mode's, and dead latents; and, per allocator,
whether the paper's claim holds: lower ΔCE than β = 0 at equal L0, by more than the seeds' std,
for an FVU cost.

Resumable as the claims grid: a run with a ``metrics.json`` is kept, one stopped midway resumes
from its checkpoint. ``--report`` only rewrites the page from the runs there are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import run_state, train_in_subprocess
from benchmarks.claims import CONFIGS, PRECISION, fmt, mean_std
from sae_lightning.atomic import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
CACHE = "smollm2_l9_pydocs_grad"
DATA = ["data=smollm2_grad", "data.downstream.during_training=false"]
ALLOCATORS = ("topk+aux_k", "mc+aux_zipf", "fc_demand")
KEYS = {
    "FVU at L0 = k": "val/threshold/fvu_at_k",
    "L0 threshold": "val/threshold/l0_mean",
    "ΔCE threshold": "val/threshold/delta_ce",
    "KL threshold": "val/threshold/kl_div",
    "FVU batch": "val/batch/fvu",
    "ΔCE batch": "val/batch/delta_ce",
    "dead": "val/dead_fraction",
}
DIGITS = {"L0 threshold": 2}


def folder_of(out: Path, config: str, beta: float, seed: int) -> Path:
    return out / config / f"beta{beta:g}_s{seed}"


def finished(folder: Path) -> dict | None:
    done, _ = run_state(folder)
    return json.loads((done / "metrics.json").read_text()) if done is not None else None


def run_one(out: Path, config: str, beta: float, seed: int, k: int, extra: list[str], cache: Path, threads: int):
    folder = folder_of(out, config, beta, seed)
    done, stopped = run_state(folder)
    if done is not None:
        return json.loads((done / "metrics.json").read_text())
    args = [
        *DATA,
        f"data.path={cache}",
        *CONFIGS[config],
        f"variant.k={k}",
        f"seed={seed}",
        f"variant.gradient_ranking.beta={beta}",
        f"out_dir={folder}",
        "progress=none",
        *PRECISION,
        *extra,
    ]
    if stopped is not None:  # stopped midway: continue it
        args = [f"resume={stopped}", "progress=none"]
    if not train_in_subprocess(args, folder, threads, f"{config} beta={beta} seed={seed}"):
        return None
    return finished(folder)


def harvest(cache: Path) -> None:
    manifest = cache / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return
    print(f"harvesting SmolLM2 activations and gradients into {cache} (once; resumable)", flush=True)
    subprocess.run([sys.executable, "harvest.py", DATA[0], f"data.path={cache}"], cwd=ROOT, check=True)


def claim(rows: dict[float, dict], betas: list[float]) -> str:
    """The paper's claim for one allocator: at some β > 0, ΔCE (threshold, L0 = k) lower than at
    β = 0 by more than the std of the difference, and the FVU it costs."""
    base = rows.get(0.0)
    if base is None or base["ΔCE threshold"][2] == 0:
        return "no β = 0 runs yet"
    parts = []
    for beta in [b for b in betas if b > 0 and b in rows and rows[b]["ΔCE threshold"][2]]:
        (m0, s0, n0), (m1, s1, n1) = base["ΔCE threshold"], rows[beta]["ΔCE threshold"]
        (f0, _, _), (f1, _, _) = base["FVU at L0 = k"], rows[beta]["FVU at L0 = k"]
        gain, spread = m0 - m1, math.hypot(s0, s1)
        if min(n0, n1) < 2:  # one seed has no spread to judge against
            verdict = f"not judged: {min(n0, n1)} seed"
        else:
            verdict = "holds" if gain > spread else "does not hold"
        parts.append(
            f"β = {beta:g}: ΔCE {m1:.4f} vs {m0:.4f} ({'−' if gain >= 0 else '+'}{abs(gain):.4f}, std of the "
            f"difference {spread:.4f}: {verdict}); FVU {f1:.4f} vs {f0:.4f} ({100 * (f1 / f0 - 1):+.1f} %)"
        )
    return "; ".join(parts) or "no β > 0 runs yet"


def report(results: dict, args, doc: Path) -> str:
    table: dict = {}
    for (config, beta, _seed), m in results.items():
        if m is not None:
            table.setdefault(config, {}).setdefault(beta, []).append(m)
    agg = {
        c: {b: {n: mean_std([m.get(key) for m in ms]) for n, key in KEYS.items()} for b, ms in sorted(by_b.items())}
        for c, by_b in table.items()
    }
    runs = sum(1 for m in results.values() if m is not None)
    lines = [
        "# Gradient-aware ranking (g-SAE), measured",
        "",
        f"Made by `python -m benchmarks.gradient_ranking` on SmolLM2-135M's residual stream after block 9 of 30 "
        f"(d = 576), with ∇ₓL of the next-token loss stored beside each token (`data=smollm2_grad`): k = {args.k}, "
        f"{args.steps} steps of 1024 tokens, F = 4096, training seeds {', '.join(map(str, args.seeds))}, the claims "
        f"grid's configurations ([results.md](results.md)) with `variant.gradient_ranking.beta` = β and fp32 "
        f"selection (`{' '.join(PRECISION)}`); {runs} of "
        f"{len(results)} runs are in. Mean ± std over the seeds that ran (last column). The method and our "
        "choices: [method_choices.md](method_choices.md) (gradient-aware ranking).",
        "",
        "Training ranks z′·(1 + β·|d̂·ĝ|); evaluation has no gradients, so every figure here is of the SAE "
        "as deployed: **threshold mode** (each token on its own, thresholds calibrated on held-out tokens and "
        "scaled to L0 = k there; FVU interpolated to L0 = k on the validation tokens; ΔCE and KL(clean ‖ spliced) "
        "of the model with the SAE spliced in at the calibrated factor, on the cache's last 128 contexts) and "
        "batch mode (the plain allocator on each validation batch of 1024 tokens). TopK's threshold mode is "
        "TopK itself.",
        "",
        "## The claim: better ΔCE at equal L0, for a small FVU cost",
        "",
        "| allocator | verdict |",
        "|---|---|",
    ]
    lines += [f"| {c} | {claim(agg[c], args.betas)} |" for c in ALLOCATORS if c in agg]
    lines += ["", "## Every figure", ""]
    names = list(KEYS)
    lines += ["| allocator | β | " + " | ".join(names) + " | seeds |", "|---|---|" + "---|" * (len(names) + 1)]
    for config in [c for c in ALLOCATORS if c in agg]:
        for beta, figs in agg[config].items():
            cells = [fmt(figs[n], pct=n == "dead", digits=DIGITS.get(n, 4)) for n in names]
            lines.append(f"| {config} | {beta:g} | " + " | ".join(cells) + f" | {figs[names[0]][2]} |")
    lines += ["", "Configurations: " + "; ".join(f"{c}: `{' '.join(CONFIGS[c])}`" for c in ALLOCATORS), ""]
    text = "\n".join(lines)
    atomic_write_text(doc, text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=list(ALLOCATORS), choices=list(ALLOCATORS))
    p.add_argument("--betas", nargs="+", type=float, default=[0.0, 0.5, 2.0])
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (each on one thread)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gradient_ranking")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "outputs" / "cache")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "gradient_ranking.md")
    p.add_argument("--report", action="store_true", help="only rewrite the page from the runs there are")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = p.parse_args(argv)
    extra = [f"trainer.max_steps={args.steps}", *args.overrides]
    cache = args.cache_dir / CACHE
    # seed by seed: every (allocator, β) gets its first seed before any gets its second
    grid = [(c, float(b), s) for s in args.seeds for c in args.configs for b in args.betas]
    results: dict = {}
    if args.report:
        results = {(c, b, s): finished(folder_of(args.out, c, b, s)) for c, b, s in grid}
    else:
        harvest(cache)
        start, done, trained = time.time(), 0, 0

        def one(key):
            nonlocal done, trained
            threads = 1 if args.jobs > 1 else os.cpu_count() or 1
            t = time.time()
            config, beta, seed = key
            m = run_one(args.out, config, beta, seed, args.k, extra, cache, threads)
            done += 1
            trained += time.time() - t > 60  # runs found finished take no time: not in the rate
            eta = (time.time() - start) / max(trained, 1) * (len(grid) - done)
            figure = f"FVU at L0 = k {m.get('val/threshold/fvu_at_k', float('nan')):.4f}, ΔCE " if m else "failed"
            if m:
                figure += f"{m.get('val/threshold/delta_ce', float('nan')):.4f}"
            print(
                f"[{done}/{len(grid)}] {key[0]} β={key[1]:g} seed {key[2]}: {figure}; about {eta / 60:.0f} min left",
                flush=True,
            )
            return key, m

        with ThreadPoolExecutor(args.jobs) as ex:
            results = dict(ex.map(one, grid))
    report(results, args, args.doc)
    print(f"written {args.doc}")


if __name__ == "__main__":
    main()
