"""The selection kernels: exact against torch.topk on skewed rows, ties and non-positive values."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.selection import GlobalTopK, per_column_topk

from .helpers.selection import assert_row_major_unique, counts_per_row


def test_mutual_choice_exact_when_some_rows_need_many_latents():
    """A few tokens take most of the budget: the two-stage selection must grow c."""
    B, F, k = 64, 512, 4
    z = torch.randn(B, F)
    z[:3] += 10.0  # three tokens dominate
    sel, values = GlobalTopK()(z, k * B)
    assert torch.equal(torch.sort(values, descending=True).values, torch.topk(z.flatten(), k * B).values)
    assert int(counts_per_row(sel)[:3].min()) > 2 * k


def test_per_column_topk_reports_cutoffs():
    zt = torch.tensor([[5.0, 1.0, 3.0], [0.5, 2.0, -1.0]])
    lat, tok, val, cutoff = per_column_topk(zt, torch.tensor([2, 0]))  # zt is latent-major
    assert sorted(zip(lat.tolist(), tok.tolist())) == [(0, 0), (0, 2)]
    assert cutoff[0] == 3.0 and cutoff[1] == float("-inf")


@pytest.mark.parametrize("seed", range(8))
def test_global_topk_is_exact_on_skewed_rows(seed):
    g = torch.Generator().manual_seed(seed)
    B, F = 40, 120
    scale = torch.exp(2 * torch.randn(B, 1, generator=g))  # heavy-tailed token scales
    z = torch.randn(B, F, generator=g) * scale
    if seed % 2:
        z = torch.round(z * 2) / 2  # with ties
    budget = int(torch.randint(1, B * F // 3, (1,), generator=g))
    for m in (budget, 1, B * F - 1, B * F):
        sel, values = GlobalTopK()(z, m)
        assert_row_major_unique(sel, F)
        assert sel.rows.numel() == m
        assert torch.equal(z[sel.rows, sel.cols], values)
        assert torch.equal(torch.sort(values, descending=True).values, torch.topk(z.flatten(), m).values)
