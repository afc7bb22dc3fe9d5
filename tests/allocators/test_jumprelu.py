"""JumpReLU: the straight-through estimator against a hand-written dense reference, the
sparsity term's two modes, the thresholds' start from data, and old imported runs' loading."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.allocators import Mode
from sae_lightning.config import load_config
from sae_lightning.errors import ConfigError
from sae_lightning.losses import total_loss
from sae_lightning.module import SAEModule

from ..conftest import TINY, compose_config

D, F, B, K = 32, 256, 128, 8


class RefJumpReLU(torch.autograd.Function):
    """The paper's JumpReLU with its pseudo-derivative (rectangle kernel of width eps[j])."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return pre * ((pre > theta) & (pre > 0))

    @staticmethod
    def backward(ctx, g):
        pre, theta, eps = ctx.saved_tensors
        fire = ((pre > theta) & (pre > 0)).to(g.dtype)
        kernel = ((pre - theta).abs() < eps / 2).to(g.dtype)
        return g * fire, (-(theta / eps) * kernel * g).sum(0), None


class RefStep(torch.autograd.Function):
    """H(z′ − θ) with the paper's pseudo-derivative: −1/ε·K with respect to θ, none to z′."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta, eps)
        return ((pre > theta) & (pre > 0)).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, theta, eps = ctx.saved_tensors
        kernel = ((pre - theta).abs() < eps / 2).to(g.dtype)
        return None, (-(1 / eps) * kernel * g).sum(0), None


def module(*overrides: str) -> SAEModule:
    cfg = load_config(compose_config(["variant=jumprelu", f"variant.k={K}", *TINY, *overrides]))
    return SAEModule(cfg, D)


def training_loss(m: SAEModule, x: torch.Tensor) -> torch.Tensor:
    out, _ = m.forward_step(x, Mode.BATCH, update=True)
    terms = {name: term(out, m.sae, m.stats) for name, term in m.losses.items()}
    return total_loss(m.losses, terms, m.sae)


@pytest.mark.parametrize("mode", ["target", "penalty"])
def test_straight_through_gradients_equal_a_hand_written_reference(mode):
    torch.manual_seed(0)
    m = module(f"variant.losses.sparsity.mode={mode}", "variant.bandwidth=0.5").double()
    sae, alloc = m.sae, m.allocator
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_pre.normal_(0, 0.1)
        alloc.log_theta.copy_(torch.empty(F).uniform_(-1.5, -0.5).double())
    x = torch.randn(B, D, dtype=torch.float64)
    loss = training_loss(m, x)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in m.named_parameters()}

    # the reference: dense, in plain autograd, the paper's formulas with ε_j = bandwidth·θ_j
    params = {n: p.detach().clone().requires_grad_(True) for n, p in m.named_parameters()}
    W_enc, b_enc, W_dec, b_pre = (params[f"sae.{n}"] for n in ("W_enc", "b_enc", "W_dec", "b_pre"))
    theta = params["allocator.log_theta"].exp()
    eps = (theta * 0.5).detach()
    pre = (x - b_pre) @ W_enc.t() + b_enc
    z = RefJumpReLU.apply(pre, theta, eps)
    recon = (x - (z @ W_dec + b_pre)).pow(2).sum() / B  # recon's default scale: sum
    l0 = RefStep.apply(pre, theta, eps).sum(1).mean()
    sparsity = (l0 / K - 1) ** 2 if mode == "target" else l0 / K
    units = D * sae.x_second_moment  # the recon term's units (losses.total_loss)
    (recon + units * sparsity).backward()
    assert float(loss.detach()) == pytest.approx(float((recon + units * sparsity).detach()), rel=1e-12)
    n_band = int(((pre - theta).abs() < eps / 2).sum())
    assert n_band > 50, "the example must put pairs in the kernel's band"
    for name, p in params.items():
        assert torch.allclose(ours[name], p.grad, rtol=1e-9, atol=1e-12), name
    assert ours["allocator.log_theta"].abs().sum() > 0


def test_without_learning_the_step_is_plain_jumprelu_and_adds_nothing_to_x_hat():
    torch.manual_seed(1)
    m = module()
    x = torch.randn(B, D)
    with torch.no_grad():
        m.allocator.log_theta.fill_(-1.0)
        out, _ = m.forward_step(x, Mode.BATCH)
    train_out, _ = m.forward_step(x, Mode.BATCH, update=True)
    assert out.l0 is None and train_out.l0 is not None
    # the zeros code changes nothing in the forward
    assert torch.equal(out.x_hat, train_out.x_hat.detach())
    pre = m.sae.affinities(x * m.sae.scale)
    fire = (pre > m.allocator.theta) & (pre > 0)
    assert torch.equal(out.code.to_dense() > 0, fire)
    assert float(train_out.l0) == pytest.approx(float(fire.sum()) / B)


def test_theta_init_from_data_gives_l0_k_and_follows_the_encoder_scale():
    torch.manual_seed(2)
    m = module()
    x = torch.randn(2048, D) * 3 + 1
    figures = m.init_from_data(x)
    assert "encoder_scale" in figures
    l0 = m.encode(x, Mode.BATCH).l0_per_token().float().mean()
    assert abs(float(l0) - K) <= 0.05 * K
    fires = m.encode(x, Mode.BATCH).fire_counts()
    assert int((fires == 0).sum()) == 0  # every latent starts at the same rate


def test_a_number_sets_every_threshold():
    m = module("variant.theta_init=0.001")
    assert torch.allclose(m.allocator.theta, torch.full((F,), 1e-3))
    with pytest.raises(ConfigError, match="theta_init"):
        module("variant.theta_init=-1")


def test_sparsity_needs_learned_thresholds():
    with pytest.raises(ConfigError, match="losses.sparsity.*jumprelu"):
        load_config(compose_config(["variant=topk", "+variant.losses.sparsity.mode=target", *TINY]))


def test_the_thresholds_learn_at_their_own_rate():
    m = module("variant.lr_scale=10", "optim.lr=0.001")
    opt = m.configure_optimizers()["optimizer"]
    lrs = sorted(g["initial_lr"] for g in opt.param_groups)  # (before the warm-up's factor)
    assert lrs == pytest.approx([0.001, 0.01])
    assert opt.param_groups[1]["params"] == [m.allocator.log_theta]


def test_an_imported_run_with_a_theta_buffer_loads():
    m = module()
    state = m.state_dict()
    theta = torch.rand(F) + 0.1
    old = {k: v for k, v in state.items() if not k.startswith("allocator.")}
    old["allocator.theta"] = theta
    fresh = module()
    fresh.load_state_dict(old)
    assert torch.allclose(fresh.allocator.theta, theta)
    assert not bool(fresh.allocator.calibrated) and fresh.allocator.thresholds_ready()
    assert torch.allclose(fresh.allocator.current_theta(), theta)
