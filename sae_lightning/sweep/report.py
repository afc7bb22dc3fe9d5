"""Report a finished or running study: ``python -m sae_lightning.sweep.report --study NAME``.

Writes, under ``<out_dir>/sweeps/<study>/``: ``trials.csv`` (every trial: state, params,
objectives, failure or pruning reason, run folder and TensorBoard folder), ``pareto.csv``
and ``pareto.json`` (the front over all variants) and ``pareto.png`` (FVU against L0, one
colour per variant, the overall front drawn through its points and each variant's own
front dashed). ``optuna-dashboard <storage>`` opens the same storage.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import optuna

from ..atomic import atomic_path, atomic_write_json
from .pareto import pareto_front
from .study import default_storage, masked

COLOURS = {
    "topk": "tab:blue",
    "mutual_choice": "tab:orange",
    "feature_choice": "tab:green",
    "jumprelu": "tab:red",
    "matryoshka_mutual_choice": "tab:purple",
    "matryoshka_topk": "tab:brown",
}
SPARE = ("tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def variant_colours(variants: list[str]) -> dict[str, str]:
    """A distinct colour per variant: the fixed ones above, then spare ones (then repeats) for
    variants without one (matplotlib's own cycle would reuse the fixed colours)."""
    spare = [c for c in SPARE if c not in COLOURS.values()]
    out, i = {}, 0
    for v in sorted(variants):
        if v in COLOURS:
            out[v] = COLOURS[v]
        else:
            out[v] = spare[i % len(spare)]
            i += 1
    return out


def _reason(t: optuna.trial.FrozenTrial, retried_as: dict[int, int]) -> str:
    """Why a trial failed or was pruned. The sweeper records a reason on every trial it ends;
    a failed one without is a trial whose worker died (its heartbeat stopped and another worker
    failed it then) or one a racing worker gave back."""
    if "reason" in t.user_attrs or t.state != optuna.trial.TrialState.FAIL:
        return t.user_attrs.get("reason", "")
    if t.user_attrs.get("over_budget"):
        return "not run: another worker had taken the study's last trial"
    when = f" (found at {t.datetime_complete:%Y-%m-%d %H:%M:%S})" if t.datetime_complete else ""
    then = f"; retried as trial {retried_as[t.number]}" if t.number in retried_as else "; not retried (max_retries)"
    return f"its worker died: the trial's heartbeat stopped{when}{then}"


def trial_rows(study: optuna.Study) -> list[dict]:
    rows = []
    trials = study.get_trials(deepcopy=False)
    retried_as = {n: t.number for t in trials for n in t.system_attrs.get("retry_history", [])[-1:]}
    for t in trials:
        run_dir = t.user_attrs.get("run_dir")
        row = {
            "trial": t.number,
            "state": t.state.name.lower(),
            "variant": t.params.get("variant") or _override(t, "variant") or "?",
            "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
        }
        names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
        for i, name in enumerate(names):
            row[name] = t.values[i] if t.values else None
        row.update({f"param:{k}": v for k, v in t.params.items()})
        row["reason"] = _reason(t, retried_as)
        row["run_dir"] = run_dir or ""
        row["tensorboard"] = str(Path(run_dir) / "tb") if run_dir else ""
        rows.append(row)
    return rows


def _override(t, key: str):
    for ov in t.user_attrs.get("overrides", []):
        if ov.startswith(f"{key}="):
            return ov.split("=", 1)[1]
    return None


def write_csv(path: Path, rows: list[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def plot(path: Path, rows: list[dict], front: list[dict], x_key: str, y_key: str, directions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    done = [r for r in rows if r["state"] == "complete"]
    colours = variant_colours(sorted({r["variant"] for r in done}))
    for variant in sorted(colours):
        pts = [r for r in done if r["variant"] == variant]
        colour = colours[variant]
        ax.scatter(
            [r[x_key] for r in pts],
            [r[y_key] for r in pts],
            s=22,
            alpha=0.8,
            color=colour,
            label=f"{variant} ({len(pts)})",
        )
        own = [pts[i] for i in pareto_front([(r[y_key], r[x_key]) for r in pts], directions)]
        own.sort(key=lambda r: r[x_key])
        ax.plot([r[x_key] for r in own], [r[y_key] for r in own], "--", color=colour, linewidth=1, alpha=0.7)
    front = sorted(front, key=lambda r: r[x_key])
    ax.plot(
        [r[x_key] for r in front],
        [r[y_key] for r in front],
        "-",
        color="black",
        linewidth=1.5,
        label="Pareto front (all)",
        zorder=0,
    )
    for r in front:
        ax.annotate(str(r["trial"]), (r[x_key], r[y_key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel(f"{x_key} ({'bits per token' if 'description_length' in x_key else 'sparsity'})")
    ax.set_ylabel(f"{y_key} (reconstruction)")
    ax.set_title(f"{len(done)} complete trials; front of {len(front)}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def report(study_name: str, storage: str | None = None, out_dir: str = "outputs") -> dict:
    storage = storage or default_storage(out_dir, study_name)
    study = optuna.load_study(study_name=study_name, storage=storage)
    names = study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]
    directions = [d.name.lower() for d in study.directions]
    rows = trial_rows(study)
    done = [r for r in rows if r["state"] == "complete"]
    front = [done[i] for i in pareto_front([[r[n] for n in names] for r in done], directions)]
    folder = Path(out_dir) / "sweeps" / study_name
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "trials.csv", rows)
    write_csv(folder / "pareto.csv", front)
    summary = {
        "study": study_name,
        "storage": masked(storage),
        "objectives": names,
        "directions": directions,
        "states": {s: sum(r["state"] == s for r in rows) for s in sorted({r["state"] for r in rows})},
        "pareto_front": front,
    }
    atomic_write_json(folder / "pareto.json", summary)
    if len(names) >= 2 and done:
        # x: sparsity (second objective), y: reconstruction (first)
        plot(folder / "pareto.png", rows, front, names[1], names[0], [directions[0], directions[1]])
    return {"folder": str(folder), **summary}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Pareto front of an Optuna study (CSV, JSON, PNG)")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default: sqlite under <out-dir>/sweeps/)")
    p.add_argument("--out-dir", default="outputs")
    a = p.parse_args(argv)
    try:
        out = report(a.study, a.storage, a.out_dir)
    except KeyError:
        raise SystemExit(
            f"error: no study named {a.study!r} in {masked(a.storage or default_storage(a.out_dir, a.study))}"
        ) from None
    names = out["objectives"]
    print(f"study {out['study']}: " + ", ".join(f"{k} {v}" for k, v in out["states"].items()))
    print(f"Pareto front ({len(out['pareto_front'])} trials):")
    widths = [max(12, len(n)) for n in names]
    print(f"  {'trial':>5}  {'variant':<15}" + "".join(f"  {n:>{w}}" for n, w in zip(names, widths)) + "  run")
    for r in out["pareto_front"]:
        cells = "".join(f"  {r[n]:>{w}.4f}" for n, w in zip(names, widths))
        print(f"  {r['trial']:>5}  {r['variant']:<15}{cells}  {r['run_dir']}")
    print(f"written {out['folder']}/trials.csv, pareto.csv, pareto.json" + (", pareto.png" if len(names) >= 2 else ""))


if __name__ == "__main__":
    main()
