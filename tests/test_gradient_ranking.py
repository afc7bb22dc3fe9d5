"""Gradient-aware ranking (g-SAE): β = 0 is the plain allocator, a gradient that singles out a
latent gets it selected, the values stay the affinities, blockwise equals dense."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_lightning.allocators import Mode
from sae_lightning.config import load_config
from sae_lightning.module import SAEModule

from .conftest import TINY, compose_config

VARIANTS = ["topk", "mutual_choice", "feature_choice"]


def module_for(variant: str, *extra: str) -> tuple[SAEModule, object]:
    config = load_config(compose_config([*TINY, f"variant={variant}", "variant.k=8", *extra]))
    dm = config.data.build()
    module = SAEModule(config, 32)
    x = dm.sample(1024)
    grad = torch.randn_like(x) if module.gradient_ranking is not None else None
    module.init_from_data(x, grad)
    return module, dm


def step(module: SAEModule, batch):
    """One training step's code, loss terms and parameter gradients (no optimiser)."""
    module.zero_grad()
    x, grad = batch if isinstance(batch, tuple) else (batch, None)
    out, _ = module.forward_step(x, Mode.BATCH, update=True, grad=grad)
    terms = {n: term(out, module.sae, module.stats) for n, term in module.losses.items()}
    sum(terms.values()).backward()
    return out.code, terms, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", VARIANTS)
def test_beta_zero_is_the_plain_allocator_exactly(variant):
    """variant.gradient_ranking.beta=0 given (x, ∇ₓL) batches: the same pairs, values, loss
    terms and gradients as the plain variant given x, bitwise, and no extra state."""
    plain, dm = module_for(variant)
    zero, _ = module_for(variant, "variant.gradient_ranking.beta=0")
    zero.load_state_dict(plain.state_dict())
    assert zero.gradient_ranking is None and plain.state_dict().keys() == zero.state_dict().keys()
    for j in range(3):
        x = dm.batch_of()(j)
        a, b = step(plain, x), step(zero, (x, torch.randn_like(x) * 100))
        assert torch.equal(a[0].offsets, b[0].offsets) and torch.equal(a[0].latents, b[0].latents)
        assert torch.equal(a[0].values, b[0].values)
        assert all(torch.equal(a[1][n], b[1][n]) for n in a[1])
        assert all(torch.equal(a[2][n], b[2][n]) for n in a[2])


def orthogonal_latent(module: SAEModule, j: int) -> torch.Tensor:
    """Make latent j's decoder direction orthogonal to every other latent's (e_0, the others
    without their e_0 component): a gradient along it weights latent j alone."""
    with torch.no_grad():
        W = module.sae.W_dec
        W[:, 0] = 0
        W.div_(W.norm(dim=1, keepdim=True))
        W[j] = 0
        W[j, 0] = 1
    return W[j].clone()


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_gradient_along_one_latent_gets_it_selected_with_its_affinity(variant):
    module, dm = module_for(variant, "variant.gradient_ranking.beta=1000")
    x = dm.batch_of()(0)
    j = 5
    direction = orthogonal_latent(module, j)
    plain = module.forward_step(x, Mode.BATCH)[0]
    z = plain.z
    assert isinstance(z, torch.Tensor)
    zj = z[:, j] if module.allocator.layout == "token" else z[j]
    chosen = set(plain.code.token_index()[plain.code.latents == j].tolist())
    # tokens where latent j has a positive affinity but the plain allocator leaves it out
    candidates = [i for i in torch.argsort(zj).tolist() if zj[i] > 0 and i not in chosen]
    assert candidates, "the test needs a positive affinity the plain allocator does not select"
    i = candidates[0]
    grad = torch.zeros_like(x)
    grad[i] = direction * 50  # the gradient of token i points along latent j alone
    out = module.forward_step(x, Mode.BATCH, grad=grad)[0]
    rows, latents, values = out.code.token_index(), out.code.latents, out.code.values
    hit = (rows == i) & (latents == j)
    assert int(hit.sum()) == 1, f"{variant}: token {i} did not get latent {j}"
    # its value is the plain affinity (the ranking changed, not the code), ReLU'd as ever
    aff = module.sae.exact_affinities(out.x, torch.tensor([i]), torch.tensor([j]))
    torch.testing.assert_close(values[hit].detach(), aff)
    # without gradients (validation, inference) the same module allocates as the plain one
    again = module.forward_step(x, Mode.BATCH)[0]
    assert torch.equal(again.code.latents, plain.code.latents)


@pytest.mark.parametrize("variant", VARIANTS)
def test_blockwise_gradient_ranking_equals_dense(variant):
    dense, dm = module_for(variant, "variant.gradient_ranking.beta=2")
    blocked = copy.deepcopy(dense)
    blocked.model_spec = copy.deepcopy(dense.model_spec)
    blocked.model_spec.block_latents = 48
    dense.model_spec = copy.deepcopy(dense.model_spec)
    dense.model_spec.block_latents = None
    x = dm.batch_of()(1)
    g = torch.randn_like(x)
    a, b = step(dense, (x, g)), step(blocked, (x, g))
    assert torch.equal(a[0].offsets, b[0].offsets) and torch.equal(a[0].latents, b[0].latents)
    torch.testing.assert_close(a[0].values, b[0].values, rtol=1e-5, atol=1e-6)
    for n in a[2]:
        torch.testing.assert_close(a[2][n], b[2][n], rtol=1e-4, atol=1e-6)
    # and a real change from the plain ranking at this β
    plain = dense.forward_step(x, Mode.BATCH)[0].code
    assert not torch.equal(plain.latents, a[0].latents)


def test_gradient_scale_is_set_from_the_sample_and_saved():
    module, dm = module_for("topk", "variant.gradient_ranking.beta=1")
    x = dm.sample(1024)
    g = torch.randn_like(x) * 3e-3
    module.init_from_data(x, g)
    want = float((g / module.sae.scale).pow(2).mean().sqrt())
    assert module.gradient_ranking is not None
    assert float(module.gradient_ranking.grad_rms) == pytest.approx(want, rel=1e-5)
    assert "gradient_ranking.grad_rms" in module.state_dict()
    # the ranking does not depend on the gradients' units: ×1000 gives the same pairs
    batch = dm.batch_of()(0)
    gb = torch.randn_like(batch)
    first = module.forward_step(batch, Mode.BATCH, grad=gb)[0].code.latents
    module.init_from_data(x, g * 1000)
    assert torch.equal(module.forward_step(batch, Mode.BATCH, grad=gb * 1000)[0].code.latents, first)
