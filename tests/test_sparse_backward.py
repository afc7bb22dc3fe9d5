"""The training path (sparse selection + sparse backward) against plain dense autograd."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.allocators import ALLOCATORS, get_allocator_class
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.sparse import SparseCode


def dense_reference_loss(sae, xn, selected_mask, weights=None):
    """relu(z') masked by the selection, decoded densely, all through autograd."""
    z = (xn - sae.b_pre) @ sae.W_enc.t() + sae.b_enc
    code = torch.relu(z) * selected_mask
    if weights is not None:
        code = code * weights
    x_hat = code @ sae.W_dec + sae.b_pre
    return (x_hat - xn).pow(2).sum() + 0.1 * code.sum()


def fast_loss(sae, xn, alloc, weights=None, centred=False):
    z = sae.affinities(xn, layout=alloc.layout)
    sel = alloc.allocate(z)
    xc = (xn - sae.b_pre).detach() if centred else None  # the step's own xn − b_pre, handed over
    code = sae.code(xn, z, sel, alloc.layout, weights, centred=xc)
    x_hat = sae.decode(code)
    mask = torch.zeros(xn.shape[0], sae.n_latents)
    mask[sel.rows, sel.cols] = 1.0
    return (x_hat - xn).pow(2).sum() + 0.1 * code.values.sum(), mask


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
@pytest.mark.parametrize("inputs", ["gaussian", "ties", "centred"])
def test_gradients_match_dense_autograd(name, inputs):
    torch.manual_seed(1)
    B, d, F, k = 48, 12, 80, 5
    sae = SparseAutoencoder(d, F, normalisation="none", b_pre_init="zeros")
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)  # many non-positive affinities
        sae.b_pre.normal_(0, 0.1)
    if inputs == "ties":  # integer-valued weights and inputs: many exactly equal affinities
        with torch.no_grad():
            sae.W_enc.copy_(torch.randint(-2, 3, (F, d)).float())
            sae.b_enc.zero_()
            sae.b_pre.zero_()
        xn = torch.randint(-1, 2, (B, d)).float()
    else:
        xn = torch.randn(B, d)
    alloc = get_allocator_class(name).from_dict({"k": k}, F, B)
    weights = torch.rand(F)
    loss_fast, mask = fast_loss(sae, xn, alloc, weights, centred=inputs == "centred")
    grads_fast = torch.autograd.grad(loss_fast, list(sae.parameters()))
    loss_ref = dense_reference_loss(sae, xn, mask, weights)
    grads_ref = torch.autograd.grad(loss_ref, list(sae.parameters()))
    assert torch.allclose(loss_fast, loss_ref, rtol=1e-5, atol=1e-4)
    for (pname, _), gf, gr in zip(sae.named_parameters(), grads_fast, grads_ref):
        assert torch.allclose(gf, gr, rtol=1e-4, atol=1e-4), pname


def test_bfloat16_selection_keeps_exact_float32_values():
    torch.manual_seed(2)
    sae = SparseAutoencoder(32, 200, normalisation="none", b_pre_init="zeros")
    xn = torch.randn(64, 32)
    z16 = sae.affinities(xn, dtype=torch.bfloat16)
    assert z16.dtype == torch.bfloat16
    alloc = get_allocator_class("topk").from_dict({"k": 8}, 200, 64)
    sel = alloc.allocate(z16)
    code = sae.code(xn, z16, sel)
    z32 = sae.affinities(xn)
    expected = SparseCode.from_selection(z32, sel)
    assert torch.equal(code.offsets, expected.offsets)
    assert torch.allclose(code.values, expected.values, rtol=1e-5, atol=1e-6)
    # and bf16 picks nearly the same latents as fp32
    exact = alloc.allocate(z32)
    agree = len(set(zip(sel.rows.tolist(), sel.cols.tolist())) & set(zip(exact.rows.tolist(), exact.cols.tolist())))
    assert agree / exact.rows.numel() > 0.9


@pytest.mark.parametrize("nnz_per_row", ["varied", "empty"])
def test_decode_backward_equals_embedding_bag(nnz_per_row):
    """sparse_decode's own backward (values: a sampled product on the code's CSR pattern, latents
    in any order within a row; decoder rows: grouped by latent) against embedding_bag's, with
    rows of different lengths, empty rows and repeated latents across rows; and gradcheck."""
    import torch.nn.functional as F

    from sae_lightning.sparse import sparse_decode

    g = torch.Generator().manual_seed(0)
    B, n_latents, d = 12, 30, 7
    lengths = torch.randint(0, 6, (B,), generator=g) if nnz_per_row == "varied" else torch.zeros(B, dtype=torch.long)
    latents = torch.cat([torch.randperm(n_latents, generator=g)[: int(n)] for n in lengths])
    offsets = torch.zeros(B + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths, 0)
    values = torch.rand(latents.numel(), generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(n_latents, d, generator=g, dtype=torch.float64).requires_grad_()
    code = SparseCode(offsets=offsets, latents=latents, values=values, n_latents=n_latents)
    out = sparse_decode(code, W)
    ref = F.embedding_bag(latents, W, offsets, mode="sum", per_sample_weights=values, include_last_offset=True)
    assert torch.allclose(out, ref)
    upstream = torch.randn(B, d, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, [values, W], upstream)
    want = torch.autograd.grad(ref, [values, W], upstream)
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b)
    if latents.numel():
        assert torch.autograd.gradcheck(
            lambda v, w: sparse_decode(SparseCode(offsets=offsets, latents=latents, values=v, n_latents=n_latents), w),
            (values, W),
        )


@pytest.mark.parametrize("d", [7, 64, 384])
def test_pair_products_in_any_order_equal_bit_for_bit(d):
    """pair_products: pairs by row (CSR as given), by column (the transposed product's pattern)
    and in no order (sorted by row first) give the same values bit for bit, each pair's dot
    product plus its bias, and the fp64 dot products to fp32 rounding."""
    from sae_lightning.sparse import pair_products

    g = torch.Generator().manual_seed(d)
    n, m = 50, 90
    a, b, bias = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g), torch.randn(m, generator=g)
    key = torch.unique(torch.randint(0, n * m, (700,), generator=g))
    rows, cols = key // m, key % m  # by row
    by_row = pair_products(a, b, rows, cols, bias)
    col_order = torch.argsort(cols, stable=True)
    by_col = pair_products(a, b, rows[col_order], cols[col_order], bias)
    shuffle = torch.randperm(rows.numel(), generator=g)
    anyhow = pair_products(a, b, rows[shuffle], cols[shuffle], bias)
    assert not bool((rows[col_order][1:] >= rows[col_order][:-1]).all())  # the column path was taken
    assert torch.equal(by_col, by_row[col_order]) and torch.equal(anyhow, by_row[shuffle])
    want = (a.double()[rows] * b.double()[cols]).sum(1) + bias.double()[cols]
    torch.testing.assert_close(by_row.double(), want, rtol=1e-5, atol=1e-5)
