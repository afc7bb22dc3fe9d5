"""Selections from low-precision affinities, made exact: candidates near the cut, re-scored.

With ``model.affinity_dtype=bfloat16`` the step's dense product runs in bf16 (7× fp32's rate on
a CPU with AMX, and on GPU tensor cores), but bf16 keeps 8 bits of mantissa: near a cut, its
ranking differs from fp32's. So the bf16 matrix only proposes *candidates*, and their values
are computed again in fp32 pair by pair (``exact``: O(nnz·d), one sampled product); the final
selection is the fp32 one among the candidates, in the canonical order of the dense kernels
(value descending, then lower index). It equals the fp32 path's selection whenever the fp32
selection lies among the candidates. The candidates:

- Feature Choice: every entry of a latent's row whose bf16 value lies at most ``BAND`` = 6 bf16
  steps (ulps) below the row's m_j-th largest, or above it, found by group maxima
  (:func:`selection.row_candidates`). TopK: each token's top-(k + k/2), and beyond them every
  entry within ``ROW_BAND`` = 4 steps below its k-th largest (the rows whose band reaches past
  their top-(k + k/2) are taken again, twice as wide). The fp32 selection's worst pair lay at
  most 2 steps (12 ranks) below the cut over training on synthetic data and 3 steps (5 ranks)
  on trained SAEs of real activations (``python -m benchmarks.rescore``; docs/performance.md).
  A margin in the matrix's own rounding units follows the error; one in ranks (how many
  entries lie in those steps) follows the local density of values and the ties bf16 makes.
  (Blockwise TopK: the top-(k + k/2) alone.)
- Mutual Choice: the batch's top-(M + M/8) (the deepest reach measured: ~8 000 beyond
  M = 131 072).

Never a miss measured, in 3 × 200 training steps and on 6 trained SAEs of real activations;
the pairs that differ, about one in a million, are fp32 near-ties that the dense and the
pair-by-pair products round differently (docs/performance.md).

The functions here are what the allocators (and the multi-rank selections) call: each takes a
dense matrix or :class:`AffinityBlocks`, and ``exact`` = None for the plain (fp32) path.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
from torch import Tensor

from .blockwise import AffinityBlocks, per_column_topk_blocks, top_m_blocks, topk_per_row_blocks
from .selection import GlobalTopK, check_finite, per_column_topk, row_candidates, row_topk, top_canonical, topk_per_row
from .sparse import Selection


class Exact(Protocol):
    """The ranked matrix in the parameters' dtype, computed on request."""

    def __call__(self, tokens: Tensor, latents: Tensor) -> Tensor:
        """Its values at distinct (token, latent) pairs, O(nnz·d)."""
        ...

    def latent_rows(self, tokens: Tensor) -> Tensor:
        """Its columns for some of the batch's tokens, latent-major [F, len(tokens)], one dense
        product (Feature Choice's demand)."""
        ...


MIN_MARGIN = 8  # entries beyond the cut looked at, at least (per token, or for the batch)
# bf16 steps below a row's cut within which every entry is a candidate: Feature Choice's band,
# and TopK's besides each token's top-(k + k/2) (docs/performance.md)
BAND = 6
ROW_BAND = 4


def row_margin(k: int) -> int:
    """Candidates beyond TopK's k taken first (rows whose band reaches past them take more)."""
    return max(MIN_MARGIN, k // 2)


def batch_margin(budget: int) -> int:
    """Candidates beyond Mutual Choice's budget M: M/8 (the deepest reach measured: 8098
    beyond M = 131 072, docs/performance.md)."""
    return max(2 * MIN_MARGIN, budget // 8)


def column_margin(m: Tensor) -> Tensor:
    """Groups looked in beyond a latent's capacity m_j (none where m_j = 0): only how much is
    read at first (a latent whose band reaches further looks in more, :func:`selection.row_candidates`)."""
    return torch.where(m > 0, m // 4 + 2, torch.zeros_like(m))


def _ordered(z: Tensor | AffinityBlocks) -> Tensor | AffinityBlocks:
    """A 16-bit float matrix (or its blocks) viewed as int16: its bits rank every positive value
    as the floats do, and above every zero or negative one (their order among themselves is
    reversed). Candidates are found on the view (on a CPU, strided group maxima run 6× and a
    row's top-48 of 8192 1.5× faster than on bf16, which is converted element by element).
    Only the positive entries matter (ReLU drops the rest; a row with fewer positive entries
    than candidates gets some negative ones, not necessarily its largest). NaN ranks anywhere
    here, so the caller checks the parameters it came from (SAEModule)."""
    if isinstance(z, AffinityBlocks):
        blocks = z
        return AffinityBlocks(lambda cols: _as_int16(blocks.block_of(cols)), z.n_tokens, z.n_latents, z.block, z.layout)
    return _as_int16(z)


def _as_int16(z: Tensor) -> Tensor:
    return z.view(torch.int16) if z.dtype in (torch.bfloat16, torch.float16) else z


def topk_rows(z: Tensor | AffinityBlocks, k: int, exact: Exact | None = None) -> tuple[Selection, Tensor]:
    """Each token's top-k latents (:func:`selection.topk_per_row`) of a dense matrix or blocks;
    with ``exact``, chosen by their exact values among each token's entries of ``z`` within
    ``ROW_BAND`` steps below its k-th largest, or above, and its top-(k + k/2) (blocks: those
    alone)."""
    if exact is None:
        return topk_per_row_blocks(z, k) if isinstance(z, AffinityBlocks) else topk_per_row(z, k)
    B, F = z.shape
    k = min(k, F)
    width = min(F, k + row_margin(k))
    if isinstance(z, AffinityBlocks):
        cand = topk_per_row_blocks(cast(AffinityBlocks, _ordered(z)), width)[0].cols.view(B, width)
        cols, values = _exact_topk(cand, k, exact)
    else:
        keys = _as_int16(z)
        cols, values = _topk_rows_banded(keys, k, width, exact, ROW_BAND if keys.dtype == torch.int16 else 0)
    rows = torch.arange(B, device=cols.device).repeat_interleave(k)
    return Selection(rows=rows, cols=cols.reshape(-1), n_tokens=B, values=values.reshape(-1)), values.reshape(-1)


def _exact_topk(cand: Tensor, k: int, exact: Exact) -> tuple[Tensor, Tensor]:
    """Each row's top-k of its candidate latents ``cand`` [B, w] by exact values: [B, k] latents
    and values, in the canonical order among all latents."""
    B, width = cand.shape
    rows = torch.arange(B, device=cand.device).repeat_interleave(width)
    values = exact(rows, cand.reshape(-1)).view(B, width)
    # the canonical order among the candidates, ties by latent (= among all latents)
    sel, vals = topk_per_row(values, k, labels=cand)
    return cand.gather(1, sel.cols.view(B, k)), vals.view(B, k)


def _topk_rows_banded(keys: Tensor, k: int, width: int, exact: Exact, band: int) -> tuple[Tensor, Tensor]:
    """Each row's top-k by exact values ([B, k] latents and values, canonical order) among its
    top-``width`` by ``keys``, where those hold every entry within ``band`` key steps below the
    row's k-th largest key; the rows where they do not are done again with twice the width."""
    F = keys.shape[1]
    top, cand = row_topk(keys, width, sorted=False)  # ties among the candidates' keys: any of them
    cols, vals = _exact_topk(cand, k, exact)  # (all of them: masking the band's costs more)
    if width < F:
        key = top.long() if band else top  # (int16 views: a step is one unit)
        # the band reaches the least candidate (its k-th largest − band ≤ the width-th largest)
        # where fewer than k candidates lie more than ``band`` steps above that one
        least = key.amin(1, keepdim=True)
        short = ((key > least + band).sum(1) < k).nonzero().squeeze(1)
        if short.numel():  # the band may reach past the candidates: those rows, wider
            sub = _Rows(exact, short)
            more_cols, more_vals = _topk_rows_banded(keys[short], k, min(F, 2 * width), sub, band)
            cols[short], vals[short] = more_cols, more_vals
    return cols, vals


class _Rows:
    """An :class:`Exact` for some of the batch's rows (tokens), renumbered from 0."""

    def __init__(self, exact: Exact, rows: Tensor):
        self.exact, self.rows = exact, rows

    def __call__(self, tokens: Tensor, latents: Tensor) -> Tensor:
        return self.exact(self.rows[tokens], latents)

    def latent_rows(self, tokens: Tensor) -> Tensor:
        return self.exact.latent_rows(self.rows[tokens])


def top_m(z: Tensor | AffinityBlocks, budget: int, exact: Exact | None = None) -> tuple[Selection, Tensor]:
    """The batch's top-``budget`` entries, token-major, with their values (Mutual Choice); with
    ``exact``, chosen among the top-(budget + margin) of ``z`` by their exact values."""
    B, F = z.shape
    if exact is None:
        return top_m_blocks(z, budget) if isinstance(z, AffinityBlocks) else GlobalTopK()(z, budget)
    budget = min(budget, B * F)
    want = min(B * F, budget + batch_margin(budget))
    z = _ordered(z)
    cand, _ = top_m_blocks(z, want) if isinstance(z, AffinityBlocks) else GlobalTopK()(z, want)
    values = exact(cand.rows, cand.cols)
    check_finite(values)
    keys = cand.rows * F + cand.cols  # token-major: the canonical tie order of the dense kernel
    chosen = torch.sort(top_canonical(values, keys, budget)).values  # candidates are token-major
    return Selection(rows=cand.rows[chosen], cols=cand.cols[chosen], n_tokens=B, values=values[chosen]), values[chosen]


def per_column(
    zt: Tensor | AffinityBlocks, m: Tensor, exact: Exact | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each latent's top-m_j tokens of a [F, B] matrix or blocks (:func:`selection.per_column_topk`:
    latent, token, value of the kept entries, and each latent's cutoff); with ``exact``, chosen
    by their exact values among each latent's entries of ``zt`` within ``BAND`` steps below its
    m_j-th largest, or above (:func:`selection.row_candidates`), in the order latent, value
    descending, token (the cutoffs too are exact values)."""
    if exact is None:
        return per_column_topk_blocks(zt, m) if isinstance(zt, AffinityBlocks) else per_column_topk(zt, m)
    F_, B = zt.shape
    wide = (m + column_margin(m)).clamp(max=B)

    def candidates(keys: Tensor, rows: slice) -> tuple[Tensor, Tensor]:
        # a full-precision matrix (as in tests): the entries from its m_j-th largest up
        band = BAND if keys.dtype == torch.int16 else 0
        return row_candidates(keys, m[rows], wide[rows], band)

    zt = _ordered(zt)
    if isinstance(zt, AffinityBlocks):
        lats, toks = [], []
        for j, block in zt:  # each block computed once
            lat, tok = candidates(block, slice(j, j + block.shape[0]))
            lats.append(lat + j)
            toks.append(tok)
        lat, tok = torch.cat(lats), torch.cat(toks)
    else:
        lat, tok = candidates(zt, slice(None))
    if not bool((lat[1:] >= lat[:-1]).all()):  # by latent: the re-scoring's pattern without a sort
        by_latent = torch.argsort(lat, stable=True)
        lat, tok = lat[by_latent], tok[by_latent]
    values = exact(tok, lat)
    check_finite(values)
    order = _latent_value_token_order(lat, tok, values)
    lat, tok, values = lat[order], tok[order], values[order]
    counts = torch.bincount(lat, minlength=F_)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat.numel(), device=lat.device) - start[lat]
    keep = rank < m[lat]
    cutoff = torch.full((F_,), float("-inf"), dtype=values.dtype, device=values.device)
    has = m > 0
    cutoff[has] = values[(start + m - 1)[has]]
    return lat[keep], tok[keep], values[keep], cutoff


def sample_exact(z: Tensor, stride: int, top: int, exact: Exact) -> Tensor:
    """Every ``stride``-th entry of a low-precision latent-major [F, B] matrix (flat order), in
    full precision where it can be among the sample's ``top`` largest, -inf elsewhere: the
    entries within ``BAND`` steps below the low-precision top-th largest, or above, re-scored
    pair by pair (the rest cannot reach the top; Feature Choice's demand cutoff, the top-th
    largest, is then the fp32 sample's)."""
    B = z.shape[1]
    keys = _as_int16(z).reshape(-1)[::stride].contiguous()
    top = min(max(top, 1), keys.numel())
    cut = int(torch.topk(keys, top, sorted=False).values.min())
    near = (keys >= max(cut - BAND, torch.iinfo(torch.int16).min)).nonzero().squeeze(1)
    flat = near * stride
    lat = torch.div(flat, B, rounding_mode="floor")
    values = exact(flat - lat * B, lat)
    out = torch.full((keys.numel(),), float("-inf"), dtype=values.dtype, device=values.device)
    out[near] = values
    return out


def count_above(keys: Tensor, theta: Tensor, exact: Exact) -> Tensor:
    """[F]: how many of the tokens 0..n-1 each latent's full-precision affinity exceeds
    ``theta`` (> 0) on, from the int16 keys [F, n] of a low-precision latent-major matrix: the
    entries more than ``BAND`` steps above θ's key count, those within ``BAND`` of it are
    re-scored pair by pair, the rest do not (Feature Choice at F = 8192 after 20 steps: 0.22 %
    of the entries reach θ − band, 0.05 % are re-scored)."""
    t = int(theta.to(torch.bfloat16).view(torch.int16))
    reach = (keys >= t - BAND).nonzero()  # few: the rest is decided on them alone
    lat, tok = reach[:, 0], reach[:, 1]
    near = keys[lat, tok] <= t + BAND
    above = ~near
    if bool(near.any()):
        above[near] = exact(tok[near], lat[near]) > theta
    return torch.bincount(lat[above], minlength=keys.shape[0]).to(torch.int32)


def _latent_value_token_order(lat: Tensor, tok: Tensor, values: Tensor) -> Tensor:
    """The permutation that orders entries by latent, then value descending, then token: one sort
    of a 64-bit key (latent, value); where entries of a latent hold equal values (identical
    tokens do), only those entries are sorted again, by key and then token."""
    v = (values.float() + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0 becomes +0, equal to it
    v = torch.where(v < 0, v ^ 0x7FFFFFFF, v)  # IEEE bits ordered as the floats they encode
    key = lat * (1 << 32) + ((1 << 31) - 1 - v)  # value descending within a latent
    key_sorted, order = torch.sort(key)
    equal = key_sorted[1:] == key_sorted[:-1]
    if not bool(equal.any()):
        return order
    tied = torch.zeros_like(key_sorted, dtype=torch.bool)
    tied[1:] |= equal
    tied[:-1] |= equal
    at = tied.nonzero().squeeze(1)  # each run of equal keys is contiguous, the runs in key order
    entries = order[at]
    entries = entries[torch.argsort(tok[entries], stable=True)]
    order[at] = entries[torch.sort(key[entries], stable=True).indices]  # by key, then token
    return order
