import pytest
import torch

from sae_lightning.allocators.topk import TopK
from sae_lightning.errors import ConfigError
from sae_lightning.losses import AuxK, AuxZipf, StepOutput, build_losses, total_loss
from sae_lightning.sae import SparseAutoencoder
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
        b = AuxZipf(k_aux=8, tau=0.0, deficit_weighting=weighting, underused_coef=3.0)(out, sae, stats)
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
    assert float(loss.detach()) > 0


def test_aux_residual_loss_is_one_for_an_empty_code():
    """ê = 0 → Σ‖e‖² / Σ‖e − ē‖² ≥ 1; equality when e has zero batch mean."""
    sae, stats, out = setup(dead_fraction=1.0)
    out.z = torch.full_like(out.z, -1.0)  # nothing positive: the aux code is empty
    e = (out.x - out.x_hat).detach()
    expected = e.pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    assert torch.allclose(AuxK()(out, sae, stats), expected)


def test_build_losses_validates():
    terms = build_losses({"aux_k": {"coef": 0.5}})
    assert set(terms) == {"recon", "aux_k"} and terms["aux_k"].coef == 0.5
    with pytest.raises(ConfigError, match="variant.losses.aux_q"):
        build_losses({"aux_q": {}})
    with pytest.raises(ConfigError, match="variant.losses.aux_zipf.tau=-1"):
        build_losses({"aux_zipf": {"tau": -1}})
    with pytest.raises(ConfigError, match="variant.losses.aux_k.kaux"):
        build_losses({"aux_k": {"kaux": 3}})


def test_aux_zipf_residual_term_trains_every_live_under_used_latent():
    sae, stats, out = setup(dead_fraction=0.1, B=128, F=96)
    stats.density.fill_(1e-6)  # every live latent far below its target
    dead = stats.dead_mask()
    term = AuxZipf(tau=0.5, k_aux=2, underused_term="residual", underused_coef=1.0)
    grad = torch.autograd.grad(term(out, sae, stats), sae.W_enc)[0]
    reached = grad.abs().sum(1) > 0
    has_positive = (out.z > 0).any(0)  # a latent with no positive affinity cannot be reached with relu values
    assert torch.all(reached[~dead & has_positive])
    assert float(term.metrics["underused_reached"]) == float((~dead & has_positive).sum() / (~dead).sum())


def test_dead_latents_keep_their_slots_however_many_live_latents_are_under_used():
    """The crowding of the first aux_zipf: live under-used latents with higher affinities took
    every per-token slot. Now the dead term has its own."""
    sae, stats, out = setup(dead_fraction=0.3, B=128, F=96)
    dead = stats.dead_mask()
    with torch.no_grad():
        out.z[:, ~dead] += 10.0  # every live latent outranks every dead one
        out.z[:, dead] = out.z[:, dead].abs() + 0.01  # dead ones positive, so relu values reach them
    stats.density.fill_(1e-6)  # and every live latent is under-used
    term = AuxZipf(tau=0.5, k_aux=4)
    grad = torch.autograd.grad(term(out, sae, stats), sae.b_enc)[0]
    assert torch.all(grad[dead] != 0)
    assert float(term.metrics["dead_reached"]) == 1.0


@pytest.mark.parametrize("values,coverage", [("softplus", 0), ("linear", 0), ("softplus", 4), ("relu", 4)])
def test_a_dead_latent_with_only_negative_affinities_gets_a_gradient(values, coverage):
    sae, stats, out = setup(dead_fraction=0.0, B=64, F=96)
    j = 7
    stats.tokens_since_fired[j] = 10_000  # dead
    with torch.no_grad():
        out.z[:, j] = -out.z[:, j].abs() - 0.5  # never positive
    for name, term in (
        ("aux_k", AuxK(k_aux=8)),
        ("aux_zipf", AuxZipf(k_aux=8, tau=0.0, values=values, coverage_tokens=coverage)),
    ):
        loss = term(out, sae, stats)
        g_dec, g_enc = torch.autograd.grad(loss, [sae.W_dec, sae.b_enc], allow_unused=True)
        got = g_dec is not None and bool(g_dec[j].abs().sum() > 0) and bool(g_enc[j] != 0)
        if name == "aux_k":  # the ReLU cut: aux_k cannot move it
            assert not got and float(term.metrics["dead_reached"]) == 0.0
        elif values == "relu":  # coverage alone selects it, but ReLU still drops its values
            assert not got
        else:
            assert got and float(term.metrics["dead_reached"]) == 1.0


def test_coverage_gives_every_dead_latent_its_top_tokens():
    sae, stats, out = setup(dead_fraction=0.5, B=64, F=96)
    dead = stats.dead_mask()
    with torch.no_grad():
        out.z[:, dead] = out.z[:, dead].abs() + 0.01
    plain, covered = AuxZipf(tau=0.0, k_aux=1), AuxZipf(tau=0.0, k_aux=1, coverage_tokens=3)
    plain(out, sae, stats)
    covered(out, sae, stats)
    assert float(covered.metrics["dead_reached"]) == 1.0 > float(plain.metrics["dead_reached"])


def test_aux_zipf_rejects_unknown_values():
    with pytest.raises(ConfigError, match="variant.losses.aux_zipf.values='sometimes'"):
        build_losses({"aux_zipf": {"values": "sometimes"}})
    with pytest.raises(ConfigError, match="variant.losses.aux_zipf.coverage_tokens=-1"):
        build_losses({"aux_zipf": {"coverage_tokens": -1}})


def test_the_pull_term_raises_under_used_affinities_towards_the_cutoff_only():
    sae, stats, out = setup(dead_fraction=0.0, B=128, F=96)
    stats.density.fill_(1e-6)
    term = AuxZipf(tau=0.5, k_aux=2, underused_term="pull")
    loss = term(out, sae, stats)
    g_enc, g_dec = torch.autograd.grad(loss, [sae.b_enc, sae.W_dec], allow_unused=True)
    assert float(loss.detach()) > 0 and g_dec is None  # the decoder is left alone
    assert torch.all(g_enc <= 0) and bool((g_enc < 0).any())  # gradient descent raises b_enc, never lowers it


def grads(loss, sae):
    params = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_pre": sae.b_pre}
    got = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(params.items(), got)}


@pytest.mark.parametrize(
    "term, trains_decoder",
    [
        (AuxK(k_aux=8), True),
        (AuxZipf(k_aux=8, tau=0.0, coverage_tokens=2, values="softplus"), True),  # the dead term alone
        (AuxZipf(k_aux=8, tau=0.5, underused_term="residual", underused_coef=1.0), True),
        (AuxZipf(k_aux=8, tau=0.5, underused_term="pull", underused_coef=1.0), True),  # dead term + pull
    ],
)
def test_auxiliary_terms_never_train_b_pre(term, trains_decoder):
    """No auxiliary term moves b_pre (only the reconstruction does); the residual terms train the
    encoder and the decoder rows of the latents they reach, nothing else."""
    sae, stats, out = setup(dead_fraction=0.3)
    stats.density[~stats.dead_mask()] = 1e-6  # the live latents far below any target too
    g = grads(term(out, sae, stats), sae)
    assert g["b_pre"].abs().sum() == 0
    assert g["W_enc"].abs().sum() > 0 and g["b_enc"].abs().sum() > 0
    reached = g["W_enc"].abs().sum(1) > 0
    assert (g["W_dec"].abs().sum(1) > 0).any() == trains_decoder
    assert not (g["W_dec"].abs().sum(1) > 0)[~reached].any()  # a decoder row only with its encoder row


def test_the_pull_term_trains_the_encoder_only():
    """The pull term on its latent-major pairs: the encoder only, and the value and gradient of
    its formula on the token-major code of the same pairs."""
    from sae_lightning.losses import per_latent_aux_pairs, per_latent_aux_selection, selection_pull_loss

    sae, stats, out = setup(dead_fraction=0.0)
    quota = torch.randint(1, 9, (sae.n_latents,), generator=torch.Generator().manual_seed(2))
    every = torch.ones(sae.n_latents, dtype=torch.bool)
    weights = torch.rand(sae.n_latents, generator=torch.Generator().manual_seed(3))
    loss, latents = selection_pull_loss(out, sae, per_latent_aux_pairs(out, every, quota), weights)
    g = grads(loss, sae)
    assert float(loss.detach()) > 0 and g["W_enc"].abs().sum() > 0
    assert g["W_dec"].abs().sum() == 0 and g["b_pre"].abs().sum() == 0
    sel = per_latent_aux_selection(out, every, quota)  # the same pairs, token-major, through a code
    code = sae.code(out.x, out.z, sel, out.layout, values="linear", train_b_pre=False)
    theta = out.code.values.detach().min().clamp_min(1e-6)
    want = (torch.relu(theta - code.values) / theta * weights[code.latents]).mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for name, value in grads(want, sae).items():
        torch.testing.assert_close(g[name], value, rtol=1e-5, atol=1e-7)
    assert sorted(latents.tolist()) == sorted(code.latents[code.values.detach() < theta].tolist())


def test_per_latent_aux_selection_in_chunks_of_latents_equals_one_chunk():
    """The candidates' columns are read a few latents at a time (never [B, all candidates]):
    the same pairs."""
    from sae_lightning.losses import per_latent_aux_selection

    sae, stats, out = setup(dead_fraction=0.0)
    B = out.x.shape[0]
    g = torch.Generator().manual_seed(0)
    quota = torch.randint(0, 5, (sae.n_latents,), generator=g)
    candidates = torch.rand(sae.n_latents, generator=g) < 0.6
    whole = per_latent_aux_selection(out, candidates, quota, max_elements=B * sae.n_latents)
    chunked = per_latent_aux_selection(out, candidates, quota, max_elements=3 * B)
    assert whole is not None and chunked is not None and whole.rows.numel() > 0
    assert torch.equal(whole.rows, chunked.rows) and torch.equal(whole.cols, chunked.cols)


@pytest.mark.parametrize("term", ["aux_k", "aux_zipf"])
def test_auxiliary_terms_weigh_against_the_reconstruction_alike_at_every_scale(term):
    """total_loss multiplies the auxiliary terms by the reconstruction's units, so the summed
    loss is exactly d · E x² times the normalised one: the same gradients up to that factor,
    the auxiliary terms' weight included (without it aux_k is ~d times weaker under the sum)."""
    sae, stats, out = setup(dead_fraction=0.5)
    sae.x_second_moment.fill_(1.7)
    sae.x_variance.fill_(1.3)
    grads_of = {}
    for scale in ("second_moment", "variance", "sum"):
        losses = build_losses(
            {term: {"coef": 0.5, "tau": 0.5} if term == "aux_zipf" else {"coef": 0.5}, "recon": {"scale": scale}}
        )
        terms = {name: t(out, sae, stats) for name, t in losses.items()}
        assert float(terms[term].detach()) > 0
        loss = total_loss(losses, terms, sae)
        grads_of[scale] = torch.autograd.grad(loss, sae.W_enc, retain_graph=True)[0] / losses["recon"].units(sae)
        expected = {"second_moment": 1.0, "variance": 1.7 / 1.3, "sum": 16 * 1.7}[scale]
        assert float(losses["recon"].units(sae)) == pytest.approx(expected)
    for scale in ("variance", "sum"):
        torch.testing.assert_close(grads_of[scale], grads_of["second_moment"], rtol=1e-4, atol=1e-7)


def test_squared_error_value_residual_and_gradient_equal_the_plain_formula():
    """StepOutput.squared_error: Σ‖x − x̂‖² and x − x̂ (no gradient) computed once; its gradient
    (in fp64, against autograd of the plain formula) for x̂ and x alike."""
    from sae_lightning.losses import _SquaredError

    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 7, generator=g, dtype=torch.float64, requires_grad=True)
    x_hat = torch.randn(40, 7, generator=g, dtype=torch.float64, requires_grad=True)
    sse, e = _SquaredError.apply(x, x_hat)
    assert not e.requires_grad and torch.equal(e, (x - x_hat).detach())
    assert torch.allclose(sse, (x - x_hat).pow(2).sum(), rtol=1e-14)
    torch.autograd.gradcheck(lambda a, b: _SquaredError.apply(a, b)[0], (x, x_hat))
    sae, stats, out = setup()
    first = out.squared_error()
    assert out.squared_error() is first  # once per step
    assert float(first[0].detach()) == pytest.approx(float((out.x - out.x_hat).pow(2).sum().detach()), rel=1e-6)
    for scale in ("second_moment", "variance", "sum"):
        plain = (out.x - out.x_hat).pow(2)
        want = plain.sum(1).mean() if scale == "sum" else plain.mean() / getattr(sae, f"x_{scale}")
        got = build_losses({"recon": {"scale": scale}})["recon"](out, sae, stats)
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        g_got = torch.autograd.grad(got, sae.W_dec, retain_graph=True)[0]
        g_want = torch.autograd.grad(want, sae.W_dec, retain_graph=True)[0]
        torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-7)
