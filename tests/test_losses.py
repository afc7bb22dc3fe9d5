import pytest
import torch

from sae_lightning.errors import ConfigError
from sae_lightning.losses import AuxK, AuxZipf, StepOutput, build_losses
from sae_lightning.sae import SparseAutoencoder
from sae_lightning.allocators.topk import TopK
from sae_lightning.stats import LatentStats


def setup(dead_fraction=0.3, B=64, d=16, F=96, k=4):
    sae = SparseAutoencoder(d, F, normalisation="none", b_pre_init="zeros")
    stats = LatentStats(F, k, dead_window_tokens=100, density_time_constant_tokens=1000, underused_ratio=0.5)
    x = torch.randn(B, d)
    z = sae.affinities(x)
    code = sae.code(x, z, TopK.from_dict({"k": k}, F, B).allocate(z))
    out = StepOutput(x=x, x_hat=sae.decode(code), z=z, layout="token", code=code)
    dead = torch.rand(F) < dead_fraction
    stats.tokens_since_fired[dead] = 1000
    stats.density.copy_(torch.rand(F) * 2 * k / F)
    return sae, stats, out


def test_aux_zipf_with_tau_zero_equals_aux_k():
    sae, stats, out = setup()
    assert int(stats.dead_mask().sum()) > 0
    for weighting in (True, False):
        a = AuxK(k_aux=8)(out, sae, stats)
        b = AuxZipf(k_aux=8, tau=0.0, deficit_weighting=weighting)(out, sae, stats)
        assert torch.equal(a, b)
        ga = torch.autograd.grad(a, sae.W_enc, retain_graph=True)[0]
        gb = torch.autograd.grad(b, sae.W_enc, retain_graph=True)[0]
        assert torch.equal(ga, gb)


def test_aux_k_is_zero_without_dead_latents_and_positive_with():
    sae, stats, out = setup(dead_fraction=0.0)
    assert float(AuxK()(out, sae, stats)) == 0.0
    sae, stats, out = setup(dead_fraction=0.5)
    loss = AuxK()(out, sae, stats)
    assert loss.item() > 0
    grad = torch.autograd.grad(loss, sae.W_enc)[0]
    dead = stats.dead_mask()
    assert grad[dead].abs().sum() > 0 and grad[~dead].abs().sum() == 0  # only dead latents are pushed


def test_aux_zipf_reaches_under_used_live_latents():
    sae, stats, out = setup(dead_fraction=0.0)
    stats.density.fill_(1e-6)  # everyone far below target
    loss = AuxZipf(tau=0.5)(out, sae, stats)
    assert float(loss) > 0


def test_aux_residual_loss_is_one_for_an_empty_code():
    """ê = 0 → Σ‖e‖² / Σ‖e − ē‖² ≥ 1; equality when e has zero batch mean."""
    sae, stats, out = setup(dead_fraction=1.0)
    out.z = torch.full_like(out.z, -1.0)  # nothing positive: the aux code is empty
    e = (out.x - out.x_hat).detach()
    expected = e.pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert torch.allclose(AuxK()(out, sae, stats), expected)


def test_build_losses_validates():
    terms = build_losses({"aux_k": {"coef": 0.5}}, d_model=8)
    assert set(terms) == {"recon", "aux_k"} and terms["aux_k"].coef == 0.5
    with pytest.raises(ConfigError, match="variant.losses.aux_q"):
        build_losses({"aux_q": {}}, 8)
    with pytest.raises(ConfigError, match="variant.losses.aux_zipf.tau=-1"):
        build_losses({"aux_zipf": {"tau": -1}}, 8)
    with pytest.raises(ConfigError, match="variant.losses.aux_k.kaux"):
        build_losses({"aux_k": {"kaux": 3}}, 8)


def test_aux_zipf_per_latent_trains_every_live_under_used_latent():
    sae, stats, out = setup(dead_fraction=0.1, B=128, F=96)
    stats.density.fill_(1e-6)  # every live latent far below its target
    dead = stats.dead_mask()
    for selection, expect_all in (("per_latent", True), ("per_token", False)):
        loss = AuxZipf(tau=0.5, k_aux=2, selection=selection)(out, sae, stats)
        grad = torch.autograd.grad(loss, sae.W_enc)[0]
        reached = grad.abs().sum(1) > 0
        has_positive = (out.z > 0).any(0)  # a latent with no positive affinity cannot be reached
        if expect_all:
            assert torch.all(reached[~dead & has_positive])
        else:  # 2 slots per token among ~90 latents: some are starved
            assert not torch.all(reached[~dead & has_positive])


def test_aux_zipf_rejects_an_unknown_selection():
    with pytest.raises(ConfigError, match="variant.losses.aux_zipf.selection='sometimes'"):
        build_losses({"aux_zipf": {"selection": "sometimes"}}, 8)
