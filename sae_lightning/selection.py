"""Selection kernels the allocators and the auxiliary losses share: exact top-k per row, exact
global top-M of a matrix, per-column top-m_j, threshold selection, token-major ordering.

Each returns a :class:`Selection` (pairs, no values, no gradient). Every one stops on NaN or
inf (:func:`check_finite`) instead of selecting garbage or, for the global top-M, spinning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import TrainingDiverged
from .sparse import Selection


def check_finite(top_values: Tensor) -> None:
    """Raise TrainingDiverged if any of ``top_values`` is NaN or +inf. Allocators pass the
    values ``torch.topk`` kept: it ranks NaN above every number, so a NaN or +inf anywhere
    in a row (or column) of z' shows among that row's top values, at no extra pass over z'."""
    if not bool(torch.isfinite(top_values).all()):
        raise TrainingDiverged("non-finite affinities z' (NaN or inf) reached the allocator")


def canonical_rows(z: Tensor, k: Tensor) -> Tensor:
    """For each row of ``z`` ([n, W]) the positions of its top-k_r entries in the canonical order
    (value descending, then position ascending), as a [n, W] mask with k_r entries per row. For
    the few rows whose cut falls inside a run of equal values (``torch.topk`` leaves which of
    them it keeps unspecified)."""
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        return torch.zeros_like(z, dtype=torch.bool)
    top = torch.topk(z, kmax, dim=1, sorted=True).values
    theta = top.gather(1, (k - 1).clamp_min(0).unsqueeze(1))
    above = z > theta
    tie = z == theta
    need = (k.unsqueeze(1) - above.sum(1, keepdim=True)).clamp_min(0)
    return (above | (tie & (tie.cumsum(1) <= need))) & (k.unsqueeze(1) > 0)


def topk_per_row(z: Tensor, k: int, offset: int = 0) -> tuple[Selection, Tensor]:
    """The top-k latents of every token (row-major order) and their values, in the canonical
    order (value, then lower latent first): the same pairs whatever the implementation of
    ``torch.topk`` does with ties. ``offset`` is added to the latent indices (a block of latents)."""
    B, F = z.shape
    k = min(k, F)
    width = min(k + 1, F)
    top = torch.topk(z, width, dim=1, sorted=True)
    check_finite(top.values)
    idx, vals = top.indices[:, :k], top.values[:, :k]
    if width > k:  # a cut inside a run of equal values: the lower latents among them
        tied = (top.values[:, k] == top.values[:, k - 1]).nonzero().squeeze(1)
        if tied.numel():
            idx, vals = idx.clone(), vals.clone()
            mask = canonical_rows(z[tied], torch.full((tied.numel(),), k, device=z.device))
            idx[tied] = mask.nonzero()[:, 1].view(-1, k)
            vals[tied] = z[tied].gather(1, idx[tied])
    rows = torch.arange(B, device=z.device).repeat_interleave(k)
    return Selection(rows=rows, cols=idx.reshape(-1) + offset, n_tokens=B), vals.reshape(-1)


def top_canonical(values: Tensor, keys: Tensor, m: int) -> Tensor:
    """Positions of the m largest ``values`` in the canonical order (value descending, then
    ``keys`` ascending; keys distinct): exact and unique, ties at the cut included."""
    if m >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    top = torch.topk(values, m, sorted=False)
    cut = top.values.min()
    if int((values == cut).sum()) == int((top.values == cut).sum()):  # no tie across the cut
        return top.indices
    above = (values > cut).nonzero().squeeze(1)
    eq = (values == cut).nonzero().squeeze(1)
    eq = eq[torch.argsort(keys[eq])][: m - above.numel()]
    return torch.cat([above, eq])


class GlobalTopK:
    """Exact top-M of a flattened [B, F] matrix without sorting it.

    1. From a strided sample of z', a threshold θ that a little more than M entries reach.
    2. Each row's need (entries ≥ θ) is estimated on one contiguous eighth of the latents
       (latent order is arbitrary, so it is a random sample of them). Every row takes its
       top-w entries, w a power of two above the 75th percentile of the estimates; rows that
       need more take their top next-power-of-two(need × 1.5).
    3. Exactness check: a row whose last candidate still reaches θ may hold more entries ≥ θ
       and is widened (×4); if fewer than M candidates reach θ, θ is lowered. Then every
       entry ≥ θ is a candidate and at least M are ≥ θ, so the top-M of the candidates is
       exactly the flat top-M (ties at the cut: ``torch.topk``'s).
    """

    SAMPLE = 1 << 16

    def __call__(self, z: Tensor, budget: int) -> tuple[Selection, Tensor]:
        B, F = z.shape
        budget = min(budget, B * F)
        device = z.device
        if budget == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return Selection(rows=empty, cols=empty, n_tokens=B), z.new_empty(0)
        flat = z.reshape(-1)
        sample = flat[:: max(1, flat.numel() // self.SAMPLE)]
        share = min(1.0, 1.2 * budget / flat.numel())  # aim 20 % above the budget
        block = max(1, F // 8)
        # widths: one for most rows, wider for the rows that need more
        theta = self._quantile_from_top(sample, share, flat)
        need = (z[:, :block] >= theta).sum(dim=1, dtype=torch.int32).to(torch.float32) * (F / block)
        base = _pow2(int(torch.quantile(need, 0.75)) + 4, F)
        width = torch.exp2(torch.ceil(torch.log2(1.5 * need + 4))).clamp_(min=base, max=F).to(torch.long)
        rows_all = torch.arange(B, device=device)
        groups: dict[int, tuple[Tensor, Tensor, Tensor]] = {}

        def take(rows: Tensor, w: int) -> None:
            v, i = torch.topk(z[rows], w, dim=1, sorted=True)
            groups[w] = (
                (rows, v, i)
                if w not in groups
                else (torch.cat([groups[w][0], rows]), torch.cat([groups[w][1], v]), torch.cat([groups[w][2], i]))
            )

        v, i = torch.topk(z, base, dim=1, sorted=True)  # every row, in place (no copy of z)
        check_finite(v[:, 0])  # each row's largest value; NaN would keep the loop below from ending
        light = width == base
        groups[base] = (rows_all, v, i) if bool(light.all()) else (rows_all[light], v[light], i[light])
        for w in torch.unique(width[~light]).tolist():
            take(rows_all[width == w], int(w))
        for _ in range(4 * 64):  # each pass halves the gap to share = 1 or widens rows ×4: it ends long before
            above = sum(int((v >= theta).sum()) for _, v, _ in groups.values())
            saturated = [(r[(v[:, -1] >= theta)], w) for w, (r, v, _) in groups.items() if w < F]
            saturated = [(r, w) for r, w in saturated if r.numel()]
            if not saturated and above >= budget:
                break
            if above < budget and share < 1.0:  # θ too high: lower it, keep the candidates, check again
                share = min(1.0, 2 * share)
                theta = self._quantile_from_top(sample, share, flat)
                continue
            for rows, w in saturated:  # move these rows to a wider group
                r, v, i = groups.pop(w)
                stay = ~torch.isin(r, rows)
                if bool(stay.any()):
                    groups[w] = (r[stay], v[stay], i[stay])
                take(rows, min(F, 4 * w))
        else:
            raise RuntimeError(
                f"exact global top-{budget} did not converge on a [{B}, {F}] matrix (a bug: please report)"
            )
        cand_v = torch.cat([v.reshape(-1) for _, v, _ in groups.values()])
        cand_r = torch.cat([r.repeat_interleave(v.shape[1]) for r, v, _ in groups.values()])
        cand_c = torch.cat([i.reshape(-1) for _, _, i in groups.values()])
        cand_key = cand_r * F + cand_c
        chosen = top_canonical(cand_v, cand_key, budget)  # every entry >= the cut is a candidate
        key, order = torch.sort(cand_key[chosen])
        rows = torch.div(key, F, rounding_mode="floor")
        return Selection(rows=rows, cols=key - rows * F, n_tokens=B), cand_v[chosen][order]

    @staticmethod
    def _quantile_from_top(sample: Tensor, share: float, flat: Tensor) -> Tensor:
        """A value that about ``share`` of the entries reach, judged on the sample."""
        r = int(share * sample.numel()) + 8
        if share >= 1.0 or r >= sample.numel():
            return flat.min()
        return torch.topk(sample, r, sorted=False).values.min()


def _pow2(n: int, cap: int) -> int:
    """The smallest power of two ≥ max(n, 1), at most ``cap``."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def per_column_topk(zt: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each row j of ``zt`` ([F, B], latent-major) its top-m_j entries.

    Latents are grouped by capacity so that each ``topk`` call asks for at most twice the
    smallest capacity in its group: the work stays near Σ m_j even for Zipf capacities. Ties at
    a latent's cut keep the lower tokens (canonical: the same pairs whatever ``torch.topk`` does).
    Returns (latent, token, value) of the kept entries, each latent's in value order, and each
    latent's cutoff value (its m_j-th largest, -inf where m_j = 0).
    """
    F_, B = zt.shape
    order = torch.argsort(m, descending=True, stable=True)
    m_sorted = m[order].tolist()
    lat_out, tok_out, val_out = [], [], []
    cutoff = torch.full((F_,), float("-inf"), dtype=zt.dtype, device=zt.device)
    start = 0
    while start < F_ and m_sorted[start] > 0:
        top = m_sorted[start]
        end = start
        while end < F_ and m_sorted[end] > 0 and 2 * m_sorted[end] >= top:
            end += 1
        lat = order[start:end]
        cap = m[lat]
        rows = zt[lat]
        width = min(top + 1, B)  # one more: is the cut inside a run of equal values?
        vals, idx = torch.topk(rows, width, dim=1, sorted=True)
        check_finite(vals[:, 0])  # each latent's largest value
        tied = (cap < B) & (
            vals.gather(1, cap.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
            == vals.gather(1, (cap - 1).unsqueeze(1)).squeeze(1)
        )
        tied = tied.nonzero().squeeze(1)
        if tied.numel():  # those latents keep the lower tokens among the tied values
            mask = canonical_rows(rows[tied], cap[tied])
            ranked = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :top]  # kept first
            order_v = torch.sort(rows[tied].gather(1, ranked), dim=1, descending=True, stable=True).indices
            idx[tied, :top] = ranked.gather(1, order_v)
            vals[tied, :top] = rows[tied].gather(1, idx[tied, :top])
        vals, idx = vals[:, :top], idx[:, :top]
        keep = torch.arange(top, device=zt.device).unsqueeze(0) < cap.unsqueeze(1)
        lat_out.append(lat.unsqueeze(1).expand(-1, top)[keep])
        tok_out.append(idx[keep])
        val_out.append(vals[keep])
        cutoff[lat] = vals.gather(1, (cap - 1).unsqueeze(1)).squeeze(1)
        start = end
    if not lat_out:
        empty = torch.empty(0, dtype=torch.long, device=zt.device)
        return empty, empty, zt.new_empty(0), cutoff
    return torch.cat(lat_out), torch.cat(tok_out), torch.cat(val_out), cutoff


def threshold_selection(z: Tensor, theta: Tensor, layout: str = "token") -> Selection:
    """Pairs with z' > θ and z' > 0, token-major. θ is a scalar or one per latent."""
    if layout == "token":
        rows, cols = torch.nonzero((z > theta) & (z > 0), as_tuple=True)
        return Selection(rows=rows, cols=cols, n_tokens=z.shape[0])
    theta = theta.unsqueeze(1) if theta.dim() == 1 else theta
    cols, rows = torch.nonzero((z > theta) & (z > 0), as_tuple=True)
    return sort_pairs(rows, cols, n_tokens=z.shape[1], n_latents=z.shape[0])


def sort_pairs(rows: Tensor, cols: Tensor, n_tokens: int, n_latents: int) -> Selection:
    """Reorder (token, latent) pairs token-major."""
    key = torch.sort(rows * n_latents + cols).values
    rows = torch.div(key, n_latents, rounding_mode="floor")
    return Selection(rows=rows, cols=key - rows * n_latents, n_tokens=n_tokens)
