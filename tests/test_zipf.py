import pytest
import torch

from sae_lightning.zipf import (
    fit_zipf,
    round_preserving_sum,
    uniform_capacities,
    waterfill,
    zipf_capacities,
    zipf_targets,
    zipf_weights,
)


def test_waterfill_sums_to_total_and_respects_the_cap():
    w = zipf_weights(1000, 1.0, 0.0)
    x = waterfill(w, 5000.0, 64.0)
    assert float(x.sum()) == pytest.approx(5000.0)
    assert float(x.max()) <= 64.0 + 1e-9
    capped = x >= 64.0 - 1e-9
    assert capped[:3].all() and not capped[-1]
    free = ~capped  # the uncapped part keeps the Zipf shape
    ratio = x[free] / w[free]
    assert float(ratio.max() - ratio.min()) < 1e-6 * float(ratio.mean())


def test_waterfill_infeasible_and_full():
    w = zipf_weights(10, 1.0, 0.0)
    with pytest.raises(ValueError, match="infeasible"):
        waterfill(w, 101.0, 10.0)
    assert torch.all(waterfill(w, 100.0, 10.0) == 10.0)


def test_round_preserving_sum_keeps_total_and_cap():
    x = torch.tensor([3.7, 2.2, 1.1, 0.5, 0.5])
    m = round_preserving_sum(x, 8, 3)
    assert int(m.sum()) == 8 and int(m.max()) <= 3


def test_uniform_capacities_hand_out_the_remainder_first():
    m = uniform_capacities(5, 12)
    assert m.tolist() == [3, 3, 2, 2, 2]


def test_zipf_capacities_exact_budget():
    m = zipf_capacities(300, 32 * 50, 50, 1.2, 2.0)
    assert int(m.sum()) == 1600 and int(m.max()) <= 50 and torch.all(m[:-1] >= m[1:])


def test_zipf_targets_follow_density_rank():
    density = torch.tensor([0.01, 0.5, 0.1, 0.0])
    t = zipf_targets(density, k=1.5, alpha=1.0, beta=0.0)
    assert float(t.sum()) == pytest.approx(1.5, rel=1e-5)
    assert t[1] > t[2] > t[0] > t[3]
    assert float(t.max()) <= 1.0


def test_fit_zipf_recovers_alpha_and_beta():
    r = torch.arange(1, 2001, dtype=torch.float64)
    density = 0.3 * (r + 10.0).pow(-1.3)
    alpha, beta, c, r2 = fit_zipf(density[torch.randperm(2000)], tail_fraction=0.0, betas=(0.0, 10.0, 100.0))
    assert alpha == pytest.approx(1.3, rel=1e-6) and beta == 10.0 and r2 > 0.999999


def test_a_capacity_floor_leaves_no_latent_without_tokens():
    # 4096 latents, k = 16, B = 1024: with α = 1 the plain water-filling gives the tail ranks
    # under half a token, which rounds to 0 (those latents can never fire)
    plain = zipf_capacities(4096, 16 * 1024, 1024, 1.0, 0.0)
    assert int((plain == 0).sum()) > 0
    floored = zipf_capacities(4096, 16 * 1024, 1024, 1.0, 0.0, floor=1)
    assert int(floored.min()) == 1 and int(floored.sum()) == 16 * 1024 and int(floored.max()) <= 1024
    assert bool((floored[:-1] >= floored[1:]).all())  # still non-increasing by rank
    with pytest.raises(ValueError):
        zipf_capacities(100, 50, 10, 1.0, 0.0, floor=1)


def test_stochastic_round_is_unbiased_and_keeps_the_total():
    from sae_lightning.zipf import stochastic_round

    g = torch.Generator().manual_seed(0)
    x = torch.rand(300, generator=g, dtype=torch.float64) * 5
    x = x / x.sum() * 600
    x[0] = 7.0  # at the cap
    total = round(float(x.sum()))
    mean = torch.zeros_like(x)
    for _ in range(1000):
        m = stochastic_round(x, total, 7, float(torch.rand((), generator=g)))
        assert int(m.sum()) == total and int(m.max()) <= 7 and bool(((m - x).abs() < 1).all())
        mean += m / 1000
    assert float((mean - x).abs().max()) < 0.08
