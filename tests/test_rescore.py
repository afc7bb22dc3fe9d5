"""rescore.py: selections from a low-precision matrix, re-scored, equal the full-precision ones."""

from __future__ import annotations

import copy

import pytest
import torch

from sae_lightning.allocators.base import BatchContext
from sae_lightning.errors import TrainingDiverged
from sae_lightning.rescore import per_column, top_m, topk_rows
from sae_lightning.sae import ExactRanked
from sae_lightning.selection import GlobalTopK, per_column_topk, topk_per_row

from .helpers.selection import blocks_of, triples

B, F = 40, 64


class Gathered:
    """An ``exact`` reading a full-precision matrix [B, F] (token-major)."""

    def __init__(self, z):
        self.z, self.calls = z, 0

    def __call__(self, tokens, latents):
        self.calls += 1
        assert tokens.numel() == torch.unique(tokens * F + latents).numel(), "pairs asked twice"
        return self.z[tokens, latents]

    def latent_rows(self, tokens):
        return self.z[tokens].t()


def matrices(seed=0):
    """(full, low): full-precision values with exact ties (a quarter step on half of the
    entries), and a low-precision view that drops the quarter (ties everywhere: the bf16 case)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(-16, 48, (B, F), generator=g).float()  # every row: more positive entries than candidates
    full = low + 0.25 * torch.randint(0, 2, (B, F), generator=g).float()
    return full, low.bfloat16()


@pytest.mark.parametrize("block", [None, 7, 16])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_rescored_equals_full_precision(block, k):
    full, low = matrices(k)
    want, wv = topk_per_row(full, k)
    exact = Gathered(full)
    got, gv = topk_rows(low if block is None else blocks_of(low, block), k, exact)
    assert exact.calls == 1
    assert triples(got.rows, got.cols, gv) == triples(want.rows, want.cols, wv)  # (order among equal values: any)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.values, gv)
    assert torch.equal(gv, wv)  # each row in value order


@pytest.mark.parametrize("block", [None, 7, 16])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_mutual_choice_rescored_equals_full_precision(block, k):
    full, low = matrices(10 + k)
    want, wv = GlobalTopK()(full, k * B)
    got, gv = top_m(low if block is None else blocks_of(low, block), k * B, Gathered(full))
    assert torch.equal(got.rows, want.rows) and torch.equal(got.cols, want.cols)
    assert torch.equal(gv, wv) and torch.equal(got.values, wv)
    plain, _ = GlobalTopK()(low, k * B)
    assert not (torch.equal(plain.rows, want.rows) and torch.equal(plain.cols, want.cols))


@pytest.mark.parametrize("block", [None, 7, 16])
def test_feature_choice_rescored_equals_full_precision(block):
    full, low = matrices(3)
    g = torch.Generator().manual_seed(1)
    m = torch.randint(0, B + 1, (F,), generator=g)
    m[:3] = torch.tensor([0, B, 1])
    zt, lt = full.t().contiguous(), low.t().contiguous()
    want = per_column_topk(zt, m)
    exact = Gathered(full)
    got = per_column(lt if block is None else blocks_of(lt, block, "latent"), m, exact)
    # the same positive entries (the code's; a latent whose capacity exceeds its positive entries
    # takes other non-positive ones: the int16 view does not rank those) and the same number
    positive = [(j, t, v) for j, t, v in triples(*want[:3]) if v > 0]
    assert [e for e in triples(*got[:3]) if e[2] > 0] == positive and len(positive) > F
    assert got[0].numel() == want[0].numel()
    cut = want[3] > 0  # the cutoffs: exact values where positive (what the threshold EMA reads)
    assert torch.equal(got[3][cut], want[3][cut]) and int(cut.sum()) > F // 2
    assert torch.equal(got[3][m == 0], want[3][m == 0])  # -inf
    for j in range(F):  # each latent's entries in value order
        v = got[2][got[0] == j]
        assert torch.all(v[1:] <= v[:-1])


def test_rescored_low_precision_alone_would_differ():
    """The fixture is a real test of the re-scoring: without it, the low-precision selections
    differ from the full-precision ones."""
    full, low = matrices(5)
    a, _ = topk_per_row(full, 5)
    b, _ = topk_per_row(low.float(), 5)
    assert not torch.equal(a.cols, b.cols)


@pytest.mark.parametrize("where", ["candidate", "elsewhere"])
def test_rescored_selection_stops_on_nan(where):
    full, low = matrices(7)
    r, c = (0, int(torch.argmax(low[0].float()))) if where == "candidate" else (0, int(torch.argmin(low[0].float())))
    full[r, c] = float("nan")
    low[r, c] = float("nan")  # a NaN of the product is NaN in either precision
    exact = Gathered(full)
    with pytest.raises(TrainingDiverged):
        topk_rows(low, 5, exact)
    with pytest.raises(TrainingDiverged):
        top_m(low, 5 * B, exact)
    with pytest.raises(TrainingDiverged):
        per_column(low.t().contiguous(), torch.full((F,), 4), exact)


# ---- the module: model.affinity_dtype=bfloat16 against float32 -------------------------------
def _modules(variant, block=None, extra=()):
    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    from .conftest import TINY, compose_config

    config = load_config(compose_config([*TINY, f"variant={variant}", "variant.k=8", *extra]))
    full = SAEModule(config, 32)
    full.affinity_dtype = torch.float32  # not auto: float32 on any machine
    dm = config.data.build()
    sample = dm.sample(1024)
    grad = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)) if full.gradient_ranking else None
    full.init_from_data(sample, grad)
    with torch.no_grad():
        full.stats.tokens_since_fired[:40] = 10**9  # dead: aux_k's and aux_zipf's dead terms
        full.stats.density[40:80] = 1e-6  # under-used: aux_zipf's pull term
    full.model_spec = copy.deepcopy(full.model_spec)
    full.model_spec.block_latents = block
    low = copy.deepcopy(full)
    low.affinity_dtype = torch.bfloat16
    return full, low, dm


@pytest.mark.parametrize("block", [None, 48])
@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_a_bfloat16_training_step_equals_the_float32_one(variant, block):
    """The same pairs, loss terms (with dead and under-used latents), gradients and allocator
    state (threshold EMA, Feature Choice's demand) as the fp32 step, dense and blockwise; the
    bf16 matrix is what selection read (its plain bf16 pairs differ)."""
    full, low, dm = _modules(variant, block)
    x = dm.batch_of()(0)
    outs = {}
    for name, module in (("full", full), ("low", low)):
        for _ in range(3):  # the EMA and demand move every step
            module.zero_grad()
            out, _ = module.forward_step(x, update=True)
            terms = {n: term(out, module.sae, module.stats) for n, term in module.losses.items()}
            sum(terms.values()).backward()
        outs[name] = (out, terms, {n: p.grad.clone() for n, p in module.named_parameters()})
    (fo, ft, fg), (lo, lt, lg) = outs["full"], outs["low"]
    z = lo.z if isinstance(lo.z, torch.Tensor) else next(iter(lo.z))[1]
    assert z.dtype == torch.bfloat16
    if block is None:  # the allocator alone: re-scored, the fp32 pairs; without, other pairs
        want = full.allocator.allocate(fo.z, BatchContext(step=3))
        got = low.allocator.allocate(lo.z, BatchContext(step=3, exact=ExactRanked(low.sae, lo.x)))
        plain = low.allocator.allocate(lo.z, BatchContext(step=3))
        assert torch.equal(got.rows, want.rows) and torch.equal(got.cols, want.cols)
        assert not (torch.equal(plain.rows, want.rows) and torch.equal(plain.cols, want.cols))
    assert torch.equal(fo.code.offsets, lo.code.offsets) and torch.equal(fo.code.latents, lo.code.latents)
    assert torch.allclose(fo.code.values, lo.code.values, rtol=1e-5, atol=1e-6)
    for n in ft:
        assert torch.allclose(ft[n], lt[n], rtol=1e-5, atol=1e-7), n
    for n in fg:
        assert torch.allclose(fg[n], lg[n], rtol=1e-4, atol=1e-6), n
    for n, buf in full.allocator.named_buffers():
        other = dict(low.allocator.named_buffers())[n]
        assert torch.allclose(buf.float(), other.float(), rtol=1e-5, atol=1e-7), n


@pytest.mark.parametrize("extra", ["model.decoder_norm=unit", "model.normalisation=layernorm"])
@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_bfloat16_equals_float32_with_other_model_settings(variant, extra):
    """A unit-norm decoder (z′ ranked without decoder norms) and layernorm inputs: the same pairs
    and values as fp32."""
    full, low, dm = _modules(variant, extra=[extra])
    x = dm.batch_of()(0)
    a, _ = full.forward_step(x, update=True)
    b, _ = low.forward_step(x, update=True)
    assert b.z.dtype == torch.bfloat16
    assert torch.equal(a.code.offsets, b.code.offsets) and torch.equal(a.code.latents, b.code.latents)
    assert torch.allclose(a.code.values, b.code.values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["mutual_choice", "feature_choice"])
def test_bfloat16_threshold_mode_and_calibration_read_float32(variant):
    full, low, dm = _modules(variant)
    cal = dm.calibration_tokens()
    full.calibrate(cal)
    low.calibrate(cal)
    assert torch.equal(full.allocator.theta_calibrated, low.allocator.theta_calibrated)
    x = dm.batch_of()(0)
    a, b = full.encode(x, mode="threshold"), low.encode(x, mode="threshold")
    assert torch.equal(a.latents, b.latents) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_bfloat16_gradient_ranking_equals_float32(variant):
    """g-SAE scores re-scored: the same pairs as the fp32 ranking of the weighted scores."""
    full, low, dm = _modules(variant, extra=["variant.gradient_ranking.beta=2"])
    x = dm.batch_of()(0)
    g = torch.Generator().manual_seed(0)
    grad = torch.randn(x.shape, generator=g)
    a, _ = full.forward_step(x, grad=grad)
    b, _ = low.forward_step(x, grad=grad)
    plain, _ = full.forward_step(x)
    assert not torch.equal(a.code.latents, plain.code.latents)  # the ranking changed the pairs
    assert torch.equal(a.code.offsets, b.code.offsets) and torch.equal(a.code.latents, b.code.latents)
    assert torch.allclose(a.code.values, b.code.values, rtol=1e-5, atol=1e-6)  # the affinities, not the scores


@pytest.mark.parametrize("nan", [float("nan"), -float("nan")])
def test_a_non_finite_encoder_stops_a_bfloat16_step(nan):
    """The int16 view ranks a NaN anywhere (a negative NaN below every positive value), so
    the re-scored step checks the encoder it came from: one error naming the step and the tensor."""
    full, low, dm = _modules("mutual_choice")
    with torch.no_grad():
        low.sae.W_enc[5, 2] = nan
    with pytest.raises(TrainingDiverged, match=r"non-finite affinities .* at step 0 \(not finite: sae\.W_enc"):
        low.forward_step(dm.batch_of()(0))


def test_auto_affinity_dtype_follows_the_hardware(monkeypatch):
    """auto: bf16 selection on a CPU with a bf16 product in hardware (AMX tiles or AVX512_BF16),
    fp32 without one and on other devices, with the reason; an explicit setting is kept."""
    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule
    from sae_lightning.sae import auto_affinity_dtype

    from .conftest import TINY, compose_config

    def cpu(amx: bool, avx512_bf16: bool) -> None:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)

    cpu(amx=True, avx512_bf16=True)
    assert auto_affinity_dtype(torch.device("cpu")) == torch.bfloat16
    assert auto_affinity_dtype(torch.device("cuda")) == torch.float32
    module = SAEModule(load_config(compose_config([*TINY])), 32)
    assert module.model_spec.affinity_dtype == "auto" and module.selection_dtype() == torch.bfloat16
    assert "AMX" in module.selection_dtype_reason()
    cpu(amx=False, avx512_bf16=True)  # an AMD EPYC (Zen 4): bf16 in hardware without AMX
    assert module.selection_dtype() == torch.bfloat16 and "AVX512_BF16" in module.selection_dtype_reason()
    cpu(amx=False, avx512_bf16=False)
    assert module.selection_dtype() == torch.float32 and "no bf16 product" in module.selection_dtype_reason()
    pinned = SAEModule(load_config(compose_config([*TINY, "model.affinity_dtype=bfloat16"])), 32)
    assert pinned.selection_dtype() == torch.bfloat16
    assert pinned.selection_dtype_reason() == "model.affinity_dtype=bfloat16"


def test_latent_value_token_order_with_ties():
    """Entries ordered by latent, value descending, then token, with many equal values (and
    -0 equal to +0, and negative values)."""
    from sae_lightning.rescore import _latent_value_token_order

    g = torch.Generator().manual_seed(0)
    n = 500
    lat = torch.randint(0, 7, (n,), generator=g)
    tok = torch.randperm(n, generator=g)
    values = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
    values[values == 0] = torch.tensor([0.0, -0.0])[torch.randint(0, 2, (int((values == 0).sum()),), generator=g)]
    order = _latent_value_token_order(lat, tok, values)
    got = list(zip(lat[order].tolist(), values[order].tolist(), tok[order].tolist()))
    want = sorted(zip(lat.tolist(), values.tolist(), tok.tolist()), key=lambda e: (e[0], -e[1], e[2]))
    assert got == want
    distinct = torch.rand(n, generator=g)  # no ties: the one-sort path
    order = _latent_value_token_order(lat, tok, distinct)
    assert list(zip(lat[order].tolist(), distinct[order].tolist())) == sorted(
        zip(lat.tolist(), distinct.tolist()), key=lambda e: (e[0], -e[1])
    )


@pytest.mark.parametrize("tokens,n", [(4096, 100), (4096, 10), (4098, 100)])  # stride 4: ≥ n / < n / not dividing B
def test_feature_choice_demand_sample_exact_equals_the_matrix(tokens, n):
    """Feature Choice's demand sample from a low-precision matrix and ``exact``: the fp32
    sample's top k/F share (hence its cutoff θ) with the fp32 matrix's own values, -inf only
    where an entry cannot reach it; its counts on the first n tokens are the fp32 matrix's, θ
    among the sampled entries included (not above itself), and θ ≤ 0 read from exact columns;
    only the entries near θ re-scored."""
    from sae_lightning.allocators.feature_choice import _demand_sample

    z = torch.randn(tokens, F, generator=torch.Generator().manual_seed(0))
    exact = Gathered(z)
    want = _demand_sample(z.t().contiguous(), n)
    got = _demand_sample(z.t().to(torch.bfloat16).contiguous(), n, exact, top=0.05)
    keep = int(0.05 * want.sample.numel())
    assert torch.equal(torch.topk(got.sample, keep).values, torch.topk(want.sample, keep).values)
    assert got.n == want.n == n and bool(torch.isinf(got.sample).any())
    sampled = torch.topk(want.sample, keep).values
    for theta in [sampled[-1], sampled[3], torch.tensor(0.5), torch.tensor(3.0), torch.tensor(0.0), torch.tensor(-1.0)]:
        assert torch.equal(got.count_above(theta), want.count_above(theta))
    asked: list[int] = []
    counted = _demand_sample(z.t().to(torch.bfloat16).contiguous(), n, _Counting(exact, asked), top=0.05)
    assert asked[0] < want.sample.numel() // 4  # the sample: the candidates for its top 5 % only
    counted.count_above(torch.tensor(0.5))
    assert 0 < asked[-1] < n * F // 10  # the counts: a few near θ, not the first n tokens' columns


class _Counting:
    """An ``exact`` that records how many pairs each call asks for."""

    def __init__(self, inner, asked):
        self.inner, self.asked = inner, asked

    def __call__(self, tokens, latents):
        self.asked.append(tokens.numel())
        return self.inner(tokens, latents)

    def latent_rows(self, tokens):
        return self.inner.latent_rows(tokens)


def test_topk_rescored_widens_rows_whose_band_reaches_past_the_candidates():
    """A row whose k-th low-precision value is shared by more entries than its candidates hold
    (the band reaches past them) is taken again wider: the full-precision top-k still, found
    among all its tied entries."""
    g = torch.Generator().manual_seed(5)
    low = torch.zeros(B, F)
    low[:, :3] = torch.tensor([9.0, 8.0, 7.0])
    low[:, 3:50] = 5.0  # the k-th value, shared by 47 entries: past k + row_margin(k) = 12, 24
    low[::2, 3:] = low[::2, 3:].flip(1)  # (on half the rows at the other end)
    full = low + torch.rand(B, F, generator=g) * 0.5  # distinct, the same order between levels
    k = 4
    exact = Gathered(full)
    got, vals = topk_rows(low, k, exact)
    want, wv = topk_per_row(full, k)
    assert torch.equal(got.rows, want.rows) and torch.equal(got.cols, want.cols) and torch.equal(vals, wv)
    assert exact.calls > 1  # the first candidates, then the rows again, wider
