"""Paired statistics (paired.py): per-context sums give the headline for any resample, and the
bootstrap interval of a difference contains 0 for identical runs and excludes it for a clearly
better one."""

from __future__ import annotations

import math

import pytest
import torch

from sae_lightning.module import fvu_at_l0
from sae_lightning.paired import ContextSums, paired_difference


def sums(seed: int, quality: float = 1.0, contexts: int = 64, factors=(0.9, 1.0, 1.1)) -> ContextSums:
    """A stand-in reading: per-context error that falls with L0 (more latents at a lower factor),
    scaled by ``quality`` (< 1: a better SAE), with context-to-context noise drawn by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((contexts,), 100.0, dtype=torch.float64)
    total = 100 * (1 + 0.3 * torch.rand(contexts, generator=g, dtype=torch.float64))
    l0 = torch.tensor([36.0, 32.0, 28.0], dtype=torch.float64)  # factors 0.9, 1, 1.1
    base = 0.2 * total * (1 + 0.2 * torch.randn(contexts, generator=g, dtype=torch.float64)).clamp_min(0.1)
    sse = quality * base.unsqueeze(1) * (32.0 / l0).unsqueeze(0)
    nnz = (
        tokens.unsqueeze(1) * l0.unsqueeze(0) * (1 + 0.01 * torch.randn(contexts, 3, generator=g, dtype=torch.float64))
    )
    return ContextSums(list(factors), sse, nnz, tokens, total)


def test_the_headline_from_sums_is_the_validations_interpolation():
    s = sums(0)
    points = s.points()
    assert [p["l0"] for p in points] == sorted(p["l0"] for p in points)
    assert s.fvu_at(32) == pytest.approx(fvu_at_l0(points, 32), rel=1e-12)
    # a resample that counts every context once is the whole split
    assert s.fvu_at(32, torch.ones(64)) == pytest.approx(s.fvu_at(32), rel=1e-12)
    assert math.isnan(s.fvu_at(100))  # no two factors bracket it
    back = ContextSums.from_dict(s.as_dict())
    assert back.fvu_at(32) == s.fvu_at(32)


def test_two_identical_configurations_differ_by_an_interval_around_zero():
    a = [sums(s) for s in range(3)]
    d = paired_difference(a, [sums(s) for s in range(3)], 32, replicates=500)
    assert d.pct == 0 and d.low <= 0 <= d.high and d.verdict() == "tie"


def test_same_sae_with_other_seeds_is_a_tie():
    """Seed noise alone (different per-context errors, equal in expectation) is not a win."""
    d = paired_difference([sums(s) for s in range(3)], [sums(10 + s) for s in range(3)], 32, replicates=500)
    assert d.low < 0 < d.high and d.verdict() == "tie", d


def test_a_clearly_better_configuration_excludes_zero_in_its_direction():
    a = [sums(s, quality=0.9) for s in range(3)]
    b = [sums(10 + s) for s in range(3)]
    d = paired_difference(a, b, 32, replicates=500)
    assert d.high < 0 and d.verdict() == "A better" and -15 < d.pct < -5, d
    assert paired_difference(b, a, 32, replicates=500).verdict() == "B better"
    assert d.seeds == 3 and d.contexts == 64 and "%" in str(d)


def test_pairs_must_match():
    with pytest.raises(ValueError, match="each seed needs both sides"):
        paired_difference([sums(0)], [sums(0), sums(1)], 32)
    with pytest.raises(ValueError, match="same contexts"):
        paired_difference([sums(0)], [sums(1, contexts=32)], 32)
