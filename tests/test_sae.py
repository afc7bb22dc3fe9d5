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
