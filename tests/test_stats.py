import math

import torch

from sae_lightning.stats import LatentStats


def test_dead_counts_tokens_not_steps():
    s = LatentStats(4, k=1, dead_window_tokens=1000, density_time_constant_tokens=500, underused_ratio=0.5)
    fires = torch.tensor([3, 0, 1, 0])
    s.update(fires, 600)
    assert not s.dead_mask().any()
    s.update(torch.tensor([1, 0, 0, 0]), 600)  # latents 1, 3 silent for 1200 tokens; 2 for 600
    assert s.dead_mask().tolist() == [False, True, False, True]
    assert int(s.tokens_seen) == 1200


def test_density_ema_time_constant_in_tokens():
    s = LatentStats(2, k=1, dead_window_tokens=10, density_time_constant_tokens=1000, underused_ratio=0.5)
    start = float(s.density[0])
    s.update(torch.tensor([100, 0]), 1000)  # one time constant at rate 0.1
    a = 1 - math.exp(-1)
    assert abs(float(s.density[0]) - (start + a * (0.1 - start))) < 1e-6
    # the same tokens in ten batches land in the same place (to first order in a)
    t = LatentStats(2, k=1, dead_window_tokens=10, density_time_constant_tokens=1000, underused_ratio=0.5)
    for _ in range(10):
        t.update(torch.tensor([10, 0]), 100)
    assert abs(float(t.density[0]) - float(s.density[0])) < 1e-6


def test_underused_includes_dead_and_low_density():
    s = LatentStats(4, k=1, dead_window_tokens=10, density_time_constant_tokens=10, underused_ratio=0.5)
    s.density.copy_(torch.tensor([0.5, 0.3, 0.001, 0.2]))
    s.tokens_since_fired[3] = 50
    under = s.underused_mask()
    assert under.tolist() == [False, False, True, True]
    assert 0 < s.summary()["underused_fraction"] <= 1


def perfect_dictionary_density(n_tokens: int = 20_000) -> torch.Tensor:
    """The firing densities of a perfect SAE of the synthetic data: one latent per true
    feature, firing exactly where that feature is active."""
    from sae_lightning.data.synthetic import SyntheticActivations, SyntheticSpec

    spec = SyntheticSpec()
    src = SyntheticActivations(spec)
    g = torch.Generator().manual_seed(1)
    n_active = torch.exp(math.log(spec.active_median) + spec.active_sigma * torch.randn(n_tokens, generator=g))
    n_active = n_active.round().clamp(1, spec.active_max).long()
    idx = torch.searchsorted(src.cdf, torch.rand(n_tokens, spec.active_max, generator=g)).clamp_(
        max=spec.n_features - 1
    )
    keep = (torch.arange(spec.active_max).unsqueeze(0) < n_active.unsqueeze(1)).float()
    active = torch.zeros(n_tokens, spec.n_features).scatter_add_(1, idx, keep) > 0
    return active.float().mean(0)


def stats_with(density: torch.Tensor, reference: str = "fitted") -> LatentStats:
    s = LatentStats(
        density.numel(), k=round(float(density.sum())), dead_window_tokens=10**6,
        density_time_constant_tokens=10, underused_ratio=0.25, underused_reference=reference,
    )  # fmt: skip
    s.density.copy_(density)
    return s


def test_a_perfect_dictionary_has_no_underused_latents():
    """The metric is relative to the run's own density curve: the synthetic data's true
    features (frequencies ~ rank^-0.6) score ~0 %, and so does a steep healthy curve that the
    fixed Zipf(1) reference calls largely under-used."""
    perfect = perfect_dictionary_density()
    assert stats_with(perfect).summary()["underused_fraction"] <= 0.005
    steep = 0.5 * torch.arange(1, 2049, dtype=torch.float32).pow(-2.0)
    assert stats_with(steep).summary()["underused_fraction"] == 0.0
    assert stats_with(steep, "zipf").summary()["underused_fraction"] > 0.5


def test_underused_finds_latents_planted_below_the_curve():
    density = perfect_dictionary_density()
    planted = torch.randperm(density.numel(), generator=torch.Generator().manual_seed(0))[:50]
    density[planted] /= 20  # far below where their rank's neighbours are
    s = stats_with(density)
    under = s.underused_metric_mask()
    assert under[planted].float().mean() >= 0.9  # most of them (some land among the rarest anyway)
    assert int(under.sum()) <= 60
    s.tokens_since_fired[3] = 10**7  # a dead latent is under-used whatever its density
    assert bool(s.underused_metric_mask()[3])
