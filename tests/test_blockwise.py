"""Blockwise selection (a block of latents at a time) equals the dense kernels: the same pairs
and values for TopK, Mutual Choice, Feature Choice and thresholds, at block sizes that divide F
and that do not, with values tied at the cut, and NaN stops both."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.allocators.base import BatchContext
from sae_lightning.blockwise import (
    AffinityBlocks,
    per_column_topk_blocks,
    threshold_selection_blocks,
    top_m_blocks,
    topk_per_row_blocks,
)
from sae_lightning.errors import TrainingDiverged
from sae_lightning.selection import GlobalTopK, per_column_topk, threshold_selection, topk_per_row

from .helpers.selection import blocks_of, triples

B, F = 32, 50
BLOCKS = [1, 7, 16, 50, 64]


def inputs():
    g = torch.Generator().manual_seed(0)
    yield "continuous", torch.randn(B, F, generator=g)
    yield "tied", torch.randint(-2, 4, (B, F), generator=g).float()  # runs of equal values at every cut


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("k", [1, 5, 12])
def test_blockwise_topk_equals_dense(block, k):
    for name, z in inputs():
        dense, dv = topk_per_row(z, k)
        got, gv = topk_per_row_blocks(blocks_of(z, block), k)
        assert triples(got.rows, got.cols, gv) == triples(dense.rows, dense.cols, dv), name


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("k", [1, 5, 12])
def test_blockwise_mutual_choice_equals_dense(block, k):
    for name, z in inputs():
        dense, dv = GlobalTopK()(z, k * B)
        got, gv = top_m_blocks(blocks_of(z, block), k * B)
        assert triples(got.rows, got.cols, gv) == triples(dense.rows, dense.cols, dv), name
        assert torch.all(got.rows[1:] >= got.rows[:-1])  # token-major


@pytest.mark.parametrize("block", BLOCKS)
def test_blockwise_feature_choice_equals_dense(block):
    g = torch.Generator().manual_seed(1)
    m = torch.randint(0, B + 1, (F,), generator=g)
    m[:2] = torch.tensor([0, B])
    for name, z in inputs():
        zt = z.t().contiguous()
        lat, tok, val, cut = per_column_topk(zt, m)
        blat, btok, bval, bcut = per_column_topk_blocks(blocks_of(zt, block, "latent"), m)
        assert triples(blat, btok, bval) == triples(lat, tok, val), name
        assert torch.equal(bcut, cut)


@pytest.mark.parametrize("block", BLOCKS)
def test_blockwise_threshold_selection_equals_dense(block):
    for name, z in inputs():
        for theta in (torch.tensor(0.5), torch.linspace(-1, 2, F)):
            dense = threshold_selection(z, theta)
            got = threshold_selection_blocks(blocks_of(z, block), theta)
            assert torch.equal(got.rows, dense.rows) and torch.equal(got.cols, dense.cols), name
            zt = z.t().contiguous()
            dense = threshold_selection(zt, theta, "latent")
            got = threshold_selection_blocks(blocks_of(zt, block, "latent"), theta)
            assert torch.equal(got.rows, dense.rows) and torch.equal(got.cols, dense.cols), name


@pytest.mark.parametrize("block", [7, 50])
def test_several_thresholds_in_one_pass_over_the_blocks(block):
    """An L0 sweep's selections (several θ) from one pass: each equals its dense selection."""
    from sae_lightning.blockwise import above_thresholds

    z = torch.randn(B, F)
    calls = []
    blocks = AffinityBlocks(lambda cols: calls.append(cols) or z[:, cols], B, F, block, "token")
    thetas = [torch.tensor(0.3), torch.linspace(-1, 2, F), torch.full((F,), 1.0)]
    got = above_thresholds(blocks, thetas)
    assert len(calls) == -(-F // block)  # each block once
    for sel, theta in zip(got, thetas):
        dense = threshold_selection(z, theta)
        assert torch.equal(sel.rows, dense.rows) and torch.equal(sel.cols, dense.cols)


@pytest.mark.parametrize("block", [7, 16])
def test_blockwise_selection_stops_on_nan_as_the_dense_one(block):
    z = torch.randn(B, F)
    z[3, 41] = float("nan")  # in the last block
    for dense, blockwise in (
        (lambda: topk_per_row(z, 5), lambda: topk_per_row_blocks(blocks_of(z, block), 5)),
        (lambda: GlobalTopK()(z, 5 * B), lambda: top_m_blocks(blocks_of(z, block), 5 * B)),
        (
            lambda: per_column_topk(z.t().contiguous(), torch.full((F,), 4)),
            lambda: per_column_topk_blocks(blocks_of(z.t().contiguous(), block, "latent"), torch.full((F,), 4)),
        ),
    ):
        with pytest.raises(TrainingDiverged):
            dense()
        with pytest.raises(TrainingDiverged):
            blockwise()


# ---- the module: a training step and threshold inference with model.block_latents ------------
@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_a_blockwise_training_step_equals_the_dense_one(variant):
    """model.block_latents = 48 (F = 256, not a multiple): the same pairs, loss terms (aux_k /
    aux_zipf with dead and under-used latents) and gradients as the dense step; threshold mode
    and the calibration the same pairs too."""
    import copy

    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    from .conftest import TINY, compose_config

    config = load_config(compose_config([*TINY, f"variant={variant}", "variant.k=8"]))
    dense = SAEModule(config, 32)
    dm = config.data.build()
    dense.init_from_data(dm.sample(1024))
    with torch.no_grad():
        dense.stats.tokens_since_fired[:40] = 10**9  # dead: aux_k's and aux_zipf's dead terms
        dense.stats.density[40:80] = 1e-6  # under-used: aux_zipf's pull term
    blocked = copy.deepcopy(dense)
    blocked.model_spec.block_latents = 48
    dense.model_spec = copy.deepcopy(dense.model_spec)
    dense.model_spec.block_latents = None
    x = dm.batch_of()(0)
    outs = {}
    for name, module in (("dense", dense), ("blocked", blocked)):
        out, _ = module.forward_step(x, update=True)
        terms = {n: term(out, module.sae, module.stats) for n, term in module.losses.items()}
        sum(terms.values()).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        outs[name] = (out.code, terms, grads)
    assert isinstance(blocked.affinities(x, "token"), __import__("sae_lightning").blockwise.AffinityBlocks)
    (dc, dt, dg), (bc, bt, bg) = outs["dense"], outs["blocked"]
    assert torch.equal(dc.offsets, bc.offsets) and torch.equal(dc.latents, bc.latents)
    assert torch.allclose(dc.values, bc.values, rtol=1e-5, atol=1e-6)
    assert dt.keys() == bt.keys() and len(dt) >= 2 - (variant == "feature_choice")
    for n in dt:
        assert torch.allclose(dt[n], bt[n], rtol=1e-5, atol=1e-7), n
    for n in dg:
        assert torch.allclose(dg[n], bg[n], rtol=1e-4, atol=1e-6), n
    if variant != "topk":
        cal = dm.calibration_tokens()
        dense.calibrate(cal)
        blocked.calibrate(cal)
        assert torch.allclose(dense.allocator.theta_calibrated, blocked.allocator.theta_calibrated)
        a, b = dense.encode(x, mode="threshold"), blocked.encode(x, mode="threshold")
        assert torch.equal(a.latents, b.latents) and torch.equal(a.offsets, b.offsets)


@pytest.mark.parametrize("capacity", ["zipf", "demand"])
def test_blockwise_feature_choice_demand_equals_dense_in_one_pass(capacity):
    """Feature Choice's demand over training steps (an MC warm-up step, re-ranking steps and
    steps between): blockwise it is bitwise the dense one, so are the pairs; where the step's
    selection does not read demand (zipf between re-rankings), its sample is taken in the
    selection's own pass: every block is computed once."""
    import copy

    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    from .conftest import TINY, compose_config

    overrides = [*TINY, "variant=feature_choice", "variant.k=8", f"variant.capacity={capacity}"]
    overrides += ["variant.rerank_every_steps=2", "variant.mc_warmup_steps=1", "model.n_latents=300"]
    dense = SAEModule(load_config(compose_config(overrides)), 32).allocator
    blocked = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(0)
    Bn = 513  # the demand sample's stride (2) does not divide the blocks' starts
    for step in range(5):
        zt = torch.randn(300, Bn, generator=g) + torch.linspace(-1, 1, 300).unsqueeze(1)
        computed = []

        def block_of(cols, zt=zt, computed=computed):
            computed.append(cols.start)
            return zt[cols].clone()

        blocks = AffinityBlocks(block_of, Bn, 300, 48, "latent")
        a = dense.allocate(zt, BatchContext(step=step, update=True))
        b = blocked.allocate(blocks, BatchContext(step=step, update=True))
        assert torch.equal(a.rows, b.rows) and torch.equal(a.cols, b.cols), step
        assert torch.equal(dense.demand, blocked.demand), step
        assert torch.equal(dense.rank_to_latent, blocked.rank_to_latent), step
        reads_demand = step >= 1 and (capacity == "demand" or step % 2 == 0)
        assert len(computed) == 7 * (2 if reads_demand else 1), (step, computed)
    assert not torch.equal(dense.demand, torch.full_like(dense.demand, 8 / 300))  # demand moved


def test_auto_blocks_only_a_matrix_too_large_to_hold(monkeypatch):
    """model.block_latents=auto: the dense matrix up to AUTO_DENSE_ELEMENTS entries, else blocks
    of AUTO_BLOCK_ELEMENTS // B latents; an integer is used as given, null is always dense."""
    from sae_lightning import module as module_mod
    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    from .conftest import TINY, compose_config

    m = SAEModule(load_config(compose_config([*TINY, "variant=topk", "variant.k=8"])), 32)
    assert m.model_spec.block_latents == "auto"
    assert m.block_latents(128) is None  # 128 · 256 entries
    monkeypatch.setattr(module_mod, "AUTO_DENSE_ELEMENTS", 128 * 256 - 1)
    monkeypatch.setattr(module_mod, "AUTO_BLOCK_ELEMENTS", 128 * 50)
    assert m.block_latents(128) == 50
    assert isinstance(m.affinities(torch.randn(128, 32), "token"), AffinityBlocks)
    m.model_spec.block_latents = None
    assert m.block_latents(128) is None
    m.model_spec.block_latents = 64
    assert m.block_latents(128) == 64
