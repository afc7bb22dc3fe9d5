"""Zipf curves: water-filled budgets (FC capacities, aux_zipf targets) and fitting α, β."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def zipf_weights(n: int, alpha: float, beta: float) -> Tensor:
    """w_r = (r + β)^(-α) for r = 1..n, float64."""
    r = torch.arange(1, n + 1, dtype=torch.float64)
    return (r + beta).pow(-alpha)


def waterfill(weights: Tensor, total: float, cap: float) -> Tensor:
    """Return x_r = min(cap, λ·w_r) with Σ x_r = total, for weights sorted non-increasing.

    No entry may exceed ``cap``; the surplus of the capped head flows to the rest. Exact:
    for each candidate number c of capped entries λ_c = (total − c·cap) / Σ_{r>c} w_r, and
    the answer is the smallest c for which the first uncapped entry fits under the cap.
    """
    w = weights.to(torch.float64)
    n = w.numel()
    if total > n * cap * (1 + 1e-12):
        raise ValueError(f"infeasible water-filling: total {total} > {n} entries x cap {cap}")
    if total >= n * cap:
        return torch.full_like(w, cap)
    suffix = torch.flip(torch.cumsum(torch.flip(w, [0]), 0), [0])  # Σ_{r>=c} w_r
    c = torch.arange(n, dtype=torch.float64)
    lam = (total - c * cap) / suffix
    valid = lam * w <= cap * (1 + 1e-12)
    first = int(torch.nonzero(valid)[0])
    x = torch.minimum(torch.full_like(w, cap), lam[first] * w)
    x[:first] = cap
    return x


def round_preserving_sum(x: Tensor, total: int, cap: int) -> Tensor:
    """Integers close to ``x`` with the exact sum ``total``, each ≤ ``cap`` (largest remainder)."""
    base = torch.floor(x + 1e-9).to(torch.long).clamp(max=cap)
    short = int(total - base.sum())
    if short > 0:
        frac = (x - base.to(x.dtype)).masked_fill(base >= cap, -1.0)
        # stable ordering: larger remainder first, then lower rank
        order = torch.argsort(-frac, stable=True)[:short]
        base[order] += 1
    elif short < 0:  # only from floating error; take back from the largest
        order = torch.argsort(-x, stable=True)[:-short]
        base[order] -= 1
    return base


def stochastic_round(x: Tensor, total: int, cap: int, u: float) -> Tensor:
    """Integers m with E[m_j] = x_j, |m_j − x_j| < 1 and Σ m_j = ``total`` exactly (x sums to
    it), each ≤ ``cap``: systematic sampling, one uniform ``u`` in [0, 1) for the whole vector:
    latent j rounds up when the running sum of the fractional parts crosses an integer + u in
    its stretch, which happens with probability frac(x_j)."""
    x = x.to(torch.float64)
    base = torch.floor(x + 1e-12)
    frac = (x - base).clamp(0.0, 1.0)
    ends = torch.cumsum(frac, 0)
    up = torch.floor(ends + u) - torch.floor(torch.cat([ends.new_zeros(1), ends[:-1]]) + u)
    m = (base + up).to(torch.long).clamp(max=cap)
    short = int(total - m.sum())  # only floating error in Σ frac can leave it one off
    if short > 0:  # round up where rounding took the most, never past the cap
        gap = (x - m.to(torch.float64)).masked_fill(m >= cap, -math.inf)
        m[torch.argsort(gap, descending=True, stable=True)[:short]] += 1
    elif short < 0:
        m[torch.argsort(m.to(torch.float64) - x, descending=True, stable=True)[:-short]] -= 1
    return m


def uniform_capacities(n_latents: int, budget: int) -> Tensor:
    """m = ⌊M/F⌋ for all, the remainder one each to the first latents; Σ m_j = M."""
    m = torch.full((n_latents,), budget // n_latents, dtype=torch.long)
    m[: budget % n_latents] += 1
    return m


def zipf_capacities(n_latents: int, budget: int, cap: int, alpha: float, beta: float, floor: int = 0) -> Tensor:
    """Integer capacities by rank: water-filled Zipf weights, Σ m_r = M, floor ≤ m_r ≤ cap (= B).

    ``floor`` tokens go to every rank first and the rest of the budget is water-filled on top,
    so that no latent's capacity rounds down to zero (a latent with m = 0 can never fire)."""
    if n_latents * floor > budget or floor > cap:
        raise ValueError(
            f"a floor of {floor} for {n_latents} latents needs {n_latents * floor} of a budget of {budget}"
        )
    x = floor + waterfill(zipf_weights(n_latents, alpha, beta), float(budget - n_latents * floor), float(cap - floor))
    return round_preserving_sum(x, budget, cap)


def by_density_rank(density: Tensor, values_by_rank: Tensor) -> Tensor:
    """Values given by rank (rank 1 = the densest latent) put in latent order, float32, on the
    density's device (ties ranked by index)."""
    order = torch.argsort(density.detach().cpu().to(torch.float64), descending=True, stable=True)
    out = torch.empty(density.numel(), dtype=torch.float64)
    out[order] = values_by_rank.to(torch.float64)
    return out.to(density.device, torch.float32)


def zipf_targets(density: Tensor, k: float, alpha: float, beta: float) -> Tensor:
    """Target firing densities t_j: latents ranked by density (descending), Zipf weights
    water-filled so that Σ t_j = k and t_j ≤ 1. Returned in latent order, float32."""
    return by_density_rank(density, waterfill(zipf_weights(density.numel(), alpha, beta), float(k), 1.0))


def fit_zipf(density: Tensor, tail_fraction: float = 0.1, betas=(0.0, 1.0, 3.0, 10.0, 30.0, 100.0)):
    """Fit log ρ_r ≈ c − α·log(r + β) on the latents sorted by density, leaving out the
    lowest ``tail_fraction`` of ranks and the latents that never fire. Returns (α, β, c, r²)
    of the best β on a small grid, or None when fewer than 3 latents fire."""
    d = torch.sort(density.detach().cpu().to(torch.float64), descending=True).values
    n_keep = int(math.floor(d.numel() * (1 - tail_fraction)))
    d = d[:n_keep]
    d = d[d > 0]
    if d.numel() < 3:
        return None
    y = d.log()
    best = None
    for beta in betas:
        xr = (torch.arange(1, d.numel() + 1, dtype=torch.float64) + beta).log()
        xm, ym = xr.mean(), y.mean()
        sxx = ((xr - xm) ** 2).sum()
        slope = float(((xr - xm) * (y - ym)).sum() / sxx)
        c = float(ym - slope * xm)
        resid = y - (c + slope * xr)
        r2 = 1.0 - float((resid**2).sum() / ((y - ym) ** 2).sum().clamp_min(1e-30))
        if best is None or r2 > best[3]:
            best = (-slope, beta, c, r2)
    return best
