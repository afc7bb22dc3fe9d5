"""Long runs: ``python -m benchmarks.long`` (docs/long_runs.md).

TopK + aux_k, Mutual Choice (its default losses) and Feature Choice (demand capacities) at
k = 32, F = 8192, B = 4096, trained 20M tokens on MiniLM L3 and 10M on SmolLM2 L9, both on the
Debian documentation corpus (``data=minilm_docs``, ``smollm2_docs``; docs/data.md), 2 seeds
each. The thresholds are calibrated before every validation (``calibration.every_validation``)
and a validation runs every ~1M tokens, so each run gives a learning curve of the headline
(FVU at L0 = k, threshold mode, validation split) with its dead and under-used latents; the
final figures are the test split's (and ΔCE at L0 = k on SmolLM2).

Resumable like the claims grid: a finished run is kept, a stopped one resumes from its
checkpoint; each finished run's curve and final figures are recorded (committed) under
``benchmarks/records/long/``, from which ``--report`` rebuilds the page, so the grid can run
in parts across sessions. ``--datasets`` / ``--configs`` / ``--seeds`` pick a part.

    python -m sae_lightning.debian_docs && python harvest.py data=minilm_docs && python harvest.py data=smollm2_docs
    python -m benchmarks.long                 # every run (hours on 2 cores; resumable), then the page
    python -m benchmarks.long --report        # the page from the records
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks import claims, run_state, train_in_subprocess
from benchmarks.claims import REFERENCE, WORD
from sae_lightning.atomic import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records" / "long"
BATCH = 4096
VAL_EVERY_TOKENS = 1_000_000
DATASETS: dict[str, dict[str, Any]] = {
    "minilm_docs": {
        "args": ["data=minilm_docs"],
        "cache": "minilm_l3_debian_docs",
        "tokens": 20_000_000,
        "title": "MiniLM L3 (d = 384), Debian documentation corpus",
    },
    "smollm2_docs": {
        "args": ["data=smollm2_docs", "data.downstream.during_training=false"],
        "cache": "smollm2_l9_debian_docs",
        "tokens": 10_000_000,
        "title": "SmolLM2-135M L9 (d = 576), Debian documentation corpus",
    },
}
CONFIGS = {
    "topk+aux_k": claims.CONFIGS["topk+aux_k"],
    "mc": ["variant=mutual_choice"],
    "fc_demand": claims.CONFIGS["fc_demand"],
}
COMMON = [
    "variant.k=32",
    "model.n_latents=8192",
    "calibration.every_validation=true",
    "progress=none",
]
SEEDS = (0, 1)
# what the tree held beyond the commit, for records whose code says dirty (checked by hand at the time)
DIRTY_NOTES = {
    "minilm_docs": "The changes: this page and its plot, untracked, which the SmolLM2 runs' command had "
    "written into the worktree pinned at the commit; `git status --porcelain --untracked-files=all` "
    "there listed nothing else (a run reads its tree once, at its first checkpoint). They were removed "
    "before the Feature Choice runs started.",
}
# what a record keeps of each validation (TensorBoard tag -> name)
CURVE_TAGS = {
    "val/threshold/fvu_at_k": "fvu_at_k",
    "val/batch/fvu": "batch_fvu",
    "val/dead_fraction": "dead",
    "val/underused_fraction": "underused",
}
FINAL_KEYS = ("test/fvu_at_k", "val/threshold/fvu_at_k", "val/dead_fraction", "val/underused_fraction",
              "test/delta_ce_at_k", "test/kl_div_at_k", "tokens_per_second", "train_seconds")  # fmt: skip


def steps_of(dataset: str) -> tuple[int, int]:
    """(training steps, steps between validations) for a dataset's token budget."""
    steps = -(-DATASETS[dataset]["tokens"] // BATCH)
    return steps, max(1, round(VAL_EVERY_TOKENS / BATCH))


def curve_of(run: Path) -> list[dict[str, float]]:
    """Every validation of a finished run, from its TensorBoard events: step, tokens, and the
    CURVE_TAGS figures logged there."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, dict[str, float]] = {}
    for events in sorted({p.parent for p in run.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag, name in CURVE_TAGS.items():
            if tag in acc.Tags()["scalars"]:
                for e in acc.Scalars(tag):
                    points.setdefault(e.step, {})[name] = float(e.value)
    # Lightning logs a validation inside training at the step before its global step (7 for the
    # 8th step); the one after training at max_steps itself, which repeats the last point
    last = max(points, default=0)
    if last - 1 in points:
        points.pop(last)
    return [{"step": s + 1, "tokens": (s + 1) * BATCH, **points[s]} for s in sorted(points)]


def own_rule_sums(run: Path) -> dict | None:
    """The run's own rule's per-context sums on the test split (its rules_test.json; paired.py),
    from which the page's end-of-run differences get their bootstrap intervals; None without."""
    path = run / "rules_test.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    own = saved["own_rule"]
    return {"rule": own, "k": saved["k"], "sums": saved["rules"][own]["sums"]}


def record_path(records: Path, dataset: str, config: str, seed: int) -> Path:
    return records / dataset / f"{config.replace('+', '_')}_s{seed}.json"


def run_one(out: Path, records: Path, dataset: str, config: str, seed: int, threads: int) -> dict | None:
    record = record_path(records, dataset, config, seed)
    if record.is_file():
        return json.loads(record.read_text())
    folder = out / dataset / config / f"s{seed}"
    done, stopped = run_state(folder)
    if done is None:
        steps, every = steps_of(dataset)
        args = [
            *DATASETS[dataset]["args"],
            *CONFIGS[config],
            *COMMON,
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={every}",
            f"data.batch_size={BATCH}",
            f"seed={seed}",
            f"out_dir={folder}",
        ]
        if "cache" in DATASETS[dataset]:  # the cache where harvest.py data=<dataset> put it
            args.append(f"data.path={ROOT / 'outputs' / 'cache' / DATASETS[dataset]['cache']}")
        if stopped is not None:
            args = [f"resume={stopped}", "progress=none"]
        if not train_in_subprocess(args, folder, threads, f"{dataset} {config} seed={seed}"):
            return None
        done, _ = run_state(folder)
        assert done is not None
    metrics = json.loads((done / "metrics.json").read_text())
    from sae_lightning.provenance import code_version

    result = {
        "dataset": dataset,
        "config": config,
        "seed": seed,
        "code": metrics.get("code", code_version()),
        "affinity_dtype": metrics.get("affinity_dtype"),
        "curve": curve_of(done),
        "final": {k: metrics[k] for k in FINAL_KEYS if k in metrics},
        "test_sums": own_rule_sums(done),
        "run": str(done.relative_to(ROOT)) if done.is_relative_to(ROOT) else str(done),
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, result, indent=None)  # compact: the per-context test sums are long
    return result


# ---- the page --------------------------------------------------------------------------------
def _mean_sd(values: list[float], pct: bool = False) -> str:
    """Mean ± std over seeds: 4 decimals, or with ``pct`` a fraction in % with 2."""
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    if pct:
        return f"{100 * statistics.mean(values):.2f} ± {100 * sd:.2f} %"
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def at_tokens(curve: list[dict[str, float]], tokens: float, key: str = "fvu_at_k") -> float | None:
    """The curve's figure at the validation nearest ``tokens``."""
    points = [p for p in curve if key in p]
    if not points:
        return None
    return min(points, key=lambda p: abs(p["tokens"] - tokens))[key]


def paired(records: dict[tuple[str, int], dict], config: str, reference: str, read) -> tuple[float, float, int] | None:
    """Mean and std over seeds of 100·(config/reference − 1) of ``read(record)``, paired by seed."""
    diffs = []
    for (c, seed), rec in records.items():
        ref = records.get((reference, seed))
        if c != config or ref is None:
            continue
        a, b = read(rec), read(ref)
        if a is not None and b is not None:
            diffs.append(100 * (a / b - 1))
    if not diffs:
        return None
    return statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0, len(diffs)


# the 1M-token grid of docs/results.md (benchmarks.claims): its dataset and configuration for each
# long-run dataset and configuration (the same model and layer; Python docstrings, F = 4096)
GRID = {"minilm_docs": "minilm", "smollm2_docs": "smollm2"}
GRID_CONFIG = {"topk+aux_k": "topk+aux_k", "mc": "mc+aux_zipf", "fc_demand": "fc_demand"}
GRID_NOTE = "1.02M training tokens, F = 4096, the Python-docstring caches, 3 seeds"


def bootstrap_end(recs: dict[tuple[str, int], dict], config: str):
    """The paired difference (paired.py) of ``config`` against TopK at the end, on the test split,
    over the seeds both have with their test sums; None where none has them."""
    from sae_lightning.paired import ContextSums, paired_difference

    a: list[ContextSums] = []
    b: list[ContextSums] = []
    k = 0.0
    for (c, seed), rec in sorted(recs.items()):
        ref = recs.get((REFERENCE, seed))
        if c != config or ref is None or not rec.get("test_sums") or not ref.get("test_sums"):
            continue
        a.append(ContextSums.from_dict(rec["test_sums"]["sums"]))
        b.append(ContextSums.from_dict(ref["test_sums"]["sums"]))
        k = float(rec["test_sums"]["k"])
    return paired_difference(a, b, k) if a else None


def published(dataset: str, config: str, records: Path | None = None):
    """docs/results.md's paired difference of ``config`` against TopK at k = 32 on the same model
    and layer (benchmarks.claims' records), or None where the grid has no such runs."""
    if dataset not in GRID or config not in GRID_CONFIG:
        return None
    records = records or claims.RECORDS
    grid, k = GRID[dataset], 32
    results = {
        (grid, c, k, seed): claims.recorded(records, grid, c, k, seed)
        for c in {GRID_CONFIG[config], GRID_CONFIG[REFERENCE]}
        for seed in range(3)
    }
    return claims.paired(results, grid, k, (GRID_CONFIG[config], "own"), (GRID_CONFIG[REFERENCE], "own"))


def _word(d: tuple[float, float, int]) -> str:
    """better / worse / tie for a mean ± std over seeds: a tie when the mean is within the std."""
    m, sd, n = d
    return "tie" if abs(m) <= sd or n < 2 and abs(m) < 0.5 else ("better" if m < 0 else "worse")


def _verdict(d: tuple[float, float, int] | None) -> str:
    if d is None:
        return "—"
    return f"{d[0]:+.2f} % ± {d[1]:.2f} ({_word(d)})"


def _seconds(values: list[float]) -> str:
    """Training times: the range over seeds, whole seconds."""
    if not values:
        return "—"
    lo, hi = round(min(values)), round(max(values))
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def _change(before: str, after: str) -> str:
    """A table cell saying whether a verdict holds: "holds", or the change in bold."""
    return "holds" if before == after else f"**{before} → {after}**"


def plot(dataset: str, records: dict[tuple[str, int], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_fvu, ax_rel, ax_dead) = plt.subplots(1, 3, figsize=(15, 4))
    colours = {"topk+aux_k": "tab:blue", "mc": "tab:orange", "fc_demand": "tab:green"}
    for (config, seed), rec in sorted(records.items()):
        pts = [p for p in rec["curve"] if "fvu_at_k" in p]
        tokens = [p["tokens"] / 1e6 for p in pts]
        style = {"color": colours.get(config), "alpha": 0.9 if seed == 0 else 0.5, "lw": 1.2}
        label = config if seed == 0 else None
        ax_fvu.plot(tokens, [p["fvu_at_k"] for p in pts], label=label, **style)
        ax_dead.plot(tokens, [100 * p.get("dead", float("nan")) for p in pts], label=label, **style)
        ax_dead.plot(tokens, [100 * p.get("underused", float("nan")) for p in pts], ls="--", **style)
        ref = records.get((REFERENCE, seed))
        if config != REFERENCE and ref is not None:  # against TopK of the same seed, point by point
            theirs = {p["step"]: p["fvu_at_k"] for p in ref["curve"] if "fvu_at_k" in p}
            both = [p for p in pts if p["step"] in theirs]
            ax_rel.plot([p["tokens"] / 1e6 for p in both],
                        [100 * (p["fvu_at_k"] / theirs[p["step"]] - 1) for p in both], label=label, **style)  # fmt: skip
    ax_fvu.set(xlabel="training tokens (M)", ylabel="FVU at L0 = k (validation)", title=DATASETS[dataset]["title"])
    ax_fvu.set_yscale("log")
    ax_dead.set(xlabel="training tokens (M)", ylabel="% of latents", title="dead (solid), under-used (dashed)")
    ax_rel.axhline(0, color="tab:blue", lw=1)
    ax_rel.set(xlabel="training tokens (M)", ylabel="FVU / TopK's − 1 (%)", title="against TopK, seed by seed")
    for ax in (ax_fvu, ax_rel, ax_dead):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(records_dir: Path, page: Path) -> str:
    lines = [
        "# Long runs: do the 1M-token conclusions hold at 10-20M tokens?",
        "",
        f"k = 32, F = 8192, B = {BATCH}, every other setting the default; a validation every ~1M tokens with the thresholds "
        "calibrated first, so each curve point is the headline: FVU at L0 = k in threshold mode on the validation "
        "split (TopK: its own k per token). The columns marked test are the test split's; *training (s)* is the "
        "training loop's wall time, the range over seeds (on the threads `--threads` gave it; the test evaluation "
        "after it not counted). Measured with",
        "",
        "```bash",
        "python -m sae_lightning.debian_docs && python harvest.py data=minilm_docs && python harvest.py data=smollm2_docs",
        "python -m benchmarks.long            # resumable; records under benchmarks/records/long/, then this page",
        "```",
        "",
    ]
    any_records = False
    for dataset, spec in DATASETS.items():
        recs = {
            (r["config"], r["seed"]): r
            for r in (json.loads(p.read_text()) for p in sorted((records_dir / dataset).glob("*.json")))
        }
        lines += [f"## {spec['title']}: {spec['tokens'] / 1e6:.0f}M training tokens", ""]
        if not recs:
            lines += ["No run recorded yet.", ""]
            continue
        any_records = True
        img = page.parent / "img" / f"long_{dataset}.png"
        plot(dataset, recs, img)
        lines += [
            f"![learning curves]({img.relative_to(page.parent)})",
            "",
            "| config | seeds | FVU at L0 = k, ~1M tokens (val) | at the end (val) | at the end (test) | dead | "
            "under-used | ΔCE at L0 = k | training (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for config in CONFIGS:
            mine = [r for (c, _), r in recs.items() if c == config]
            if not mine:
                continue

            def final(key: str, mine=mine) -> list[float]:
                return [r["final"][key] for r in mine if r["final"].get(key) is not None]

            early = [v for v in (at_tokens(r["curve"], 1e6) for r in mine) if v is not None]
            dce = final("test/delta_ce_at_k")
            lines.append(
                f"| {config} | {len(mine)} | {_mean_sd(early)} | {_mean_sd(final('val/threshold/fvu_at_k'))} | "
                f"{_mean_sd(final('test/fvu_at_k'))} | {_mean_sd(final('val/dead_fraction'), pct=True)} | "
                f"{_mean_sd(final('val/underused_fraction'), pct=True)} | {_mean_sd(dce) if dce else '—'} | "
                f"{_seconds(final('train_seconds'))} |"
            )
        lines += [
            "",
            "Against TopK, paired by seed: 100·(config/TopK − 1) of FVU at L0 = k. The published column is "
            f"docs/results.md's grid at k = 32 ({GRID_NOTE}) on the same model and layer; the other columns are "
            f"these runs. ~1M tokens here is {round(VAL_EVERY_TOKENS / BATCH)} steps of {BATCH} tokens, a quarter of "
            "the grid's steps at the same tokens (B = 1024 there). "
            "At ~1M tokens and at the end on validation: mean ± std over seeds, a tie when the mean is "
            "within the seeds' std. At the end on test: the 95 % interval of a bootstrap over seeds and test "
            "contexts (paired.py), a tie when it holds 0. *With length*: whether the verdict at ~1M tokens "
            "(better, worse, tie) holds at the end (validation); *against the published*: whether the end "
            "(test) says what the grid says.",
            "",
            "| config | published (1M tokens, test) | at ~1M tokens (val) | at the end (val) | at the end (test) | "
            "with length | against the published |",
            "|---|---|---|---|---|---|---|",
        ]
        for config in CONFIGS:
            if config == REFERENCE:
                continue
            first = paired(recs, config, REFERENCE, lambda r: at_tokens(r["curve"], 1e6))
            late = paired(recs, config, REFERENCE, lambda r: r["final"].get("val/threshold/fvu_at_k"))
            test = bootstrap_end(recs, config)
            if test is None:  # records without their test sums: mean ± std
                test_text = _verdict(paired(recs, config, REFERENCE, lambda r: r["final"].get("test/fvu_at_k")))
            else:
                test_text = f"{test} ({WORD[test.verdict()]})"
            grid = published(dataset, config)
            grid_text = "—" if grid is None else f"{grid} ({WORD[grid.verdict()]})"
            length = "—" if first is None or late is None else _change(_word(first), _word(late))
            against = "—" if grid is None or test is None else _change(WORD[grid.verdict()], WORD[test.verdict()])
            lines.append(
                f"| {config} | {grid_text} | {_verdict(first)} | {_verdict(late)} | {test_text} | {length} | {against} |"
            )
        dtypes = sorted({str(r.get("affinity_dtype")) for r in recs.values()})
        lines += ["", f"Selection dtype (`model.affinity_dtype=auto`): {', '.join(dtypes)}."]
        codes = sorted({r["code"].get("commit", "?")[:12] for r in recs.values()})
        lines += ["", f"Code versions of these runs: {', '.join(codes)}."]
        dirty = [f"{c} seed {s}" for (c, s), r in sorted(recs.items()) if r["code"].get("dirty")]
        if dirty:
            lines += ["", f"Made in a tree with changes the commit does not hold: {', '.join(dirty)}."]
            lines += [DIRTY_NOTES[dataset]] if dataset in DIRTY_NOTES else []
        lines += [""]
    text = "\n".join(lines)
    if any_records:
        atomic_write_text(page, text)
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "long")
    p.add_argument("--records", type=Path, default=RECORDS)
    p.add_argument("--report", action="store_true", help="only rebuild docs/long_runs.md from the records")
    a = p.parse_args(argv)
    page = ROOT / "docs" / "long_runs.md"
    if not a.report:
        for seed in a.seeds:  # seed-major: every cell's first seed first
            for dataset in a.datasets:
                for config in a.configs:
                    print(f"{dataset} {config} seed {seed}", flush=True)
                    run_one(a.out, a.records, dataset, config, seed, a.threads)
    print(report(a.records, page))


if __name__ == "__main__":
    main()
