import torch

from sae_lightning.metrics import L0, Firing, Reconstruction, feature_recovery


def test_fvu_and_nmse_match_their_definitions_over_batches():
    x = torch.randn(300, 7) + 2
    x_hat = x + 0.3 * torch.randn(300, 7)
    m = Reconstruction(7)
    for a, b in zip(x.split(64), x_hat.split(64)):
        m.update(a, b)
    out = m.compute()
    sse = (x - x_hat).pow(2).sum()
    assert torch.allclose(out["fvu"].float(), sse / (x - x.mean(0)).pow(2).sum(), rtol=1e-5)
    assert torch.allclose(out["nmse"].float(), sse / x.pow(2).sum(), rtol=1e-5)


def test_l0_distribution():
    m = L0(10)
    m.update(torch.tensor([0, 2, 2, 4]))
    m.update(torch.tensor([10]))
    out = m.compute()
    assert float(out["l0_mean"]) == 3.6 and float(out["l0_max"]) == 10
    assert float(out["l0_p50"]) == 2 and float(out["l0_zero_fraction"]) == 0.2


def test_firing_density_and_never_fired():
    m = Firing(4)
    m.update(torch.tensor([2, 0, 1, 0]), 10)
    m.update(torch.tensor([0, 0, 1, 0]), 10)
    out = m.compute()
    assert out["density"].tolist() == [0.1, 0.0, 0.1, 0.0] and float(out["never_fired_fraction"]) == 0.5


def test_feature_recovery():
    true = torch.eye(4, 8)
    dec = torch.cat([torch.eye(8)[:3], torch.randn(5, 8) * 0.01 + torch.eye(8)[7]])
    out = feature_recovery(true, dec)
    assert out["recovery_share_above_0.9"] == 0.75
    assert 0.75 < out["recovery_mean_max_cos"] < 1.0
