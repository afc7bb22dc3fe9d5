"""Selections from affinities computed one block of latents at a time: memory O(B·block + k·B),
never the dense [B, F] matrix.

Each function gives the same pairs and values as its dense kernel in ``selection.py`` (the
kernels share the canonical order: value descending, then lower index; so ties at a cut are
resolved the same way): TopK keeps a running top-k per token, merged block by block; Mutual
Choice a running top-M of the whole batch (the union's top-M is the top-M of the parts' top-Ms);
Feature Choice is per latent, and a latent never spans two blocks; threshold selection is per
entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .selection import (
    GlobalTopK,
    check_finite,
    per_column_topk,
    sort_pairs,
    threshold_selection,
    top_canonical,
    topk_per_row,
)
from .sparse import Selection

# model.block_latents=auto: the dense matrix up to AUTO_DENSE_ELEMENTS entries (2 GiB in fp32;
# faster where it fits), else blocks of AUTO_BLOCK_ELEMENTS // B latents (512 MiB each: as fast
# as larger blocks at F = 262144, less memory). docs/performance.md has the measurement.
AUTO_DENSE_ELEMENTS = 1 << 29
AUTO_BLOCK_ELEMENTS = 1 << 27


class AffinityBlocks:
    """z′ of B tokens for F latents, computed on demand a block of latents at a time by
    ``block_of(cols)``: [B, |cols|] in the ``token`` layout, [|cols|, B] in the ``latent`` one."""

    def __init__(
        self,
        block_of: Callable[[slice], Tensor],
        n_tokens: int,
        n_latents: int,
        block: int,
        layout: str,
        columns_of: Callable[[Tensor, slice], Tensor] | None = None,
    ):
        self.block_of, self.n_tokens, self.n_latents = block_of, n_tokens, n_latents
        self.block, self.layout, self.columns_of = max(1, block), layout, columns_of

    @property
    def shape(self) -> tuple[int, int]:
        """The dense matrix's shape in this layout."""
        return (self.n_tokens, self.n_latents) if self.layout == "token" else (self.n_latents, self.n_tokens)

    def columns(self, latents: Tensor, tokens: slice = slice(None)) -> Tensor:
        """z′ of some latents for (some) tokens, [tokens, len(latents)] (the auxiliary losses'
        few columns), computed directly."""
        if self.columns_of is None:
            raise ValueError("these blocks cannot give single columns")
        return self.columns_of(latents, tokens)

    def dense(self) -> Tensor:
        """The whole matrix (for what has no blockwise path)."""
        return torch.cat([z for _, z in self], dim=1 if self.layout == "token" else 0)

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        """(first latent, z′ of the block) for every block, in latent order."""
        for j in range(0, self.n_latents, self.block):
            yield j, self.block_of(slice(j, min(self.n_latents, j + self.block)))


def topk_per_row_blocks(blocks: AffinityBlocks, k: int) -> tuple[Selection, Tensor]:
    """:func:`selection.topk_per_row` of the whole matrix: each token's top-k over the blocks."""
    run_i: Tensor | None = None
    run_v: Tensor | None = None
    B = blocks.n_tokens
    for j, z in blocks:
        sel, vals = topk_per_row(z, k, offset=j)
        idx, vals = sel.cols.view(B, -1), vals.view(B, -1)
        if run_i is None or run_v is None:
            run_i, run_v = idx, vals
            continue
        cand_i, cand_v = torch.cat([run_i, idx], 1), torch.cat([run_v, vals], 1)
        # the canonical order: lower latent first, then (stably) larger value first
        by_latent = torch.argsort(cand_i, dim=1)
        by_value = torch.sort(cand_v.gather(1, by_latent), dim=1, descending=True, stable=True).indices
        keep = by_latent.gather(1, by_value[:, : min(k, cand_i.shape[1])])
        run_i, run_v = cand_i.gather(1, keep), cand_v.gather(1, keep)
    assert run_i is not None and run_v is not None, "no latents"
    order = torch.sort(run_v, dim=1, descending=True, stable=True).indices  # as the dense kernel: value order
    run_i, run_v = run_i.gather(1, order), run_v.gather(1, order)
    rows = torch.arange(B, device=run_i.device).repeat_interleave(run_i.shape[1])
    return Selection(rows=rows, cols=run_i.reshape(-1), n_tokens=B), run_v.reshape(-1)


def top_m_blocks(blocks: AffinityBlocks, budget: int) -> tuple[Selection, Tensor]:
    """:class:`selection.GlobalTopK` of the whole matrix: the batch's top-``budget`` entries,
    token-major, with their values."""
    B, F = blocks.n_tokens, blocks.n_latents
    budget = min(budget, B * F)
    keys: Tensor | None = None
    vals: Tensor | None = None
    for j, z in blocks:
        if keys is not None and vals is not None and keys.numel() == budget:
            # only what reaches the running budget-th value can enter: one comparison, not a
            # top-M of the block (NaN is kept as a candidate, so it stops selection as it would)
            candidates = ~(z < vals.min())
            if int(candidates.sum()) <= 2 * budget:
                r, c = candidates.nonzero().unbind(1)
                v = z[r, c]
                check_finite(v)
                k = r * F + c + j
                chosen = top_canonical(torch.cat([vals, v]), torch.cat([keys, k]), budget)
                keys, vals = torch.cat([keys, k])[chosen], torch.cat([vals, v])[chosen]
                continue
        sel, v = GlobalTopK()(z, min(budget, z.numel()))
        k = sel.rows * F + sel.cols + j
        if keys is not None and vals is not None:
            k, v = torch.cat([keys, k]), torch.cat([vals, v])
        chosen = top_canonical(v, k, budget)
        keys, vals = k[chosen], v[chosen]
    assert keys is not None and vals is not None, "no latents"
    keys, order = torch.sort(keys)
    rows = torch.div(keys, F, rounding_mode="floor")
    return Selection(rows=rows, cols=keys - rows * F, n_tokens=B), vals[order]


def per_column_topk_blocks(blocks: AffinityBlocks, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`selection.per_column_topk` of the whole [F, B] matrix (latent layout blocks)."""
    out: list[tuple[Tensor, Tensor, Tensor]] = []
    cutoffs = []
    for j, zt in blocks:
        lat, tok, val, cutoff = per_column_topk(zt, m[j : j + zt.shape[0]])
        out.append((lat + j, tok, val))
        cutoffs.append(cutoff)
    lat, tok, val = (torch.cat(parts) for parts in zip(*out))
    return lat, tok, val, torch.cat(cutoffs)


def threshold_selection_blocks(blocks: AffinityBlocks, theta: Tensor) -> Selection:
    """:func:`selection.threshold_selection` of the whole matrix: pairs with z′ > θ and z′ > 0."""
    return threshold_selections_blocks(blocks, [theta])[0]


def threshold_selections_blocks(blocks: AffinityBlocks, thetas: list[Tensor]) -> list[Selection]:
    """The threshold selection for each θ of ``thetas``, every block computed once."""
    rows: list[list[Tensor]] = [[] for _ in thetas]
    cols: list[list[Tensor]] = [[] for _ in thetas]
    for j, z in blocks:
        width = z.shape[1] if blocks.layout == "token" else z.shape[0]
        for i, theta in enumerate(thetas):
            sel = threshold_selection(z, theta if theta.dim() == 0 else theta[j : j + width], blocks.layout)
            rows[i].append(sel.rows)
            cols[i].append(sel.cols + j)
    return [sort_pairs(torch.cat(r), torch.cat(c), blocks.n_tokens, blocks.n_latents) for r, c in zip(rows, cols)]


# ---- either form: threshold selections (the ranked ones: rescore.py) ------------------------
def above_thresholds(z: Tensor | AffinityBlocks, thetas: list[Tensor], layout: str = "token") -> list[Selection]:
    """:func:`above_threshold` for several θ (an L0 sweep): blocks are computed once for all."""
    if isinstance(z, AffinityBlocks):
        return threshold_selections_blocks(z, thetas)
    return [threshold_selection(z, theta, layout) for theta in thetas]


def above_threshold(z: Tensor | AffinityBlocks, theta: Tensor, layout: str = "token") -> Selection:
    """Pairs with z′ > θ and z′ > 0 of a dense matrix or of blocks, token-major."""
    return (
        threshold_selection_blocks(z, theta) if isinstance(z, AffinityBlocks) else threshold_selection(z, theta, layout)
    )
