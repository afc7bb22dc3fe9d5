"""PNG plots of a finished run: per-token L0 distribution per mode, latent density by rank."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .zipf import fit_zipf  # noqa: E402


def save_run_plots(module, run_dir: Path) -> list[Path]:
    paths = []
    hists = module.results.l0_hists
    if hists:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mode, hist in hists.items():
            h = hist.to(torch.float64)
            top = int(torch.nonzero(hist).max()) + 1 if int(hist.sum()) else 1
            ax.step(range(top), (h[:top] / h.sum()).tolist(), where="mid", label=mode)
        ax.axvline(module.k, color="grey", linestyle=":", label=f"k = {module.k}")
        ax.set_xlabel("active latents per token (L0)")
        ax.set_ylabel("share of tokens")
        ax.set_title(f"{module.variant.name}: per-token L0 (validation)")
        ax.legend()
        fig.tight_layout()
        paths.append(run_dir / "l0_per_token.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    density = module.results.density
    if density is not None:
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
        ax.set_title(f"{module.variant.name}: {int((~alive).sum())} of {d.numel()} latents never fired")
        ax.legend()
        fig.tight_layout()
        paths.append(run_dir / "density_by_rank.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
