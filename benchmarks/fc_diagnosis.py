"""Why Feature Choice loses to TopK on MiniLM: ``python -m benchmarks.fc_diagnosis``.

Trains (as the claims grid does, resumable: ``benchmarks.claims.run_one``) TopK + aux_k and FC
with demand capacities at k = 32 on MiniLM L3 and, for contrast, on SmolLM2 L9 where FC wins,
then reads both SAEs on the validation tokens, FC by its own rule (per-latent thresholds scaled
so that L0 = k on those tokens), and measures:

- tokens: FC's per-token L0 (its spread, and how it follows the token's difficulty: TopK's
  per-token error), where FC's error exceeds TopK's by FC's L0, and the spread of the tokens'
  norms (what an adaptive allocation has to work with);
- latents: each latent's capacity in training (E[m_j]/B), its demand (the share of tokens
  above the Mutual Choice cutoff, the EMA that sets the capacities) and its firing rate at
  inference; the calibrated thresholds against the training cutoffs (θ_EMA).

Writes ``docs/img/fc_diagnosis_<dataset>.png`` and ``benchmarks/records/fc_diagnosis/<dataset>.json``
(committed) and prints the figures (docs/method_choices.md quotes them). ``--try NAME=OVERRIDES`` trains FC
variants beside it (same seeds) and compares their validation headline with TopK's and FC's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.claims import run_one
from sae_lightning.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
CACHES = {"minilm": "minilm_l3_pydocs", "smollm2": "smollm2_l9_pydocs"}


def _run_dir(out: Path, dataset: str, config: str, k: int, seed: int) -> Path:
    runs = sorted((out / dataset / config / f"k{k}_s{seed}" / "runs").glob("*/metrics.json"))
    return runs[-1].parent


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def per_token(module, rule: str, cal: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L0, squared error) of every token of ``x`` read by ``rule``, at L0 = k on ``x``."""
    from sae_lightning.allocators.base import l0_matching_scale
    from sae_lightning.rules import reader

    rd = reader(module, rule, cal)
    factor = 1.0 if rd.theta is None else l0_matching_scale(module._calibration_set(x), rd.theta, rd.k)
    encode = rd.encode(module, factor)
    l0s, errs = [], []
    for chunk in x.split(module.batch_size):
        code, ctx = encode(chunk)
        x_hat = module.sae.denormalise(module.sae.decode(code), ctx)
        errs.append((chunk.double() - x_hat.double().cpu()).pow(2).sum(1))
        l0s.append(code.l0_per_token().cpu())
    return torch.cat(l0s).double(), torch.cat(errs)


@torch.no_grad()
def diagnose(topk_run: Path, fc_run: Path) -> dict[str, Any]:
    from sae_lightning.rules import own_rule
    from sae_lightning.runs import load_run

    topk, data = load_run(topk_run)
    fc, _ = load_run(fc_run)
    source = data.build()
    source.open()
    x, cal = source.val_tensor(), source.calibration_tokens()
    k = topk.k
    _, e_topk = per_token(topk, "topk", cal, x)
    l0_fc, e_fc = per_token(fc, own_rule(fc), cal, x)
    total = float((x.double() - x.double().mean(0)).pow(2).sum())
    norms = x.double().norm(dim=1)
    # where FC loses: its excess error by its per-token L0 bucket, as a share of the total variance
    edges = [0, k // 4, k // 2, 3 * k // 4, k, 5 * k // 4, 3 * k // 2, 2 * k, 4 * k, 10**9]
    buckets = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (l0_fc >= lo) & (l0_fc < hi)
        if m.any():
            buckets.append(
                {
                    "l0_range": [lo, hi],
                    "tokens": float(m.double().mean()),
                    "fvu_excess": float((e_fc[m] - e_topk[m]).sum()) / total,
                    "topk_rel_error": float((e_topk[m] / norms[m].pow(2)).mean()),
                }
            )
    # FC's L0 against the token's difficulty (TopK's relative error), by decile of the latter
    rel = e_topk / norms.pow(2).clamp_min(1e-30)
    order = rel.argsort()
    deciles = [float(l0_fc[chunk].mean()) for chunk in order.chunk(10)]
    from sae_lightning.allocators.feature_choice import FeatureChoice

    alloc = fc.allocator
    assert isinstance(alloc, FeatureChoice), type(alloc)
    n = int(alloc.allocation_batch)
    capacity = alloc.expected_capacities(n).double().cpu() / n
    demand = alloc.demand.double().cpu()
    counts = torch.zeros(fc.sae.n_latents, dtype=torch.float64)
    from sae_lightning.rules import reader

    rd = reader(fc, own_rule(fc), cal)
    encode = rd.encode(fc, 1.0)
    for chunk in x.split(fc.batch_size):
        counts += encode(chunk)[0].fire_counts().double().cpu()
    rate = counts / x.shape[0]
    theta_cal = alloc.current_theta("calibrated").double().cpu()
    theta_ema = alloc.theta_ema.double().cpu()
    finite = torch.isfinite(theta_cal) & (theta_ema > 0)
    ratio = theta_cal[finite] / theta_ema[finite] if bool(finite.any()) else torch.full((1,), float("nan"))
    return {
        "k": k,
        "tokens": int(x.shape[0]),
        "fvu_topk": float(e_topk.sum()) / total,
        "fvu_fc": float(e_fc.sum()) / total,
        "norm_cv": float(norms.std() / norms.mean()),
        "fc_l0": {
            "mean": float(l0_fc.mean()),
            "std": float(l0_fc.std()),
            "below_half_k": float((l0_fc < k / 2).double().mean()),
            "above_2k": float((l0_fc > 2 * k).double().mean()),
            "zero": float((l0_fc == 0).double().mean()),
        },
        "spearman_fc_l0_vs_topk_rel_error": _spearman(l0_fc, rel),
        "spearman_fc_l0_vs_norm": _spearman(l0_fc, norms),
        "fc_l0_by_topk_error_decile": deciles,
        "buckets": buckets,
        "latents": {
            "capacity_rate_cv": float(capacity.std() / capacity.mean()),
            "spearman_capacity_vs_rate": _spearman(capacity, rate),
            "median_rate_over_capacity": float((rate / capacity.clamp_min(1e-12)).median()),
            "theta_cal_over_ema_median": float(ratio.median()),
            "theta_cal_over_ema_iqr": [float(ratio.quantile(q)) for q in (0.25, 0.75)],
        },
        "_arrays": {
            "l0_fc": l0_fc,
            "rel": rel,
            "capacity": capacity,
            "demand": demand,
            "rate": rate,
            "theta_cal": theta_cal,
            "theta_ema": theta_ema,
        },
    }


def figure(dataset: str, d: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, k = d["_arrays"], d["k"]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    ax = axes[0]
    ax.hist(a["l0_fc"].numpy(), bins=60, color="tab:green", alpha=0.8)
    ax.axvline(k, color="k", ls="--", lw=1)
    ax.set(xlabel="FC latents per token (L0)", ylabel="tokens", title=f"{dataset}: FC per-token L0 (TopK: {k})")
    ax = axes[1]
    ax.plot(range(1, 11), d["fc_l0_by_topk_error_decile"], "o-", color="tab:green")
    ax.axhline(k, color="k", ls="--", lw=1)
    ax.set(
        xlabel="decile of TopK's relative error (1 = easiest)", ylabel="FC mean L0", title="does FC follow difficulty?"
    )
    ax = axes[2]
    cap, rate, dem = a["capacity"].numpy(), a["rate"].numpy(), a["demand"].numpy()
    ax.loglog(cap, rate, ".", ms=2, alpha=0.5, label="inference rate (val)")
    ax.loglog(cap, dem, ".", ms=2, alpha=0.5, label="demand (EMA)")
    lim = [max(1e-6, cap.min()), cap.max()]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlabel="capacity in training, E[m_j]/B", ylabel="rate", title="per latent")
    ax.legend(markerscale=5)
    ax = axes[3]
    fin = torch.isfinite(a["theta_cal"]) & (a["theta_ema"] > 0)
    ax.loglog(a["theta_ema"][fin].numpy(), a["theta_cal"][fin].numpy(), ".", ms=2, alpha=0.5)
    t = a["theta_ema"][fin]
    ax.plot([float(t.min()), float(t.max())], [float(t.min()), float(t.max())], "k--", lw=1)
    ax.set(xlabel="θ_EMA (training cutoffs)", ylabel="θ calibrated (inference)", title="thresholds")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", choices=list(CACHES), default=list(CACHES))
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "outputs" / "cache")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "fc_diagnosis")
    p.add_argument(
        "--try",
        dest="tries",
        nargs="*",
        default=[],
        help="FC variants to train beside: NAME=OVERRIDE[,OVERRIDE...] (e.g. floor4=variant.demand_floor=4)",
    )
    a = p.parse_args(argv)
    from benchmarks.claims import CONFIGS

    extra_configs = {}
    for t in a.tries:
        name, _, overrides = t.partition("=")
        extra_configs[f"fc_{name}"] = [*CONFIGS["fc_demand"], *overrides.split(",")]
    CONFIGS.update(extra_configs)
    results: dict[str, Any] = {}
    for dataset in a.datasets:
        headline: dict[str, list[float]] = {}
        for seed in a.seeds:
            for config in ["topk+aux_k", "fc_demand", *extra_configs]:
                m = run_one(a.out, dataset, config, a.k, seed, [f"trainer.max_steps={a.steps}"], a.cache_dir, a.threads)
                if m is None:
                    raise SystemExit(f"error: training {dataset} {config} seed {seed} failed (see its train.log)")
                headline.setdefault(config, []).append(m["val/threshold/fvu_at_k"])
        d = diagnose(
            _run_dir(a.out, dataset, "topk+aux_k", a.k, a.seeds[0]),
            _run_dir(a.out, dataset, "fc_demand", a.k, a.seeds[0]),
        )
        figure(dataset, d, ROOT / "docs" / "img" / f"fc_diagnosis_{dataset}.png")
        d.pop("_arrays")
        d["validation_headline"] = {c: sum(v) / len(v) for c, v in headline.items()}
        d["validation_headline_per_seed"] = headline
        from sae_lightning.provenance import code_version

        d["code"] = code_version()
        results[dataset] = d
        record = ROOT / "benchmarks" / "records" / "fc_diagnosis" / f"{dataset}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(record, d, indent=1)
        print(json.dumps({dataset: d}, indent=1), flush=True)
    return results


if __name__ == "__main__":
    main()
