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
