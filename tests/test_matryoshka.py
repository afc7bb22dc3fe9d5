"""The Matryoshka loss: the sum of its prefixes' reconstruction losses computed separately, for
every allocator, dense and blockwise."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.allocators import Mode
from sae_lightning.config import load_config
from sae_lightning.errors import ConfigError
from sae_lightning.losses import Reconstruction, StepOutput, total_loss
from sae_lightning.module import SAEModule
from sae_lightning.sparse import SparseCode

from .conftest import TINY, compose_config

D, F, B = 32, 256, 128
ALLOCATORS = ["topk", "mutual_choice", "feature_choice", "jumprelu"]


def module(variant: str, *overrides: str) -> SAEModule:
    cfg = compose_config(
        [f"variant={variant}", "variant.k=8", *TINY, "+variant.losses.matryoshka.prefixes=[0.0625,0.25]",
         "+variant.losses.matryoshka.weights=[2.0,0.5]", *overrides]
    )  # fmt: skip
    torch.manual_seed(0)
    m = SAEModule(load_config(cfg), D)
    m.init_from_data(torch.randn(1024, D) * 2 + 0.5)
    return m


def separately(m: SAEModule, out: StepOutput) -> float:
    """Σ_i w_i · recon(prefix i), each prefix's code filtered and decoded on its own."""
    dense = out.code.to_dense().detach()
    total = 0.0
    for m_i, w in ((16, 2.0), (64, 0.5)):
        part = dense.clone()
        part[:, m_i:] = 0
        rows, cols = part.nonzero(as_tuple=True)
        code = SparseCode.build(rows, cols, part[rows, cols], B, F)
        x_hat = m.sae.decode(code)
        step = StepOutput(x=out.x, x_hat=x_hat, z=out.z, layout=out.layout, code=code)
        total += w * float(Reconstruction(scale="sum")(step, m.sae, m.stats).detach())
    return total


@pytest.mark.parametrize("blocks", [False, True])
@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_matryoshka_equals_its_prefixes_losses_computed_separately(allocator, blocks):
    m = module(allocator, *(["model.block_latents=64"] if blocks else []))
    x = torch.randn(B, D) * 2 + 0.5
    out, _ = m.forward_step(x, Mode.BATCH, update=True)
    term = m.losses["matryoshka"]
    value = term(out, m.sae, m.stats)
    units = m.losses["recon"].units(m.sae)
    expected = separately(m, out)
    assert expected > 0
    assert float(value * units) == pytest.approx(expected, rel=1e-5)
    # in the total, weighted by its coefficient in the recon term's units
    terms = {name: t(out, m.sae, m.stats) for name, t in m.losses.items()}
    rest = {name: v for name, v in terms.items() if name != "matryoshka"}
    diff = float(total_loss(m.losses, terms, m.sae) - total_loss(m.losses, rest, m.sae))
    assert diff == pytest.approx(term.coef * expected, rel=1e-4)
    # its gradient reaches the prefixes' decoder rows only
    m.zero_grad()
    value.backward()
    g = m.sae.W_dec.grad.abs().sum(1)
    assert float(g[64:].sum()) == 0 and float(g[:64].sum()) > 0


def test_blockwise_and_dense_give_the_same_matryoshka_loss():
    x = torch.randn(B, D) * 2 + 0.5
    values = []
    for blocks in ([], ["model.block_latents=64"]):
        m = module("mutual_choice", *blocks)
        out, _ = m.forward_step(x, Mode.BATCH)
        values.append(float(m.losses["matryoshka"](out, m.sae, m.stats)))
    assert values[0] == pytest.approx(values[1], rel=1e-5)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("prefixes", "[0.5,0.25]", "increasing list of fractions"),
        ("prefixes", "[0.5,1.0]", "each in \\(0, 1\\)"),
        ("weights", "[1.0]", "null or 2 numbers >= 0"),
    ],
)
def test_bad_prefixes_are_refused(key, value, message):
    cfg = compose_config(["variant=matryoshka_topk", *TINY, f"variant.losses.matryoshka.{key}={value}"])
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)
