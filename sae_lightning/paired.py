"""Paired statistics of evaluation figures: a difference between two configurations with a 95 %
interval that combines the spread over training seeds with a bootstrap over evaluation contexts.

A run's reading of a split is kept as per-context sums (:class:`ContextSums`: squared error and
firing count at a few factors of its thresholds, tokens and variance per context), so that any
resample of contexts gives the headline again, FVU at L0 = k, interpolated exactly as on the
whole split. Tokens of one context are correlated; contexts are the unit resampled.

:func:`paired_difference` compares configurations A and B run with the same seeds and scored on
the same contexts: each bootstrap replicate draws seeds with replacement (the pairs (A_s, B_s)
stay together) and contexts with replacement (one draw shared by every run: both sides are read
on the same text), and computes the relative difference of the seed means, 100·(Ā/B̄ − 1) %.
The interval is the replicates' 2.5 and 97.5 percentiles. A difference "excludes zero in the
claimed direction" when the whole interval lies on that side (:meth:`Difference.verdict`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def at_target(points: list[dict[str, float]], x: str, y: str, target: float) -> float:
    """``y`` at ``x`` = ``target``, interpolated linearly in log x and log y between the two
    points (sorted by x) that bracket it; NaN when none do (or a bracket is not positive)."""
    for a, b in zip(points, points[1:]):
        if a[x] <= target <= b[x] and a[x] > 0 and a[y] > 0 and b[y] > 0:
            if b[x] == a[x]:
                return a[y]
            t = (math.log(target) - math.log(a[x])) / (math.log(b[x]) - math.log(a[x]))
            return math.exp(math.log(a[y]) + t * (math.log(b[y]) - math.log(a[y])))
    return float("nan")


@dataclass
class ContextSums:
    """Per-context sums of one rule's reading of a split, at each factor of its thresholds."""

    factors: list[float]
    sse: Tensor  # [C, P] squared error (model units) per context and factor
    nnz: Tensor  # [C, P] latents fired per context and factor
    tokens: Tensor  # [C] tokens per context
    total: Tensor  # [C] Σ ‖x − μ‖² per context (μ: the split's mean)

    def points(self, weights: Tensor | None = None) -> list[dict[str, float]]:
        """(factor, mean L0, FVU) per factor, sorted by L0; ``weights`` [C]: how many times each
        context counts (a bootstrap resample), else once."""
        w = torch.ones(self.sse.shape[0], dtype=torch.float64) if weights is None else weights.double()
        tokens, total = float(w @ self.tokens), float(w @ self.total)
        sse, nnz = (w @ self.sse).tolist(), (w @ self.nnz).tolist()
        pts = [
            {"factor": f, "l0": nnz[i] / max(tokens, 1e-30), "fvu": sse[i] / max(total, 1e-30)}
            for i, f in enumerate(self.factors)
        ]
        return sorted(pts, key=lambda p: p["l0"])

    def fvu_at(self, k: float, weights: Tensor | None = None) -> float:
        """FVU at mean L0 = k, interpolated between the two factors that bracket it
        (:func:`at_target`); with one factor (k per token) its FVU; NaN when no two bracket k."""
        pts = self.points(weights)
        return pts[0]["fvu"] if len(pts) == 1 else at_target(pts, "l0", "fvu", k)

    def as_dict(self) -> dict:
        return {
            "factors": list(self.factors),
            "sse": self.sse.tolist(),
            "nnz": self.nnz.tolist(),
            "tokens": self.tokens.tolist(),
            "total": self.total.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ContextSums:
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls(list(d["factors"]), t(d["sse"]), t(d["nnz"]), t(d["tokens"]), t(d["total"]))


@dataclass
class Difference:
    """A's figure relative to B's, in %: the point estimate and its 95 % interval."""

    pct: float
    low: float
    high: float
    seeds: int
    contexts: int

    def verdict(self, lower_is_better: bool = True) -> str:
        """``A better`` / ``B better`` when the interval excludes 0 on that side, else ``tie``."""
        if self.high < 0:
            return "A better" if lower_is_better else "B better"
        if self.low > 0:
            return "B better" if lower_is_better else "A better"
        return "tie"

    def __str__(self) -> str:
        return f"{self.pct:+.2f} % [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(
    a: list[ContextSums], b: list[ContextSums], k: float, replicates: int = 2000, seed: int = 0
) -> Difference:
    """100·(mean FVU at L0 = k of A / that of B − 1) over seeds paired by position in the two
    lists (seed s of A with seed s of B), with its 95 % interval from a bootstrap over seeds and
    contexts (see the module docstring). Every run must be scored on the same contexts."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired runs: {len(a)} against {len(b)} (each seed needs both sides)")
    C = a[0].sse.shape[0]
    if any(s.sse.shape[0] != C for s in (*a, *b)):
        raise ValueError("paired runs must be scored on the same contexts")
    S = len(a)

    def rel(weights: Tensor | None, seeds: list[int]) -> float:
        fa = [a[s].fvu_at(k, weights) for s in seeds]
        fb = [b[s].fvu_at(k, weights) for s in seeds]
        return 100 * (sum(fa) / sum(fb) - 1)

    point = rel(None, list(range(S)))
    g = torch.Generator().manual_seed(seed)
    reps = []
    for _ in range(replicates):
        seeds = torch.randint(0, S, (S,), generator=g).tolist()
        weights = torch.bincount(torch.randint(0, C, (C,), generator=g), minlength=C)
        value = rel(weights, seeds)
        if math.isfinite(value):
            reps.append(value)
    if not reps:
        return Difference(point, float("nan"), float("nan"), S, C)
    q = torch.quantile(torch.tensor(reps, dtype=torch.float64), torch.tensor([0.025, 0.975], dtype=torch.float64))
    return Difference(point, float(q[0]), float(q[1]), S, C)
