"""The paper's claims, measured: ``python -m benchmarks.claims`` (see docs/results.md).

Trains every (dataset, configuration, k, seed) of the grid with ``train.py`` — TopK + aux_k,
Mutual Choice + aux_k, Mutual Choice + aux_zipf, Feature Choice with Zipf and with demand
capacities, at k ∈ {16, 32, 64}, three training seeds, on the synthetic data and on the
MiniLM and SmolLM2 caches — then writes ``docs/results.md``: mean ± std over seeds of the
headline figure, FVU at L0 = k in threshold mode (token by token, as inference runs: the
calibrated thresholds scaled to L0 = k, interpolated on the validation tokens), batch-mode FVU,
dead and under-used latents and, for SmolLM2, ΔCE and KL at L0 = k; one FVU-against-L0 plot
per dataset; and each claim of method.md §5 checked against its target, with the numbers.

Resumable: a run with a ``metrics.json`` is kept; a run stopped midway is resumed from its
checkpoint; re-running the command finishes the grid (seed by seed: the first seed of every
cell first). Each finished run's ``metrics.json`` and ``rules_test.json`` are copied to
``benchmarks/records/claims/`` (committed): a cell recorded there is done, and ``--report``
rebuilds the page from the records where ``outputs/`` no longer holds the runs. ``--jobs N`` runs N trainings at once, each on its own thread (2 fits a 2-core
machine; 1 leaves a core free). ``--report`` only rewrites the page from the runs there are.
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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import run_state, train_in_subprocess
from sae_lightning.atomic import atomic_path, atomic_write_json, atomic_write_text
from sae_lightning.paired import ContextSums, paired_difference

ROOT = Path(__file__).resolve().parents[1]

DATASETS: dict[str, dict[str, Any]] = {
    "synthetic": {"args": ["data=synthetic"], "title": "Synthetic (d = 128, 1024 true features)"},
    "minilm": {
        "args": ["data=minilm"],
        "cache": "minilm_l3_pydocs",
        "title": "MiniLM (all-MiniLM-L6-v2), residual stream after block 3 of 6, d = 384",
    },
    "hierarchy": {
        "args": ["data=synthetic", "data.hierarchy_parents=64"],
        "title": "Synthetic with a feature hierarchy (64 parents, 4 children each): absorption",
        "configs": ("topk+aux_k", "mc+aux_zipf", "fc_demand", "jumprelu", "matryoshka_topk", "matryoshka_mc"),
        "k": (32,),
    },
    "smollm2": {
        "args": ["data=smollm2", "data.downstream.during_training=false"],
        "cache": "smollm2_l9_pydocs",
        "title": "SmolLM2-135M, residual stream after block 9 of 30, d = 576",
    },
}
AUX_K = ["~variant.losses.aux_zipf", "+variant.losses.aux_k.coef=0.03125"]
# every run also writes its own rule's DL-against-FVU curve on the test split (DL at a common FVU)
CURVE = ["evaluation.dl_curve=true"]
# fp32 selection, for the benchmarks whose pages were measured before model.affinity_dtype=auto
# (parity, gradient_ranking). The grid itself selects as a default run does (auto: bf16 re-scored,
# the same selection, on CPUs with a bf16 product; docs/performance.md)
PRECISION = ["model.affinity_dtype=float32"]
# each finished run's metrics.json and rules_test.json, committed: the grid runs in parts across
# sessions and machines, and its page is rebuilt from these alone (--report)
RECORDS = ROOT / "benchmarks" / "records" / "claims"
RECORDED = ("metrics.json", "rules_test.json")
CONFIGS = {
    "topk+aux_k": ["variant=topk"],
    "mc+aux_k": ["variant=mutual_choice", *AUX_K],
    "mc+aux_zipf": [
        "variant=mutual_choice",
        "variant.losses.aux_zipf.underused_term=pull",
        "variant.losses.aux_zipf.underused_coef=0.1",
    ],
    "fc_zipf": ["variant=feature_choice", "variant.capacity=zipf", "variant.rank=by_density"],
    "fc_demand": ["variant=feature_choice", "variant.capacity=demand"],
    "jumprelu": ["variant=jumprelu"],
    "matryoshka_topk": ["variant=matryoshka_topk"],
    "matryoshka_mc": ["variant=matryoshka_mutual_choice"],
}
ONLY_K = {"matryoshka_topk": (32,), "matryoshka_mc": (32,)}  # configurations run at some k only
TIMINGS = ("train_seconds", "tokens_per_second", "phase_seconds")


def run_one(
    out: Path,
    dataset: str,
    config: str,
    k: int,
    seed: int,
    extra: list[str],
    cache_dir: Path,
    threads: int,
    records: Path | None = None,
) -> dict | None:
    """One cell of the grid, trained unless it is done (a finished run under ``out``, or its
    record under ``records``); a run stopped midway is resumed. With ``records``, a finished run's
    files are copied there (:func:`record_run`)."""
    folder = out / dataset / config / f"k{k}_s{seed}"
    done, stopped = run_state(folder)
    if done is None and records is not None and (got := recorded(records, dataset, config, k, seed)) is not None:
        return got
    if done is not None:
        if records is not None:
            record_run(records, dataset, config, k, seed, done)
        return with_description_length(done, json.loads((done / "metrics.json").read_text()))
    spec = DATASETS[dataset]
    args = [
        *spec["args"],
        *CONFIGS[config],
        f"variant.k={k}",
        f"seed={seed}",
        f"out_dir={folder}",
        "progress=none",
        *CURVE,
        *extra,
    ]
    if "cache" in spec:
        args.append(f"data.path={cache_dir / spec['cache']}")
    if stopped is not None:  # stopped midway: continue it
        args = [f"resume={stopped}", "progress=none"]
    if not train_in_subprocess(args, folder, threads, f"{dataset} {config} k={k} seed={seed}"):
        return None
    run = max((folder / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
    if records is not None:
        record_run(records, dataset, config, k, seed, run)
    return json.loads((run / "metrics.json").read_text())


def record_folder(records: Path, dataset: str, config: str, k: int, seed: int) -> Path:
    return records / dataset / config.replace("+", "_") / f"k{k}_s{seed}"


def record_run(records: Path, dataset: str, config: str, k: int, seed: int, run: Path) -> None:
    """Copy a finished run's RECORDED files into its record folder, as compact JSON (each file
    atomically; metrics.json last, so a record with it is whole)."""
    target = record_folder(records, dataset, config, k, seed)
    target.mkdir(parents=True, exist_ok=True)
    for name in reversed(RECORDED):
        if (run / name).is_file():  # compact JSON: ~200 runs are committed
            text = json.dumps(json.loads((run / name).read_text()), sort_keys=True, separators=(",", ":"))
            atomic_write_text(target / name, text + "\n")


def finished_run(out: Path, dataset: str, config: str, k: int, seed: int) -> Path | None:
    """The cell's latest finished run folder under ``out`` (one with metrics.json), or None."""
    folder = out / dataset / config / f"k{k}_s{seed}" / "runs"
    done = sorted(folder.glob("*/metrics.json")) if folder.is_dir() else []
    return done[-1].parent if done else None


def recorded(records: Path, dataset: str, config: str, k: int, seed: int) -> dict | None:
    """A recorded run's metrics (``run_dir`` pointing at the record, which holds its
    rules_test.json), or None."""
    folder = record_folder(records, dataset, config, k, seed)
    if not (folder / "metrics.json").is_file():
        return None
    return {**json.loads((folder / "metrics.json").read_text()), "run_dir": str(folder)}


def with_description_length(run: Path, metrics: dict) -> dict:
    """The run's metrics with the threshold mode's description length, which runs trained
    before the final validation measured it lack: computed once, as that validation does (the
    validation tokens, the default tolerance), into ``<run>/description_length.json``."""
    if DL_KEY in metrics:
        return metrics
    path = run / "description_length.json"
    if not path.is_file():
        from sae_lightning.description_length import description_length
        from sae_lightning.runs import load_run

        module, data = load_run(run)
        source = data.build()
        source.open()
        figures = description_length(module, source.val_tensor(), "threshold")
        atomic_write_json(path, {f"val/threshold/{key}": value for key, value in figures.items()})
    return {**metrics, **json.loads(path.read_text())}


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
    "FVU at L0 = k": "test/fvu_at_k",  # the headline: the own rule at L0 = k, on the test split
    "FVU at L0 = k, validation": "val/threshold/fvu_at_k",  # where checkpoints and defaults choose
    "L0 threshold": "test/l0_calibrated",  # what the calibrated factor gives on the test split
    "FVU batch": "val/batch/fvu",
    "DL at L0 = k": "test/dl_at_k",  # bits per token, the own rule at L0 = k, test split
    "dead": "val/dead_fraction",
    "under-used": "val/underused_fraction",
    "ΔCE at L0 = k": "test/delta_ce_at_k",  # the own rule's thresholds scaled to L0 = k on the spliced tokens
    "KL at L0 = k": "test/kl_div_at_k",
    "ΔCE batch": "val/batch/delta_ce",
    "absorption": "val/absorption",  # data with a feature hierarchy only
    "parent recovery": "val/parent_recovery_mean_max_cos",
}
ONLY_ON = {
    "ΔCE at L0 = k": "smollm2",
    "KL at L0 = k": "smollm2",
    "ΔCE batch": "smollm2",
    "absorption": "hierarchy",
    "parent recovery": "hierarchy",
}
RULES = ("topk", "global_threshold", "latent_thresholds")  # sae_lightning/rules.py
REFERENCE = "topk+aux_k"  # what every configuration is compared with, paired by seed
WORD = {"A better": "better", "B better": "worse", "tie": "tie"}  # a Difference's verdict, said of A
HEADLINE = "FVU at L0 = k"
DL_KEY = "val/threshold/description_length"
CORE = {  # SAEBench's core figures (threshold mode) and the description length's parts, for one k
    "explained variance": "val/threshold/explained_variance",
    "cosine sim.": "val/threshold/cossim",
    "L2 ratio": "val/threshold/l2_ratio",
    "rel. bias": "val/threshold/relative_reconstruction_bias",
    "alive": "val/threshold/alive_fraction",
    "density mean": "val/threshold/density_mean",
    "density median": "val/threshold/density_median",
    "DL bits/token": DL_KEY,
    "DL: which fire": "val/threshold/dl_firing_bits",
    "DL: values": "val/threshold/dl_value_bits",
    "precision Δ": "val/threshold/dl_precision",
    "naive L0·(log2 F + b)": "val/threshold/dl_naive_bits",
    "raw x at Δ": "val/threshold/dl_raw_bits",
}
CORE_K = 32
DIGITS = {"L0": 2, "DL": 1}  # decimals of a column, by its name's first word (else 4)


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    found = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not found:
        return float("nan"), float("nan"), 0
    return statistics.fmean(found), statistics.stdev(found) if len(found) > 1 else 0.0, len(found)


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


def rule_sums(m: dict | None) -> dict[str, ContextSums]:
    """A run's per-context sums on the test split, per rule (its ``rules_test.json``); {} for a
    run without them (made before the test split)."""
    if not m or not m.get("run_dir"):
        return {}
    path = Path(m["run_dir"]) / "rules_test.json"
    if not path.is_file():
        return {}
    return {rule: ContextSums.from_dict(got["sums"]) for rule, got in json.loads(path.read_text())["rules"].items()}


def paired(results: dict, dataset: str, k: int, a: tuple[str, str], b: tuple[str, str], replicates: int = 2000):
    """The paired difference (paired.py) of configuration a[0] read by rule a[1] against b[0] read
    by b[1] (rule "own": the configuration's own), over the seeds both have; None without two sides."""
    seeds = sorted({s for (d, c, kk, s), m in results.items() if d == dataset and kk == k and m})
    sa, sb = [], []
    for seed in seeds:
        ma, mb = results.get((dataset, a[0], k, seed)), results.get((dataset, b[0], k, seed))
        ra, rb = rule_sums(ma), rule_sums(mb)
        rule_a = ma.get("test/own_rule") if ma and a[1] == "own" else a[1]
        rule_b = mb.get("test/own_rule") if mb and b[1] == "own" else b[1]
        if rule_a in ra and rule_b in rb:
            sa.append(ra[rule_a])
            sb.append(rb[rule_b])
    if not sa:
        return None
    return paired_difference(sa, sb, k, replicates=replicates)


def check_claims(agg: dict, results: dict) -> list[tuple[str, str, bool | None, str]]:
    """(dataset, claim, met?, numbers) for each target of the issue, on the headline figure (the
    test split): a target is met when the 95 % interval of the paired difference (paired.py:
    seeds and contexts bootstrapped) lies wholly on the claimed side; a tie is not a win.
    Feature Choice's 0 dead latents holds by construction (its capacity floor): a fact, not a
    target, reported below the table."""
    rows = []
    for dataset, by_c in agg.items():
        for k in sorted(by_c.get(REFERENCE, {})):
            for config, name in (("mc+aux_k", "MC+aux_k"), ("mc+aux_zipf", "MC+aux_zipf"), ("fc_demand", "FC demand")):
                d = paired(results, dataset, k, (config, "own"), (REFERENCE, "own"))
                if d is not None:
                    rows.append(
                        (
                            dataset,
                            f"k={k}: FVU({name}) < FVU(TopK)",
                            d.high < 0,
                            f"{d} ({d.seeds} seed{'s' if d.seeds != 1 else ''} × {d.contexts} contexts)",
                        )
                    )
        mck, mcz = by_c.get("mc+aux_k", {}), by_c.get("mc+aux_zipf", {})
        for k in sorted(mcz):
            if k in mck:
                dz, dk = mcz[k]["dead"], mck[k]["dead"]
                rows.append(
                    (
                        dataset,
                        f"k={k}: dead(MC+aux_zipf) < dead(MC+aux_k) by more than the seeds' std",
                        dk[0] - dz[0] > math.sqrt(dz[1] ** 2 + dk[1] ** 2),
                        f"{100 * dz[0]:.2f} ± {100 * dz[1]:.2f} % vs {100 * dk[0]:.2f} ± {100 * dk[1]:.2f} %",
                    )
                )
    return rows


def facts(agg: dict) -> list[str]:
    """What holds by construction, said as facts with the numbers (not counted as targets met)."""
    lines = []
    for dataset, by_c in agg.items():
        for name in ("fc_zipf", "fc_demand"):
            if name in by_c:
                worst = max(by_c[name][k]["dead"][0] for k in by_c[name])
                lines.append(
                    f"- {dataset}, {name}: largest dead share {100 * worst:.2f} % (Feature Choice's capacity "
                    "floor gives every latent tokens each batch: 0 dead by construction)"
                )
    return lines


# the new variants (issue 41) against the paper's allocators, each read by its own rule
VARIANT_PAIRS = (
    ("jumprelu", "mc+aux_zipf"),
    ("jumprelu", "fc_demand"),
    ("matryoshka_topk", "topk+aux_k"),
    ("matryoshka_mc", "mc+aux_zipf"),
)


def pairs_table(results: dict, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Paired differences of the headline (FVU at L0 = k, test split), A against B each read by
    its own rule, in % with the 95 % interval and a verdict: one row per dataset and k, one
    column per pair; [] when no pair has both sides anywhere."""
    cells = {(d, k) for (d, _c, k, _s), m in results.items() if m}
    rows = []
    for dataset in [d for d in DATASETS if any(d == dd for dd, _ in cells)]:
        for k in sorted(k for d, k in cells if d == dataset):
            row, seeds = [], []
            for a, b in pairs:
                d = paired(results, dataset, k, (a, "own"), (b, "own"))
                if d is not None:
                    seeds.append(d.seeds)
                row.append("" if d is None else f"{d} {WORD[d.verdict()]}")
            if seeds:
                count = str(min(seeds)) if min(seeds) == max(seeds) else f"{min(seeds)}–{max(seeds)}"
                rows.append(f"| {dataset} | {k} | " + " | ".join(row) + f" | {count} |")
    if not rows:
        return []
    return [
        "| data | k | " + " | ".join(f"{a} vs {b}" for a, b in pairs) + " | seeds |",
        "|---|---|" + "---|" * (len(pairs) + 1),
        *rows,
        "",
    ]


def summary_table(results: dict) -> list[str]:
    """Every configuration against TopK + aux_k, then the new variants against Mutual Choice and
    Feature Choice: the page's comparisons in two tables."""
    against_topk = pairs_table(results, [(c, REFERENCE) for c in CONFIGS if c != REFERENCE])
    if not against_topk:
        return []
    lines = [
        "## Every configuration against TopK, in one table",
        "",
        f"FVU at L0 = k on the test split of each configuration against {REFERENCE} (each read by its own "
        "rule), paired by seed: 100·(FVU / TopK's FVU − 1) in % with its 95 % interval (a bootstrap over "
        "seeds and test contexts, paired.py). *better*: the interval lies below 0; *worse*: above 0; "
        "*tie*: it holds 0. An empty cell: not in the grid.",
        "",
        *against_topk,
    ]
    new = pairs_table(results, VARIANT_PAIRS)
    if new:
        lines += [
            "The new variants (JumpReLU, Matryoshka) against Mutual Choice (its default losses, aux_zipf) and "
            "Feature Choice (demand), the same way: 100·(FVU of the first / FVU of the second − 1).",
            "",
            *new,
        ]
    return lines


def own_curve(m: dict | None) -> list[dict] | None:
    """The run's own rule's DL-against-FVU curve on the test split (rules_test.json), if it has one."""
    if not m or not m.get("run_dir") or not (Path(m["run_dir"]) / "rules_test.json").is_file():
        return None
    saved = json.loads((Path(m["run_dir"]) / "rules_test.json").read_text())
    return saved["rules"].get(saved["own_rule"], {}).get("figures", {}).get("dl_curve")


def dl_matched_table(results: dict, agg: dict, dataset: str) -> list[str]:
    """Description length at a common FVU (the MDL-SAE comparison): each configuration's own
    rule's DL-against-FVU curve on the test split read at TopK's mean FVU at L0 = k."""
    from sae_lightning.rules import dl_at_fvu

    rows = []
    for k, figs in sorted(agg[dataset].get(REFERENCE, {}).items()):
        target = figs[HEADLINE][0]
        for config in [c for c in CONFIGS if k in agg[dataset].get(c, {})]:
            values = [
                dl_at_fvu(curve, target)
                for (d, c, kk, _s), m in results.items()
                if d == dataset and c == config and kk == k and (curve := own_curve(m))
            ]
            if values:
                rows.append(f"| {config} | {k} | {target:.4f} | {fmt(mean_std(values), digits=1)} | {len(values)} |")
    if not rows:
        return []
    return [
        "Description length at a common FVU (bits per token, test split): each run's DL against FVU along its "
        "own rule's sweep, read at TopK's mean FVU at L0 = k (– where the sweep does not reach it):",
        "",
        "| config | k | FVU | DL at that FVU | seeds |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def rules_table(results: dict, dataset: str) -> list[str]:
    """Training allocator × inference rule: FVU at L0 = k on the test split, mean ± std over
    seeds, one table per k; then the paired differences that separate the two."""
    cells: dict = {}
    for (d, config, k, _seed), m in results.items():
        if m and d == dataset:
            for rule in RULES:
                if f"test/{rule}/fvu_at_k" in m:
                    cells.setdefault(k, {}).setdefault(config, {}).setdefault(rule, []).append(
                        m[f"test/{rule}/fvu_at_k"]
                    )
    if not cells:
        return []
    lines = [
        "FVU at L0 = k on the test split, by how the SAE was trained (rows) and how it is read token by "
        "token (columns; rules.py: every threshold rule scaled to L0 = k on the calibration tokens; **bold**: "
        "the configuration's own rule). Mean ± std over seeds.",
        "",
    ]
    for k in sorted(cells):
        lines += [f"k = {k}:", "", "| trained as | " + " | ".join(RULES) + " |", "|---|" + "---|" * len(RULES)]
        for config in [c for c in CONFIGS if c in cells[k]]:
            own = next(
                (
                    m.get("test/own_rule")
                    for (d, c, kk, _s), m in results.items()
                    if m and d == dataset and c == config and kk == k
                ),
                None,
            )
            row = []
            for rule in RULES:
                text = fmt(mean_std(cells[k][config].get(rule, [])))
                row.append(f"**{text}**" if rule == own else text)
            lines.append(f"| {config} | " + " | ".join(row) + " |")
        lines.append("")
        rows = []
        for config in [c for c in CONFIGS if c in cells[k] and c != REFERENCE]:
            for what, a, b in (
                ("the training (both read by TopK's rule)", (config, "topk"), (REFERENCE, "topk")),
                ("the training (each read by its own rule)", (config, "own"), (REFERENCE, "own")),
            ):
                d = paired(results, dataset, k, a, b)
                if d is not None:
                    rows.append(f"| {config} vs {REFERENCE} | {what} | {d} | {d.verdict()} |")
        for rule in RULES[1:]:
            d = paired(results, dataset, k, (REFERENCE, rule), (REFERENCE, "topk"))
            if d is not None:
                rows.append(f"| {REFERENCE}: {rule} vs topk | the rule (one SAE) | {d} | {d.verdict()} |")
        if rows:
            lines += [
                "| comparison | what differs | FVU difference, 95 % interval | verdict |",
                "|---|---|---|---|",
                *rows,
                "",
            ]
    return lines


COLOURS = {
    "topk+aux_k": "tab:blue",
    "mc+aux_k": "tab:orange",
    "mc+aux_zipf": "tab:red",
    "fc_zipf": "tab:olive",
    "fc_demand": "tab:green",
    "jumprelu": "tab:purple",
    "matryoshka_topk": "tab:cyan",
    "matryoshka_mc": "tab:brown",
}
MARKERS = {"jumprelu": "s", "matryoshka_topk": "D", "matryoshka_mc": "D"}  # the new variants stand out


def plot(agg: dict, sweeps: dict, dataset: str, path: Path) -> None:
    """Left: the headline, FVU at L0 = k against k (mean ± std over seeds). Right: each run's
    threshold-mode sweep around L0 = k (thin lines), FVU against the L0 it gives."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for config, by_k in agg[dataset].items():
        ks = sorted(by_k)
        colour = COLOURS.get(config)
        y = [by_k[k][HEADLINE][0] for k in ks]
        e = [by_k[k][HEADLINE][1] for k in ks]
        axes[0].errorbar(ks, y, yerr=e, marker=MARKERS.get(config, "o"), capsize=3, label=config, color=colour)
        yb = [by_k[k]["FVU batch"][0] for k in ks]
        axes[0].plot(ks, yb, marker="x", linestyle=":", color=colour, alpha=0.6)
        for i, points in enumerate(sweeps.get((dataset, config), [])):
            axes[1].plot(
                [p["l0"] for p in points],
                [p["fvu"] for p in points],
                color=colour,
                alpha=0.5,
                lw=1,
                label=config if i == 0 else None,
            )
        if config == "topk+aux_k":
            axes[1].plot(ks, [by_k[k]["FVU at L0 = k, validation"][0] for k in ks], "o", color=colour, label=config)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("FVU (o: test split; x: validation)")
    axes[1].set_ylabel("FVU (validation)")
    axes[0].set_xlabel("k (L0 = k)")
    axes[0].set_title("FVU at L0 = k, own rule (o); batch mode (x, dotted)", fontsize=9)
    axes[1].set_xlabel("mean L0 in threshold mode (validation)")
    axes[1].set_title("each run's thresholds scaled around L0 = k", fontsize=9)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{dataset}: FVU against L0, mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def core_table(results: dict, dataset: str) -> list[str]:
    """SAEBench's core figures and the description length at k = CORE_K, threshold mode, one
    row per configuration (mean ± std over seeds); empty when no run there has them."""
    by_config: dict[str, list[dict]] = {}
    for (d, config, k, _seed), m in results.items():
        if m is not None and d == dataset and k == CORE_K and "val/threshold/cossim" in m:
            by_config.setdefault(config, []).append(m)
    if not by_config:
        return []
    pct = ("alive",)
    digits = {"density mean": "e", "density median": "e", "precision Δ": 3}
    lines = [
        f"Core figures at k = {CORE_K}, threshold mode, on the validation tokens (SAEBench's `core` "
        "evaluation; the description length in bits per token as docs/method_choices.md defines it, "
        "at the coarsest precision Δ that keeps FVU within 1 %; Δ in model units):",
        "",
        "| config | " + " | ".join(CORE) + " | seeds |",
        "|---|" + "---|" * (len(CORE) + 1),
    ]
    for config in [c for c in CONFIGS if c in by_config]:
        ms = by_config[config]
        cells = []
        for name, key in CORE.items():
            mean, std, n = mean_std([m.get(key) for m in ms])
            if n == 0:
                cells.append("–")
            elif name in pct:
                cells.append(f"{100 * mean:.1f} ± {100 * std:.1f} %")
            elif digits.get(name) == "e":
                cells.append(f"{mean:.2e}")
            elif name.startswith(("DL", "naive", "raw")):
                cells.append(f"{mean:.1f} ± {std:.1f}")
            else:
                cells.append(f"{mean:.{digits.get(name, 4)}f} ± {std:.{digits.get(name, 4)}f}")
        lines.append(f"| {config} | " + " | ".join(cells) + f" | {len(ms)} |")
    return [*lines, ""]


def code_versions(results: dict) -> dict[str, list[str]]:
    """{the code a run was made with (provenance.describe): the runs}, every session of a resumed
    run counted; a run from before runs recorded it is 'an unknown commit'."""
    from sae_lightning.provenance import describe

    found: dict[str, list[str]] = {}
    for key, m in results.items():
        if m is None:
            continue
        for version in m.get("code_versions") or [m.get("code")]:
            found.setdefault(describe(version), []).append(" ".join(map(str, key)))
    return found


def one_code_version(results: dict, mixed_ok: bool) -> str:
    """The code the page measured, in words; one error: line and exit 2 if the runs came from
    more than one (a commit, or uncommitted changes, apart) unless ``mixed_ok``."""
    found = code_versions(results)
    if len(found) > 1 and not mixed_ok:
        shown = "; ".join(f"{v}: {len(runs)} run(s), e.g. {runs[0]}" for v, runs in sorted(found.items()))
        from sae_lightning.cli import fail

        fail(
            f"error: the runs come from {len(found)} code versions ({shown}); a page measures one: re-run the "
            "others at one commit (delete their folders under --out), or pass --mixed-commits to aggregate anyway",
            2,
        )
    return " and ".join(sorted(found)) or "no runs yet"


def report(results: dict, args, doc: Path, img_dir: Path) -> str:
    code = one_code_version(results, getattr(args, "mixed_commits", False))
    agg = aggregate(results)
    sweeps: dict = {}
    for (dataset, config, _k, _seed), m in results.items():
        if m and m.get("val/threshold/l0_sweep"):
            sweeps.setdefault((dataset, config), []).append(m["val/threshold/l0_sweep"])
    runs = sum(1 for m in results.values() if m is not None)
    lines = [
        "# Results: the paper's claims, measured",
        "",
        f"Made by `python -m benchmarks.claims` ({args.steps} steps of 1024 tokens = "
        f"{args.steps * 1024 / 1e6:.2f}M training tokens per run, F = 4096, training seeds "
        f"{', '.join(map(str, args.seeds))}, every other setting the default (selection in the dtype "
        "`model.affinity_dtype=auto` picks: bf16 re-scored to fp32's selection on a CPU with a bf16 product); "
        "each seed draws the initialisation and "
        f"the training order, `data.order_seed` = the seed, runs made before that had seed 0's order); {runs} of "
        f"the grid's {len(results)} runs are in, made by {code}. Each cell is mean ± "
        "std over the seeds "
        "that ran (the last column counts them; a cell with fewer than 3 is not final).",
        "",
        "**The headline is FVU at L0 = k on the test split**, read as a user deploys the SAE: each token on its "
        "own, by the rule its allocator implies (TopK: k per token; Mutual Choice: one threshold; Feature "
        "Choice: a threshold per latent), the thresholds calibrated on held-out tokens after training and scaled "
        "by one factor so that the mean L0 on those calibration tokens is exactly k; the FVU is then interpolated "
        "to L0 = k exactly from a sweep of that factor on the test tokens (rules.py). Training, calibration, "
        "validation and test tokens are disjoint: checkpoints and defaults choose on validation, the headline "
        "is measured on test. *L0 threshold* is the test L0 of the calibrated factor. *DL at L0 = k* is the "
        "description length of the own rule's codes at the factor that gives L0 = k on the test tokens. "
        "*FVU batch* allocates each validation batch of 1024 tokens as in training (it shares the budget "
        "across the batch: not causal). Differences between configurations are paired by seed, in %, with a "
        "95 % interval from a bootstrap over seeds and test contexts (paired.py); a target is met when the "
        "interval lies wholly on its side. Dead = not fired in the last 200k training "
        "tokens; under-used = dead, or firing at under 0.25 × the run's own fitted density curve at its "
        "rank (docs/method_choices.md). ΔCE: SmolLM2's next-token loss with the SAE spliced in, minus the "
        "clean loss, on the last 128 contexts of the test split; *ΔCE at L0 = k* and *KL at L0 = k* read "
        "each token by the own rule with its thresholds scaled so that the mean L0 on the spliced tokens is k "
        "(TopK: k per token), *ΔCE batch* allocates as in training."
        + (f" Extra overrides for every run: `{' '.join(args.overrides)}`." if args.overrides else ""),
        "",
    ]
    claims = check_claims(agg, results)
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
    lines += summary_table(results)
    found = facts(agg)
    if found:
        lines += ["Facts that hold by construction (not targets):", "", *found, ""]
    for dataset in [d for d in DATASETS if d in agg]:
        lines += [
            f"## {DATASETS[dataset]['title']}",
            "",
            f"![FVU against L0]({os.path.relpath(img_dir, doc.parent)}/results_{dataset}.png)",
            "",
        ]
        names = [n for n in KEYS if ONLY_ON.get(n, dataset) == dataset]
        lines += ["| config | k | " + " | ".join(names) + " | seeds |", "|---|---|" + "---|" * (len(names) + 1)]
        for config in [c for c in CONFIGS if c in agg[dataset]]:
            for k, figs in agg[dataset][config].items():
                cells = [
                    fmt(figs[n], pct=n in ("dead", "under-used"), digits=DIGITS.get(n.split()[0], 4)) for n in names
                ]
                lines.append(f"| {config} | {k} | " + " | ".join(cells) + f" | {figs[HEADLINE][2]} |")
        lines.append("")
        lines += rules_table(results, dataset)
        from benchmarks import rule_spread  # (it imports this module's grid)

        lines += rule_spread.table(rule_spread.RECORDS, dataset)
        lines += dl_matched_table(results, agg, dataset)
        lines += core_table(results, dataset)
        plot(agg, sweeps, dataset, img_dir / f"results_{dataset}.png")
    lines += ["## The configurations", "", "| name | overrides |", "|---|---|"]
    lines += [f"| {c} | `{' '.join(o)}` |" for c, o in CONFIGS.items()]
    lines += [
        "",
        "Gradient-aware ranking (g-SAE) of these configurations on SmolLM2 is measured on its own page: "
        "[gradient_ranking.md](gradient_ranking.md) (`python -m benchmarks.gradient_ranking`).",
        "",
    ]
    if (doc.parent / "long_runs.md").is_file():
        lines += [
            "Whether these 1M-token conclusions hold at 10-20M training tokens (TopK, MC and FC at k = 32 on "
            "MiniLM and SmolLM2): [long_runs.md](long_runs.md) (`python -m benchmarks.long`).",
            "",
        ]
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
    p.add_argument(
        "--records", type=Path, default=RECORDS, help="where each finished run's metrics are kept (committed)"
    )
    p.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--img-dir", type=Path, default=ROOT / "docs" / "img")
    p.add_argument("--report", action="store_true", help="only rewrite the page from the runs there are")
    p.add_argument(
        "--mixed-commits",
        action="store_true",
        help="aggregate runs made by different code versions (refused otherwise)",
    )
    p.add_argument("overrides", nargs="*", help="extra train.py overrides for every run")
    args = p.parse_args(argv)
    extra = [f"trainer.max_steps={args.steps}", *args.overrides]
    # seed by seed: every cell gets its first seed before any gets its second
    grid = [
        (d, c, k, s)
        for s in args.seeds
        for d in args.datasets
        for k in args.k
        for c in args.configs
        if k in ONLY_K.get(c, (k,)) and c in DATASETS[d].get("configs", (c,)) and k in DATASETS[d].get("k", (k,))
    ]
    results: dict = {}
    if not args.report:
        for d in args.datasets:
            harvest(d, args.cache_dir)
        start, finished, trained = time.time(), 0, 0

        def one(key):
            nonlocal finished, trained
            dataset, config, k, seed = key
            threads = 1 if args.jobs > 1 else os.cpu_count() or 1
            t = time.time()
            m = run_one(args.out, dataset, config, k, seed, extra, args.cache_dir, threads, args.records)
            finished += 1
            trained += time.time() - t > 60  # runs found finished take no time: not in the rate
            # wall time per trained run, over the runs left (each job trains one at a time)
            eta = (time.time() - start) / max(trained, 1) * (len(grid) - finished)
            print(
                f"[{finished}/{len(grid)}] {' '.join(map(str, key))}: "
                + (
                    f"FVU at L0 = k (test) {m.get('test/fvu_at_k', float('nan')):.4f}, "
                    f"dead {100 * m['val/dead_fraction']:.1f} %"
                    if m
                    else "failed"
                )
                + f"; about {eta / 60:.0f} min left",
                flush=True,
            )
            return key, m

        with ThreadPoolExecutor(args.jobs) as ex:
            results = dict(ex.map(one, grid))
    else:
        for key in grid:
            run = finished_run(args.out, *key)
            if run is not None:
                results[key] = with_description_length(run, json.loads((run / "metrics.json").read_text()))
            else:
                results[key] = recorded(args.records, *key)
    args.out.mkdir(parents=True, exist_ok=True)  # --report on a fresh clone: the records alone
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
