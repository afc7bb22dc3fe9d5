"""Allocator invariants of method.md §2, on random inputs with ties and non-positive values."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.allocators import ALLOCATORS, get_allocator_class
from sae_lightning.allocators.base import BatchContext
from sae_lightning.errors import ConfigError
from sae_lightning.sparse import SparseCode

from ..helpers.selection import assert_row_major_unique, counts_per_col, counts_per_row


def make(name, k, F, B, **params):
    return get_allocator_class(name).from_dict({"k": k, **params}, F, B)


def in_layout(alloc, z):
    """z is written token-major in the tests; hand it over in the allocator's layout."""
    return z if alloc.layout == "token" else z.t().contiguous()


def allocate(alloc, z, **kwargs):
    return alloc.allocate(in_layout(alloc, z), BatchContext(**kwargs))


def threshold(alloc, z):
    return alloc.threshold(in_layout(alloc, z))


def affinities(kind: str, B: int, F: int) -> torch.Tensor:
    if kind == "positive":
        return torch.rand(B, F) + 0.1
    if kind == "mixed":  # about half non-positive, scale varying by token
        return torch.randn(B, F) * torch.rand(B, 1) * 3
    if kind == "ties":  # few distinct values, zeros and negatives among them
        return torch.randint(-2, 4, (B, F)).float()
    raise ValueError(kind)


KINDS = ["positive", "mixed", "ties"]


@pytest.mark.parametrize("kind", KINDS)
def test_topk_keeps_the_k_largest_of_each_row(kind):
    B, F, k = 64, 200, 7
    z = affinities(kind, B, F)
    sel = allocate(make("topk", k, F, B), z)
    assert_row_major_unique(sel, F)
    assert torch.all(counts_per_row(sel) == k)
    picked = torch.sort(z[sel.rows, sel.cols].view(B, k), dim=1, descending=True).values
    assert torch.equal(picked, torch.topk(z, k, dim=1).values)


def test_topk_code_has_exactly_k_active_when_all_positive():
    z = affinities("positive", 32, 100)
    code = SparseCode.from_selection(z, allocate(make("topk", 5, 100, 32), z))
    assert torch.all(code.l0_per_token() == 5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("B,F,k", [(64, 300, 5), (17, 40, 3), (128, 64, 16)])
def test_mutual_choice_is_the_global_top_M(kind, B, F, k):
    z = affinities(kind, B, F)
    sel = allocate(make("mutual_choice", k, F, B), z)
    assert_row_major_unique(sel, F)
    M = k * B
    assert sel.rows.numel() == M
    picked = torch.sort(z[sel.rows, sel.cols], descending=True).values
    assert torch.equal(picked, torch.topk(z.flatten(), M).values)


def test_mutual_choice_keeps_exactly_M_when_enough_positive():
    B, F, k = 50, 80, 6
    z = affinities("mixed", B, F)
    assert int((z > 0).sum()) >= k * B
    code = SparseCode.from_selection(z, allocate(make("mutual_choice", k, F, B), z))
    assert code.nnz == k * B
    assert torch.all(code.values > 0)


def test_mutual_choice_with_one_token_equals_topk():
    F, k = 300, 9
    for kind in ("positive", "mixed"):
        z = affinities(kind, 1, F)
        mc = allocate(make("mutual_choice", k, F, 1), z)
        tk = allocate(make("topk", k, F, 1), z)
        assert set(mc.cols.tolist()) == set(tk.cols.tolist())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("capacity", ["uniform", "zipf", "demand"])
def test_feature_choice_columns_take_their_top_m(kind, capacity):
    B, F, k = 96, 160, 6
    fc = make("feature_choice", k, F, B, capacity=capacity)
    z = affinities(kind, B, F)
    sel = allocate(fc, z)
    assert_row_major_unique(sel, F)
    m = fc.capacities(B)
    assert int(m.sum()) == k * B and int(m.max()) <= B
    assert torch.equal(counts_per_col(sel, F), m)  # exactly m_j chosen (≤ m_j active)
    for j in torch.randperm(F)[:20].tolist():
        picked = torch.sort(z[sel.rows[sel.cols == j], j], descending=True).values
        assert torch.equal(picked, torch.topk(z[:, j], int(m[j])).values)
    code = SparseCode.from_selection(z, sel)
    assert torch.all(code.fire_counts() <= m)


def test_feature_choice_with_every_capacity_B_keeps_everything_positive():
    B, F = 40, 30
    z = affinities("mixed", B, F)
    fc = make("feature_choice", F, F, B)  # k = F: M = F·B, every m_j = B
    assert torch.all(fc.capacities(B) == B)
    code = SparseCode.from_selection(z, allocate(fc, z))
    assert code.nnz == int((z > 0).sum())


def test_feature_choice_zipf_capacities_are_water_filled():
    B, F, k = 256, 1000, 32
    fc = make("feature_choice", k, F, B, capacity="zipf", zipf_alpha=1.0)
    m = fc.capacity_by_rank
    assert int(m.sum()) == k * B
    assert int(m.max()) == B  # the head is capped at the batch
    assert torch.all(m[:-1] >= m[1:])  # non-increasing in rank


def test_feature_choice_by_density_ranks_by_demand_and_follows_a_boosted_latent():
    """Under Feature Choice every latent fires m_j/B of the time, so ranking by its density
    would never change anything; by_density ranks by demand (affinities above the batch's
    Mutual Choice cutoff), which a latent's affinities move."""
    B, F, k = 256, 64, 4
    fc = make(
        "feature_choice",
        k,
        F,
        B,
        capacity="zipf",
        rank="by_density",
        rerank_every_steps=1,
        demand_time_constant_tokens=1,
    )  # the demand EMA follows the last batch
    z = torch.randn(B, F, generator=torch.Generator().manual_seed(0))
    z[:, 17] += 3.0  # latent 17 matches many tokens strongly
    z[:, 5] -= 3.0  # latent 5 matches none
    allocate(fc, z, step=0, update=True)
    m = fc.capacities(B)
    assert int(m[17]) == int(m.max()) > int(m.min()) == int(m[5])
    z[:, 17] -= 6.0
    z[:, 40] += 3.0  # now 40 is boosted instead
    allocate(fc, z, step=1, update=True)
    m2 = fc.capacities(B)
    assert int(m2[40]) == int(m2.max()) and int(m2[17]) == int(m2.min())
    assert int(m2.sum()) == k * B


def test_feature_choice_zipf_from_a_run_uses_its_fitted_shape(tmp_path):
    import json

    (tmp_path / "metrics.json").write_text(json.dumps({"val/zipf_fit_alpha": 0.7, "val/zipf_fit_beta": 3.0}))
    fitted = make("feature_choice", 4, 200, 128, capacity="zipf", zipf_from=str(tmp_path))
    direct = make("feature_choice", 4, 200, 128, capacity="zipf", zipf_alpha=0.7, zipf_beta=3.0)
    assert torch.equal(fitted.capacity_by_rank, direct.capacity_by_rank)
    with pytest.raises(ConfigError, match=r"variant\.zipf_from=.* a finished run folder"):
        make("feature_choice", 4, 200, 128, capacity="zipf", zipf_from=str(tmp_path / "nowhere"))
    # with uniform capacities the ranking has nothing to change: no demand is tracked, no re-rank
    uniform = make("feature_choice", 4, 200, 128, capacity="uniform", rank="by_density")
    z = torch.randn(128, 200)
    z[:, 7] += 5
    allocate(uniform, z, step=0, update=True)
    assert torch.equal(uniform.rank_to_latent, torch.arange(200))


def demand_fc(B=256, F=64, k=4, **params):
    fc = make("feature_choice", k, F, B, capacity="demand", demand_time_constant_tokens=1, **params)
    z = torch.randn(B, F, generator=torch.Generator().manual_seed(0))
    z[:, 17] += 3.0  # latent 17 matches many tokens strongly: it is in demand
    z[:, 5] -= 3.0  # latent 5 matches none
    return fc, z


@pytest.mark.parametrize("floor", [0.25, 1.0, 0.0])
def test_feature_choice_demand_capacities_sum_to_the_budget_within_bounds(floor):
    """capacity=demand: E[m_j] ∝ demand, water-filled, floor ≤ E[m_j] ≤ B, Σ = k·B; each step's
    m_j (stochastic rounding) sums to k·B exactly, is within 1 of E[m_j], and the selection
    takes exactly those m_j."""
    B, F, k = 256, 64, 4
    fc, z = demand_fc(B, F, k, demand_floor=floor)
    sel = allocate(fc, z, step=0, update=True)
    x = fc.expected_capacities(B)
    assert abs(float(x.sum()) - k * B) < 1e-6 and float(x.max()) <= B + 1e-9 and float(x.min()) >= floor - 1e-9
    assert int(x.argmax()) == 17 and float(x[5]) == pytest.approx(floor, abs=1e-6)  # the floor, no more
    draws = torch.stack([fc.training_capacities(B, step) for step in range(400)]).to(torch.float64)
    assert torch.all(draws.sum(1) == k * B) and int(draws.max()) <= B and torch.all(draws >= int(floor))
    assert torch.all((draws - x).abs() < 1)
    assert torch.allclose(draws.mean(0), x, atol=0.1)  # unbiased: the floor's 1/4 token is spent 1 step in 4
    m = fc.training_capacities(B, 7)
    sel = allocate(fc, z, step=7, update=True)
    assert torch.equal(counts_per_col(sel, F), fc.training_capacities(B, 7)) and torch.equal(
        m, fc.training_capacities(B, 7)
    )
    evaluation = fc.capacities(B)  # validation and inference: deterministic
    assert int(evaluation.sum()) == k * B and torch.equal(evaluation, fc.capacities(B))


def test_feature_choice_demand_rounding_is_fixed_by_the_run_seed_and_step():
    a, z = demand_fc()
    b, _ = demand_fc()
    b.load_state_dict(a.state_dict())  # a resumed run: the same buffers, the rounding seed among them
    allocate(a, z, step=0, update=True)
    allocate(b, z, step=0, update=True)
    assert torch.equal(a.training_capacities(256, 5), b.training_capacities(256, 5))
    assert any(not torch.equal(a.training_capacities(256, 5), a.training_capacities(256, s)) for s in range(6, 12))
    c, _ = demand_fc()
    c.rounding_seed.fill_(int(a.rounding_seed) + 1)
    allocate(c, z, step=0, update=True)
    assert any(not torch.equal(a.training_capacities(256, s), c.training_capacities(256, s)) for s in range(5, 12))


def test_feature_choice_demand_floor_must_fit_the_budget():
    with pytest.raises(ConfigError, match=r"variant\.demand_floor=5\.0.*at most k·B/F = 4"):
        make("feature_choice", 4, 64, 64, capacity="demand", demand_floor=5.0)


def test_feature_choice_zipf_default_floor_is_one_token_where_the_budget_allows_it():
    """Zipf capacities, min_capacity null: every latent a token where k·B >= F; a dictionary wider than the budget
    (F = 512 > k·B = 4·64) trains with no floor, the budget still spent exactly; an explicit
    floor that does not fit is refused, naming the key."""
    fits = make("feature_choice", 4, 64, 64, capacity="zipf")
    assert int(fits.capacity_by_rank.min()) >= 1 and int(fits.capacity_by_rank.sum()) == 4 * 64
    wide = make("feature_choice", 4, 512, 64, capacity="zipf")
    assert int(wide.capacity_by_rank.min()) == 0 and int(wide.capacity_by_rank.sum()) == 4 * 64
    sel = allocate(wide, affinities("positive", 64, 512), step=0, update=True)
    assert sel.rows.numel() == 4 * 64
    with pytest.raises(ConfigError, match=r"variant\.k=4.*a floor of 1 for 512 latents"):
        make("feature_choice", 4, 512, 64, capacity="zipf", min_capacity=1)


def test_feature_choice_mc_warmup_uses_mutual_choice_first():
    B, F, k = 32, 64, 4
    fc = make("feature_choice", k, F, B, mc_warmup_steps=10)
    z = torch.randn(B, F)
    z[0] += 5  # one token would take many latents under MC, never under FC's uniform m_j
    warm = allocate(fc, z, step=3, update=True)
    after = allocate(fc, z, step=10, update=True)
    mc = allocate(make("mutual_choice", k, F, B), z)
    assert torch.equal(warm.rows, mc.rows) and torch.equal(warm.cols, mc.cols)
    assert torch.equal(counts_per_col(after, F), fc.capacities(B))


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_threshold_mode_selects_exactly_the_values_above_threshold(name):
    B, F = 20, 50
    alloc = make(name, 4, F, B)
    z = affinities("mixed", B, F)
    sel = threshold(alloc, z)
    if alloc.has_thresholds:
        theta = alloc.current_theta()
        expected = in_layout(alloc, z) > (theta if alloc.layout == "token" else theta.unsqueeze(1))
        expected = (expected if alloc.layout == "token" else expected.t()) & (z > 0)
        got = torch.zeros(B, F, dtype=torch.bool)
        got[sel.rows, sel.cols] = True
        assert torch.equal(got, expected)
    else:
        assert torch.all(counts_per_row(sel) == 4)


@pytest.mark.parametrize("name", sorted(ALLOCATORS))
def test_k_must_be_positive_and_at_most_n_latents(name):
    with pytest.raises(ConfigError, match="variant.k"):
        make(name, 0, 10, 4)
    with pytest.raises(ConfigError, match="variant.k=11.*n_latents = 10"):
        make(name, 11, 10, 4)


def test_unknown_allocator_parameter_is_named():
    with pytest.raises(ConfigError, match="variant.capacityy"):
        make("feature_choice", 2, 10, 4, capacityy="zipf")
    with pytest.raises(ConfigError, match="variant.capacity='pareto'.*'uniform', 'zipf'"):
        make("feature_choice", 2, 10, 4, capacity="pareto")


@pytest.mark.parametrize("capacity", ["zipf", "uniform"])
def test_feature_choice_calibration_takes_each_latents_rate_on_the_held_out_tokens(capacity):
    """θ_j is the (q_j + 1)-th largest of latent j's held-out affinities (0 when q_j = N), with
    q_j = round(E[m_j]·N/B): the sort-based reference, on values with ties, in small chunks."""
    from sae_lightning.allocators.base import CalibrationSet

    F, B, N = 40, 16, 48
    fc = make("feature_choice", 4, F, B, capacity=capacity, min_capacity=0)
    g = torch.Generator().manual_seed(0)
    z = torch.randint(-3, 6, (N, F), generator=g).float() / 2  # ties, zeros, negatives
    cal = CalibrationSet(torch.zeros(N, 1), lambda xs, cols: z[:, cols], F, max_elements=N * 7)
    fc.calibrate(cal)
    m = fc.expected_capacities(B)
    want = torch.round(m * N / B).long().clamp(max=N)
    zs = torch.sort(z.t(), dim=1, descending=True).values
    padded = torch.cat([zs, torch.zeros(F, 1)], 1)
    reference = padded.gather(1, want.unsqueeze(1)).squeeze(1).clamp_min(0.0)
    assert (want > 0).any() and (want < N).any()
    assert torch.equal(fc.theta_calibrated, reference)
