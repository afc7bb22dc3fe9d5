"""Per-latent firing statistics, counted in tokens: dead, density EMA, under-used.

Under-used (the metric) is relative to the run's own density curve: a latent is under-used
when it is dead or fires at under ``underused_ratio`` of what a Zipf fit of all latents'
densities gives at its rank (``fitted``), so an SAE whose density curve is smooth, whatever its
slope, has none; ``zipf`` keeps the older reference, a fixed Zipf(α, β) curve water-filled to
Σ t = k (what aux_zipf's targets are), which calls a flatter or steeper healthy curve under-used.

The one place these live; aux losses, metrics, Feature Choice's density ranking and the
logging callback all read them, and they are saved with the checkpoint (buffers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .zipf import by_density_rank, fit_zipf, zipf_targets


class LatentStats(nn.Module):
    tokens_since_fired: Tensor
    density: Tensor
    tokens_seen: Tensor

    def __init__(
        self,
        n_latents: int,
        k: int,
        dead_window_tokens: int,
        density_time_constant_tokens: int,
        underused_ratio: float,
        zipf_alpha: float = 1.0,
        zipf_beta: float = 0.0,
        underused_reference: str = "fitted",
    ):
        super().__init__()
        self.n_latents, self.k = n_latents, k
        self.dead_window_tokens = dead_window_tokens
        self.density_time_constant_tokens = density_time_constant_tokens
        self.underused_ratio, self.zipf_alpha, self.zipf_beta = underused_ratio, zipf_alpha, zipf_beta
        self.underused_reference = underused_reference
        self.register_buffer("tokens_since_fired", torch.zeros(n_latents, dtype=torch.long))
        # prior: every latent at the uniform share k/F, so nothing looks under-used at step 0
        self.register_buffer("density", torch.full((n_latents,), k / n_latents))
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, fire_counts: Tensor, n_tokens: int) -> None:
        fired = fire_counts > 0
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)
        a = 1.0 - math.exp(-n_tokens / self.density_time_constant_tokens)
        self.density.lerp_(fire_counts.to(self.density.dtype) / n_tokens, a)
        self.tokens_seen.add_(n_tokens)

    def dead_mask(self) -> Tensor:
        return self.tokens_since_fired >= self.dead_window_tokens

    def targets(self, k: float | None = None, alpha: float | None = None, beta: float | None = None) -> Tensor:
        """Zipf target densities t_j (Σ t_j = k, t_j ≤ 1), ranks by current density."""
        return zipf_targets(
            self.density,
            self.k if k is None else k,
            self.zipf_alpha if alpha is None else alpha,
            self.zipf_beta if beta is None else beta,
        )

    def underused_mask(self, ratio: float | None = None, targets: Tensor | None = None) -> Tensor:
        """dead ∪ {j : ρ_j < ratio · t_j}."""
        ratio = self.underused_ratio if ratio is None else ratio
        t = self.targets() if targets is None else targets
        return self.dead_mask() | (self.density < ratio * t)

    def fitted_curve(self) -> Tensor | None:
        """ρ̂_j = e^c·(r_j + β)^(−α): the Zipf fit of the current densities (``fit_zipf``: the
        firing latents of the top 90 % of ranks) at latent j's density rank r_j; None when fewer
        than 3 latents fire."""
        fit = fit_zipf(self.density)
        if fit is None:
            return None
        alpha, beta, c, _ = fit
        rank = torch.arange(1, self.n_latents + 1, dtype=torch.float64)
        return by_density_rank(self.density, math.exp(c) * (rank + beta).pow(-alpha))

    def underused_metric_mask(self) -> Tensor:
        """The under-used metric's latents: dead ∪ {j : ρ_j < ratio · reference_j}, the reference
        being the fitted curve (``fitted``; every latent when fewer than 3 fire) or the Zipf targets."""
        if self.underused_reference == "zipf":
            return self.underused_mask()
        curve = self.fitted_curve()
        if curve is None:
            return self.dead_mask() | (self.density <= 0)
        return self.dead_mask() | (self.density < self.underused_ratio * curve)

    def expected_never_fired(self, n_tokens: int) -> float:
        """The share of latents that would fire on none of ``n_tokens`` independent tokens at their
        training densities, mean_j (1 − ρ_j)^n: beside the share that never fired on held-out
        tokens it tells a rare latent (expected to miss a small sample) from a dead one."""
        return float((1 - self.density.to(torch.float64).clamp(0, 1)).pow(n_tokens).mean())

    def summary(self) -> dict[str, float]:
        return {
            "dead_fraction": float(self.dead_mask().float().mean()),
            "underused_fraction": float(self.underused_metric_mask().float().mean()),
            "tokens_seen": float(self.tokens_seen),
        }
