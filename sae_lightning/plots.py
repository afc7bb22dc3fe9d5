"""The figures of a run, from its last validation: the per-token L0 distribution of each mode,
latent density against rank with its Zipf fit, and FVU against L0 of the modes. The same
figures go to TensorBoard (images) and, at the end of a run, to PNG files in its folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .atomic import atomic_path  # noqa: E402
from .zipf import fit_zipf  # noqa: E402

FILES = {"l0_per_token": "l0_per_token.png", "density_by_rank": "density_by_rank.png", "fvu_vs_l0": "fvu_vs_l0.png"}


def l0_figure(hists: dict[str, torch.Tensor], k: int, name: str) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = 1
    for i, (mode, hist) in enumerate(hists.items()):
        h = hist.to(torch.float64)
        n = int(torch.nonzero(hist).max()) + 1 if int(hist.sum()) else 1
        top = max(top, n)
        # bin L spans [L - 0.5, L + 0.5]: a spike at L = k stands on the k line; modes that
        # coincide (TopK's) stay visible as lines of decreasing width
        ax.stairs(
            (h[:n] / h.sum().clamp_min(1)).tolist(),
            [e - 0.5 for e in range(n + 1)],
            label=str(mode),
            linewidth=2.5 - 0.8 * i,
            alpha=0.9,
        )
    ax.axvline(k, color="grey", linestyle=":", label=f"k = {k}")
    ax.set_xlim(-0.5, max(top, k + 1) + 0.5)
    ax.set_xlabel("active latents per token (L0)")
    ax.set_ylabel("share of tokens")
    ax.set_title(f"{name}: per-token L0 (validation)")
    ax.legend()
    fig.tight_layout()
    return fig


def density_figure(density: torch.Tensor, name: str) -> Figure:
    d = torch.sort(density.to(torch.float64), descending=True).values
    ranks = torch.arange(1, d.numel() + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    alive = d > 0
    ax.loglog(ranks[alive].tolist(), d[alive].tolist(), label="validation density")
    fit = fit_zipf(density)
    if fit is not None:
        alpha, beta, c, r2 = fit
        pred = torch.exp(c - alpha * torch.log(ranks.to(torch.float64) + beta))
        ax.loglog(
            ranks.tolist(),
            pred.tolist(),
            "--",
            label=f"Zipf fit: alpha={round(alpha, 2) + 0.0:.2f}, beta={beta:g}, r2={r2:.2f}",
        )
    if bool(alive.any()):  # Feature Choice gives every latent about the same density: keep a visible range
        lo, hi = float(d[alive].min()), float(d[alive].max())
        ax.set_ylim(min(lo, hi / 4) / 1.5, max(hi, lo * 4) * 1.5)
    ax.set_xlabel("latent rank")
    ax.set_ylabel("firing density")
    ax.set_title(f"{name}: {int((~alive).sum())} of {d.numel()} latents never fired")
    ax.legend()
    fig.tight_layout()
    return fig


def modes_figure(scalars: dict[str, float], k: int, name: str) -> Figure:
    """FVU against mean L0 of each mode evaluated (batch allocation, calibrated and EMA thresholds)."""
    fig, ax = plt.subplots(figsize=(5, 4.2))
    xs, ys = [float(k)], []
    # coinciding modes (TopK's batch and threshold) stay visible: a large hollow marker under a small filled one
    styles = (("batch", "o", 12, "none"), ("threshold", "s", 6, None), ("threshold_ema", "^", 8, None))
    for mode, marker, size, face in styles:
        if f"val/{mode}/fvu" in scalars:
            x, y = scalars[f"val/{mode}/l0_mean"], scalars[f"val/{mode}/fvu"]
            xs.append(x)
            ys.append(y)
            ax.plot(
                [x],
                [y],
                marker,
                markersize=size,
                markerfacecolor=face,
                markeredgewidth=1.5,
                label=f"{mode}: L0 {x:.1f}, FVU {y:.4f}",
            )
    ax.axvline(k, color="grey", linestyle=":", label=f"k = {k}")
    ax.set_xscale("log")
    lo, hi = max(min(xs), 1e-3), max(xs)
    ax.set_xlim(min(lo, hi / 2) / 1.3, max(hi, lo * 2) * 1.3)  # at least a factor 2 wide: L0 all = k is a range
    if ys:
        span = max(max(ys) - min(ys), 0.05 * max(abs(max(ys)), 1e-3))
        ax.set_ylim(min(ys) - span, max(ys) + span)
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel("mean L0")
    ax.set_ylabel("FVU")
    ax.set_title(f"{name}: the modes at this validation")
    # below the axes, never over a marker (inside, "best" still covered one when the modes sit close)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.13, 1, 1))
    return fig


def run_figures(module) -> dict[str, Figure]:
    """The figures of the module's last validation, by name (some may be missing)."""
    r, name = module.results, module.variant.name
    figs = {}
    if r.l0_hists:
        figs["l0_per_token"] = l0_figure(r.l0_hists, module.k, name)
    if r.density is not None:
        figs["density_by_rank"] = density_figure(r.density, name)
    if any(key.endswith("/fvu") for key in r.scalars):
        figs["fvu_vs_l0"] = modes_figure(r.scalars, module.k, name)
    return figs


def save(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def close(figs: dict[str, Figure]) -> None:
    for fig in figs.values():
        plt.close(fig)
