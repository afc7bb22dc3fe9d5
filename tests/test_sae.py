import torch

from sae_lightning.sae import SparseAutoencoder, geometric_median
from sae_lightning.sparse import Selection, SparseCode, sparse_decode


def test_geometric_median_resists_outliers():
    x = torch.randn(500, 3) * 0.1
    x[:50] += 100.0  # 10 % far outliers drag the mean, not the median
    gm = geometric_median(x)
    assert gm.norm() < 1.0 < x.mean(0).norm()


def test_tied_init_and_unit_decoder():
    sae = SparseAutoencoder(16, 64)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64))
    cos = torch.nn.functional.cosine_similarity(sae.W_dec, sae.W_enc, dim=1)
    assert torch.allclose(cos, torch.ones(64))


def test_decoder_columns_stay_unit_norm_after_steps():
    sae = SparseAutoencoder(16, 64, normalisation="none", b_pre_init="zeros")
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for _ in range(20):
        x = torch.randn(32, 16)
        z = sae.affinities(x)
        idx = torch.topk(z.detach(), 4, dim=1).indices
        sel = Selection(rows=torch.arange(32).repeat_interleave(4), cols=idx.flatten(), n_tokens=32)
        loss = (sae.decode(SparseCode.from_selection(z, sel)) - x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        sae.project_decoder_grad()
        radial = (sae.W_dec.grad * sae.W_dec).sum(1)
        assert radial.abs().max() < 1e-4  # the gradient has no component along the column
        opt.step()
        sae.renormalise_decoder()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)


def test_a_free_decoder_ranks_by_contribution_and_keeps_its_norms():
    """model.decoder_norm=free (SAELens's rescale_acts_by_decoder_norm): selection ranks
    z'_j·‖d_j‖, the code holds z'_j and decodes with d_j as it is, the norms train, and the
    folded form (unit rows) gives the same ranking and the same x̂."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(
        16, 64, normalisation="none", b_pre_init="zeros", decoder_norm="free", decoder_init_norm=0.1
    )
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((64,), 0.1)) and torch.equal(sae.W_enc, sae.W_dec)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) * 3)  # norms that differ per latent
        sae.b_enc.normal_()
    x = torch.randn(32, 16)
    z = sae.affinities(x)
    plain = x @ sae.W_enc.t() + sae.b_enc
    norms = sae.W_dec.norm(dim=1)
    assert torch.allclose(z, plain * norms, atol=1e-5)
    idx = torch.topk(z, 4, dim=1).indices
    sel = Selection(rows=torch.arange(32).repeat_interleave(4), cols=idx.flatten(), n_tokens=32)
    code = sae.code(x, z, sel)
    dense = torch.zeros(32, 64).scatter_(1, idx, plain.gather(1, idx).clamp_min(0))
    assert torch.allclose(code.to_dense(), dense, atol=1e-5)
    x_hat = sae.decode(code)
    assert torch.allclose(x_hat, dense @ sae.W_dec, atol=1e-5)
    W_enc, b_enc, W_dec = sae.folded()
    assert torch.allclose(W_dec.norm(dim=1), torch.ones(64), atol=1e-5)
    zf = x @ W_enc.t() + b_enc
    assert torch.equal(torch.topk(zf, 4, dim=1).indices.sort(1).values, idx.sort(1).values)
    folded = torch.zeros(32, 64).scatter_(1, idx, zf.gather(1, idx).clamp_min(0)) @ W_dec
    assert torch.allclose(folded, x_hat, atol=1e-5)
    # a step changes the norms (no projection, no renormalisation)
    x_hat.pow(2).sum().backward()
    before = sae.W_dec.grad.clone()
    sae.project_decoder_grad()
    assert torch.equal(sae.W_dec.grad, before)
    with torch.no_grad():
        sae.W_dec.sub_(0.1 * sae.W_dec.grad)
    sae.renormalise_decoder()
    assert not torch.allclose(sae.W_dec.norm(dim=1), norms)


def test_normalisations_round_trip_and_dataset_scale():
    x = torch.randn(256, 8) * 5 + 3
    for norm in ("none", "dataset_scale", "layernorm"):
        sae = SparseAutoencoder(8, 16, normalisation=norm)
        sae.init_from_sample(x)
        xn, ctx = sae.normalise(x)
        assert torch.allclose(sae.denormalise(xn, ctx), x, atol=1e-4)
        if norm == "dataset_scale":
            assert abs(float(xn.pow(2).sum(1).mean()) - 8.0) < 1e-3
        if norm == "layernorm":
            assert torch.allclose(xn.mean(1), torch.zeros(256), atol=1e-5)


def test_sparse_decode_matches_dense_and_its_gradient():
    F, d, B = 30, 5, 6
    W = torch.randn(F, d, requires_grad=True)
    z = torch.randn(B, F, requires_grad=True)
    sel = Selection(rows=torch.tensor([0, 0, 2, 3, 3, 3, 5]), cols=torch.tensor([1, 4, 0, 2, 9, 29, 7]), n_tokens=B)
    code = SparseCode.from_selection(z, sel)
    y = sparse_decode(code, W)
    y_dense = code.to_dense() @ W
    assert torch.allclose(y, y_dense, atol=1e-6)
    g1 = torch.autograd.grad(y.pow(2).sum(), (W, z))
    code2 = SparseCode.from_selection(z, sel)
    g2 = torch.autograd.grad((code2.to_dense() @ W).pow(2).sum(), (W, z))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g1, g2))
    assert torch.equal(code.l0_per_token(), torch.bincount(code.token_index(), minlength=B))


def test_decoder_norms_held_for_a_step_then_recomputed():
    """holding_ranked_encoder: one computation for the step's many callers, the same values; after
    it, a change of W_dec (the optimiser's step) shows."""
    sae = SparseAutoencoder(8, 16, decoder_norm="free")
    with torch.no_grad():
        sae.W_dec.normal_()
    with sae.holding_ranked_encoder():
        first = sae.decoder_norms()
        assert sae.decoder_norms() is first
        assert torch.equal(first, sae.W_dec.norm(dim=1).clamp_min(1e-12))
        assert torch.equal(sae.decoder_norms(slice(2, 5)), first[2:5])
        operand = sae.ranked_operand(torch.bfloat16)  # before the fp32 encoder: straight from W_enc
        assert sae.ranked_operand(torch.bfloat16) is operand
        W, b = sae.ranked_encoder()
        assert sae.ranked_encoder()[0] is W and torch.equal(W, sae.W_enc * first.unsqueeze(1))
        # the same bits as the fp32 W·‖d‖ and b·‖d‖ rounded, then the bias column's zeros
        assert torch.equal(operand[:, :8], W.bfloat16()) and torch.equal(operand[:, 8], b.bfloat16())
        assert operand.shape == (16, 8 + 16) and not operand[:, 9:].any()
    assert sae._held_operand is None and sae._held_encoder is None  # released after the step
    assert sae.ranked_operand(torch.bfloat16) is not operand  # outside: computed on each call
    with torch.no_grad():
        sae.W_dec.mul_(2)
    assert torch.allclose(sae.decoder_norms(), 2 * first)
    assert SparseAutoencoder(8, 16, decoder_norm="unit").decoder_norms() is None


def test_affinity_workspace_reused_between_steps_once_per_step():
    """reusing_affinities: the first full matrix of a step goes into the kept buffer, the same one
    each step (no fresh [B, F] allocation); a second matrix in the same step gets its own memory;
    values as without the buffer, in both dtypes and layouts; a new size gets a new buffer."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(8, 16, decoder_norm="free")
    xn = torch.randn(5, 8)
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("token", "latent"):
            plain = sae.affinities(xn, layout=layout, dtype=dtype)
            with sae.reusing_affinities():
                first = sae.affinities(xn, layout=layout, dtype=dtype)
                second = sae.affinities(xn, layout=layout, dtype=dtype)
            assert torch.equal(first, plain) and torch.equal(second, plain)
            assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
            with sae.reusing_affinities():
                again = sae.affinities(xn, layout=layout, dtype=dtype)
                assert again.data_ptr() == first.data_ptr()
                # a slice of latents is its own (smaller) product, never the buffer: the same values up to
                # rounding (BLAS sums in another order for another shape on some CPUs: not bitwise)
                part = sae.affinities(xn, slice(0, 4), layout, dtype)
                assert part.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                tol = 1e-6 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(part, plain[:, :4] if layout == "token" else plain[:4], rtol=tol, atol=tol)
    x7 = torch.randn(7, 8)
    with sae.reusing_affinities():
        wider = sae.affinities(x7)
    assert torch.equal(wider, sae.affinities(x7))
    outside = sae.affinities(x7)
    assert outside.data_ptr() != wider.data_ptr()  # outside a step: never the buffer
