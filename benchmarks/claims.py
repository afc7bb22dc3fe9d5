"""The paper's claims, measured: ``python -m benchmarks.claims`` (see docs/results.md).

Trains every (dataset, configuration, k, seed) of the grid with ``train.py`` — TopK + aux_k,
Mutual Choice + aux_k, Mutual Choice + aux_zipf, Feature Choice with uniform and with Zipf
capacities, at k ∈ {16, 32, 64}, three training seeds, on the synthetic data and on the
MiniLM and SmolLM2 caches — then writes ``docs/results.md``: mean ± std over seeds of FVU
(batch allocation and calibrated thresholds), L0, dead and under-used latents and, for
SmolLM2, ΔCE; one FVU-against-L0 plot per dataset; and each claim of method.md §5 checked
against its target, with the numbers.

Resumable: a run with a ``metrics.json`` is kept; a run stopped midway is resumed from its
checkpoint; re-running the command finishes the grid. ``--jobs N`` runs N trainings at
once, each on its own thread (the default, 2, fits a 2-core machine). ``--report`` only
rewrites the page from the runs there are.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import train_in_subprocess
from sae_lightning.atomic import atomic_path, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]

DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"args": ["data=synthetic"], "title": "Synthetic (d = 128, 1024 true features)"},
    "minilm": {
        "args": ["data=minilm"],
        "cache": "minilm_l3_pydocs",
        "title": "MiniLM (all-MiniLM-L6-v2), residual stream after block 3 of 6, d = 384",
    },
    "smollm2": {
        "args": ["data=smollm2", "data.downstream.during_training=false"],
        "cache": "smollm2_l9_pydocs",
        "title": "SmolLM2-135M, residual stream after block 9 of 30, d = 576",
    },
}
AUX_K = ["~variant.losses.aux_zipf", "+variant.losses.aux_k.coef=0.03125"]
CONFIGS = {
    "topk+aux_k": ["variant=topk"],
    "mc+aux_k": ["variant=mutual_choice", *AUX_K],
    "mc+aux_zipf": [
        "variant=mutual_choice",
        "variant.losses.aux_zipf.underused_term=pull",
        "variant.losses.aux_zipf.underused_coef=0.1",
    ],
    "fc_uniform": ["variant=feature_choice", "variant.capacity=uniform", "variant.rank=static"],
    "fc_zipf": ["variant=feature_choice", "variant.capacity=zipf", "variant.rank=by_density"],
}
TIMINGS = ("train_seconds", "tokens_per_second")


def run_one(
    out: Path, dataset: str, config: str, k: int, seed: int, extra: list[str], cache_dir: Path, threads: int
) -> dict | None:
    folder = out / dataset / config / f"k{k}_s{seed}"
    runs = sorted((folder / "runs").glob("*")) if (folder / "runs").is_dir() else []
    done = [r for r in runs if (r / "metrics.json").is_file()]
    if done:
        return json.loads((done[-1] / "metrics.json").read_text())
    spec = DATASETS[dataset]
    args = [
        *spec["args"],
        *CONFIGS[config],
        f"variant.k={k}",
        f"seed={seed}",
        f"out_dir={folder}",
        "progress=none",
        *extra,
    ]
    if "cache" in spec:
        args.append(f"data.path={cache_dir / spec['cache']}")
    resumable = [r for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
    if resumable:  # stopped midway: continue it
        args = [f"resume={resumable[-1]}", "progress=none"]
    if not train_in_subprocess(args, folder, threads, f"{dataset} {config} k={k} seed={seed}"):
        return None
    run = max((folder / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    return json.loads((run / "metrics.json").read_text())


def harvest(dataset: str, cache_dir: Path) -> None:
    spec = DATASETS[dataset]
    if "cache" not in spec:
        return
    path = cache_dir / spec["cache"]
    m = path / "manifest.json"
    if m.is_file() and json.loads(m.read_text()).get("complete"):
        return
    print(f"harvesting {dataset} into {path} (once)", flush=True)
    subprocess.run(
        [sys.executable, "harvest.py", spec["args"][0], f"data.path={path}", "progress=false"], cwd=ROOT, check=True
    )


# ---- aggregation -------------------------------------------------------------------------------
KEYS = {
    "FVU batch": "val/batch/fvu",
    "FVU threshold": "val/threshold/fvu",
    "L0 batch": "val/batch/l0_mean",
    "L0 threshold": "val/threshold/l0_mean",
    "dead": "val/dead_fraction",
    "under-used": "val/underused_fraction",
    "ΔCE batch": "val/batch/delta_ce",
    "ΔCE threshold": "val/threshold/delta_ce",
}


def mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate(results: dict) -> dict:
    """{dataset: {config: {k: {figure: (mean, std, n)}}}}"""
    agg: dict = {}
    for (dataset, config, k, _seed), m in results.items():
        if m is None:
            continue
        agg.setdefault(dataset, {}).setdefault(config, {}).setdefault(k, []).append(m)
    return {
        d: {
            c: {
                k: {name: mean_std([m.get(key) for m in ms]) for name, key in KEYS.items()}
                for k, ms in sorted(by_k.items())
            }
            for c, by_k in by_c.items()
        }
        for d, by_c in agg.items()
    }


def fmt(ms: tuple[float, float, int], pct: bool = False, digits: int = 4) -> str:
    mean, std, n = ms
    if n == 0:
        return "–"
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f} %"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def check_claims(agg: dict) -> list[tuple[str, str, bool | None, str]]:
    """(dataset, claim, met?, numbers) for each target of the issue."""
    rows = []
    for dataset, by_c in agg.items():
        topk, mck, mcz = by_c.get("topk+aux_k", {}), by_c.get("mc+aux_k", {}), by_c.get("mc+aux_zipf", {})
        fcs = {c: by_c[c] for c in ("fc_uniform", "fc_zipf") if c in by_c}
        for k in sorted(topk):
            t = topk[k]["FVU batch"][0]
            for name, mc in (("MC+aux_k", mck), ("MC+aux_zipf", mcz)):
                if k in mc:
                    f = mc[k]["FVU batch"][0]
                    rows.append(
                        (
                            dataset,
                            f"k={k}: FVU({name}) ≤ 0.95·FVU(TopK)",
                            f <= 0.95 * t,
                            f"{f:.4f} vs 0.95 × {t:.4f} = {0.95 * t:.4f} (ratio {f / t:.3f})",
                        )
                    )
            for name, fc in fcs.items():
                if k in fc:
                    fb, ft = fc[k]["FVU batch"][0], fc[k]["FVU threshold"][0]
                    rows.append(
                        (
                            dataset,
                            f"k={k}: FVU({name}) ≤ FVU(TopK) in batch or threshold mode",
                            fb <= t or ft <= t,
                            f"batch {fb:.4f}, threshold {ft:.4f} vs TopK {t:.4f}",
                        )
                    )
        for k in sorted(mcz):
            if k in mck:
                dz, dk = mcz[k]["dead"][0], mck[k]["dead"][0]
                rows.append(
                    (
                        dataset,
                        f"k={k}: dead(MC+aux_zipf) ≤ dead(MC+aux_k)",
                        dz <= dk,
                        f"{100 * dz:.2f} % vs {100 * dk:.2f} %",
                    )
                )
        for name, fc in fcs.items():
            worst = max((fc[k]["dead"][0] for k in fc), default=float("nan"))
            rows.append(
                (dataset, f"{name}: 0 dead latents (every k)", worst == 0.0, f"largest dead share {100 * worst:.2f} %")
            )
    return rows


def plot(agg: dict, dataset: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {
        "topk+aux_k": "tab:blue",
        "mc+aux_k": "tab:orange",
        "mc+aux_zipf": "tab:red",
        "fc_uniform": "tab:green",
        "fc_zipf": "tab:olive",
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, ("batch", "threshold")):
        for config, by_k in agg[dataset].items():
            ks = sorted(by_k)
            x = [by_k[k][f"L0 {mode}"][0] for k in ks]
            y = [by_k[k][f"FVU {mode}"][0] for k in ks]
            e = [by_k[k][f"FVU {mode}"][1] for k in ks]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=config, color=colours.get(config))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"mean L0 ({mode})")
        ax.set_title(f"{mode} allocation" if mode == "batch" else "calibrated thresholds")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("FVU (validation)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{dataset}: FVU against L0, mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def report(results: dict, args, doc: Path, img_dir: Path) -> str:
    agg = aggregate(results)
    lines = [
        "# Results: the paper's claims, measured",
        "",
        f"Made by `python -m benchmarks.claims` ({args.steps} steps of 1024 tokens = "
        f"{args.steps * 1024 / 1e6:.2f}M training tokens per run, F = 4096, training seeds "
        f"{', '.join(map(str, args.seeds))}, every other setting the default; the data order is the same for "
        "every run). Each cell is mean ± std over the seeds that ran (the last column counts them). FVU is on the 16 384 held-out validation tokens; *batch* allocates each validation "
        "batch of 1024 tokens as in training, *threshold* uses the thresholds calibrated on held-out tokens "
        "after training (what one token at a time gets); L0 is the mean number of active latents per token "
        "in that mode; dead = not fired in the last 200k training tokens; under-used = density below "
        "0.25 × its Zipf target (or dead). ΔCE: SmolLM2's next-token loss with the SAE spliced in, minus "
        "the clean loss, on the last 128 contexts of the cache."
        + (f" Extra overrides for every run: `{' '.join(args.overrides)}`." if args.overrides else ""),
        "",
    ]
    claims = check_claims(agg)
    if claims:
        met = sum(1 for c in claims if c[2])
        lines += [
            "## The claims against their targets",
            "",
            f"{met} of {len(claims)} targets met. Where a target is missed the numbers say by how much; "
            "nothing here was tuned per dataset.",
            "",
            "| data | target | met | numbers (means) |",
            "|---|---|---|---|",
        ]
        lines += [f"| {d} | {c} | {'yes' if ok else '**no**'} | {n} |" for d, c, ok, n in claims]
        lines.append("")
    for dataset in [d for d in DATASETS if d in agg]:
        lines += [
            f"## {DATASETS[dataset]['title']}",
            "",
            f"![FVU against L0]({os.path.relpath(img_dir, doc.parent)}/results_{dataset}.png)",
            "",
        ]
        names = [n for n in KEYS if not n.startswith("ΔCE") or dataset == "smollm2"]
        lines += ["| config | k | " + " | ".join(names) + " | seeds |", "|---|---|" + "---|" * (len(names) + 1)]
        for config in [c for c in CONFIGS if c in agg[dataset]]:
            for k, figs in agg[dataset][config].items():
                cells = [
                    fmt(figs[n], pct=n in ("dead", "under-used"), digits=2 if n.startswith("L0") else 4) for n in names
                ]
                lines.append(f"| {config} | {k} | " + " | ".join(cells) + f" | {figs['FVU batch'][2]} |")
        lines.append("")
        plot(agg, dataset, img_dir / f"results_{dataset}.png")
    lines += ["## The configurations", "", "| name | overrides |", "|---|---|"]
    lines += [f"| {c} | `{' '.join(o)}` |" for c, o in CONFIGS.items()]
    lines.append("")
    text = "\n".join(lines)
    atomic_write_text(doc, text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--k", nargs="+", type=int, default=[16, 32, 64])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (each on one thread)")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "claims")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "outputs" / "cache")
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--report", action="store_true", help="only rewrite the page from the runs there are")
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = p.parse_args(argv)
    extra = [f"trainer.max_steps={args.steps}", *args.overrides]
    grid = [(d, c, k, s) for d in args.datasets for c in args.configs for k in args.k for s in args.seeds]
    results: dict = {}
    if not args.report:
        for d in args.datasets:
            harvest(d, args.cache_dir)
        start, finished = time.time(), 0

        def one(key):
            nonlocal finished
            m = run_one(args.out, *key, extra, args.cache_dir, threads=1 if args.jobs > 1 else os.cpu_count() or 1)
            finished += 1
            eta = (time.time() - start) / finished * (len(grid) - finished)
            print(
                f"[{finished}/{len(grid)}] {' '.join(map(str, key))}: "
                + (f"FVU {m['val/batch/fvu']:.4f}, dead {100 * m['val/dead_fraction']:.1f} %" if m else "failed")
                + f"; about {eta / 60:.0f} min left",
                flush=True,
            )
            return key, m

        with ThreadPoolExecutor(args.jobs) as ex:
            results = dict(ex.map(one, grid))
    else:
        for key in grid:
            folder = args.out / key[0] / key[1] / f"k{key[2]}_s{key[3]}" / "runs"
            done = sorted(folder.glob("*/metrics.json")) if folder.is_dir() else []
            results[key] = json.loads(done[-1].read_text()) if done else None
    atomic_write_text(
        args.out / "results.json",
        json.dumps(
            {
                "|".join(map(str, k)): ({kk: v for kk, v in m.items() if kk not in TIMINGS} if m else None)
                for k, m in results.items()
            },
            indent=1,
            default=str,
        )
        + "\n",
    )
    report(results, args, args.doc, args.img_dir)
    print(f"written {args.doc} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
