"""Checks of a Selection's layout that several allocator tests share."""

from __future__ import annotations

import torch


def counts_per_row(sel) -> torch.Tensor:
    return torch.bincount(sel.rows, minlength=sel.n_tokens)


def counts_per_col(sel, F) -> torch.Tensor:
    return torch.bincount(sel.cols, minlength=F)


def assert_row_major_unique(sel, F):
    assert torch.all(sel.rows[1:] >= sel.rows[:-1]), "selection must be sorted by token (CSR order)"
    key = sel.rows * F + sel.cols
    assert torch.unique(key).numel() == key.numel(), "a (token, latent) pair was selected twice"


def blocks_of(z, block, layout="token"):
    """A dense matrix served as :class:`AffinityBlocks` of ``block`` latents."""
    from sae_lightning.blockwise import AffinityBlocks

    if layout == "token":
        return AffinityBlocks(lambda cols: z[:, cols], z.shape[0], z.shape[1], block, layout)
    return AffinityBlocks(lambda cols: z[cols], z.shape[1], z.shape[0], block, layout)


def triples(rows, cols, vals):
    """(row, col, value) of a selection, sorted: equal whatever the order among equal values."""
    return sorted(zip(rows.tolist(), cols.tolist(), vals.tolist()))
