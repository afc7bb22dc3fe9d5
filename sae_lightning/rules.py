"""Inference rules: how a trained SAE is read token by token, whatever allocator trained it.

Training allocates over a batch; inference reads one token at a time, by a rule:

- ``topk``: every token its k largest affinities (TopK's rule);
- ``global_threshold``: one threshold θ for every latent (Mutual Choice's calibration: θ is the
  value above which k·N of the N calibration tokens' affinities lie);
- ``latent_thresholds``: one θ_j per latent (Feature Choice's calibration), set so that latent j
  fires on the calibration tokens as often as the SAE's own training allocation makes it fire
  there (a Feature Choice SAE: its expected capacities, exactly its own calibration; any other:
  the counts of its batch allocation on those tokens).

Each threshold rule is then scaled by the one factor that makes the mean L0 on the calibration
tokens exactly k. The rule an SAE's own allocator implies (:func:`own_rule`) uses its own
calibrated thresholds, so its figures are the run's threshold mode. Scoring a split
(:func:`score`) keeps per-context sums at a few factors of θ around L0 = k, from which the
headline, FVU at L0 = k, is interpolated (as the validation does), for the whole split or for
a bootstrap resample of its contexts (paired.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .allocators import Mode
from .allocators.base import CalibratedThresholds, l0_matching_scale, latent_cutoffs, threshold_l0
from .allocators.mutual_choice import global_threshold_for_rate
from .blockwise import above_thresholds
from .description_length import description_length
from .errors import require_choice
from .paired import ContextSums, at_target
from .rescore import topk_rows
from .sparse import SparseCode

RULES = ("topk", "global_threshold", "latent_thresholds")
SPREAD = (0.9, 0.95, 1.0, 1.05, 1.1)  # factors around the one that gives L0 = k on the scored tokens


def own_rule(module) -> str:
    """The rule a run's threshold mode applies: TopK's k per token, Mutual Choice's one θ, or a
    θ per latent (Feature Choice)."""
    allocator = module.allocator
    if not isinstance(allocator, CalibratedThresholds):
        return "topk"
    return "global_threshold" if allocator.theta_calibrated.dim() == 0 else "latent_thresholds"


def rules_of(module, asked: str) -> list[str]:
    """The rules ``asked`` names: one of RULES, ``own`` (:func:`own_rule`) or ``all``."""
    require_choice("--rule", asked, ["own", "all", *RULES])
    if asked == "all":
        return list(RULES)
    return [own_rule(module) if asked == "own" else asked]


@dataclass
class Reader:
    """An inference rule set up for one SAE: θ (None: k per token) and k."""

    rule: str
    theta: Tensor | None
    k: int
    l0_calibration: float  # mean L0 on the calibration tokens (k, up to what the ReLU drops)

    def selections(self, z, factors: list[float], device: torch.device | str = "cpu"):
        """The selections of affinities ``z`` (a matrix or blocks) at θ times each factor."""
        if self.theta is None:
            return [topk_rows(z, self.k)[0]]
        return above_thresholds(z, [self.theta.to(device) * f for f in factors], "token")

    def encode(self, module, factor: float = 1.0) -> Callable[[Tensor], tuple[SparseCode, object]]:
        """tokens (model units) -> (their code by this rule at θ·factor, the normalisation context)."""

        def run(x: Tensor) -> tuple[SparseCode, object]:
            xn, ctx = module.sae.normalise(x.to(module.device))
            z = module.affinities(xn, "token")
            return module.sae.code(xn, z, self.selections(z, [factor], module.device)[0], "token"), ctx

        return run


@torch.no_grad()
def batch_counts(module, x: Tensor) -> Tensor:
    """How often each latent fires on tokens ``x`` under the SAE's training allocation (batches
    of the run's batch size)."""
    counts = torch.zeros(module.sae.n_latents, dtype=torch.float64)
    for chunk in x.to(module.device).split(module.batch_size):
        counts += module.forward_step(chunk, Mode.BATCH)[0].code.fire_counts().double().cpu()
    return counts


@torch.no_grad()
def reader(module, rule: str, calibration: Tensor) -> Reader:
    """``rule`` set up for ``module`` on the calibration tokens (model units)."""
    require_choice("rule", rule, list(RULES))
    k = module.k
    if rule == "topk":
        return Reader(rule, None, k, float(k))
    cal = module._calibration_set(calibration)
    allocator = module.allocator
    if rule == own_rule(module) and allocator.thresholds_ready():
        theta = allocator.current_theta("calibrated").detach().float().cpu().clone()
    elif rule == "global_threshold":
        theta = torch.tensor(global_threshold_for_rate(cal, float(k))[0])
    else:
        theta = latent_cutoffs(cal, batch_counts(module, calibration).round().long())
    theta = theta * l0_matching_scale(cal, theta, k)
    return Reader(rule, theta, k, threshold_l0(cal, theta))


@torch.no_grad()
def score(module, rd: Reader, x: Tensor, contexts: Tensor, spread: tuple[float, ...] = SPREAD) -> ContextSums:
    """Per-context sums of tokens ``x`` (model units) read by ``rd``: at θ times 1 and times
    ``spread`` around the factor that gives L0 = k on ``x`` itself (a threshold rule), or at
    k per token (topk). ``contexts``: each token's context id."""
    if rd.theta is None:
        factors = [1.0]
    else:
        on_x = l0_matching_scale(module._calibration_set(x), rd.theta, rd.k)
        factors = sorted({1.0, *(on_x * c for c in spread)})
    ids, inverse = torch.unique(contexts, return_inverse=True)
    C, P = ids.numel(), len(factors)
    sse = torch.zeros(C, P, dtype=torch.float64)
    nnz = torch.zeros(C, P, dtype=torch.float64)
    x = x.to(module.device)
    mean = x.double().mean(0)
    total = torch.zeros(C, dtype=torch.float64).index_add_(0, inverse, (x.double() - mean).pow(2).sum(1).cpu())
    tokens = torch.zeros(C, dtype=torch.float64).index_add_(0, inverse, torch.ones(x.shape[0], dtype=torch.float64))
    start = 0
    for chunk in x.split(module.batch_size):
        where = inverse[start : start + chunk.shape[0]]
        start += chunk.shape[0]
        xn, ctx = module.sae.normalise(chunk)
        z = module.affinities(xn, "token")
        for i, sel in enumerate(rd.selections(z, factors, module.device)):
            code = module.sae.code(xn, z, sel, "token")
            x_hat = module.sae.denormalise(module.sae.decode(code), ctx)
            err = (chunk.double() - x_hat.double()).pow(2).sum(1).cpu()
            sse[:, i].index_add_(0, where, err)
            nnz[:, i].index_add_(0, where, code.l0_per_token().double().cpu())
    return ContextSums(factors=factors, sse=sse, nnz=nnz, tokens=tokens, total=total)


@torch.no_grad()
def token_spread(module, rd: Reader, x: Tensor, factor: float = 1.0, wide: float = 2.0) -> dict[str, Any]:
    """How ``rd`` at θ·``factor`` spreads the latents over tokens ``x`` (model units), and where its
    error lies: the FVU, the mean L0 and its quantiles (10, 50, 90, 99 %), the share of tokens
    given more than ``wide``·k latents and their share of the squared error, and the FVU of the
    other tokens alone (against the same total variance). A threshold rule at mean L0 = k can
    still give most tokens few latents and some many; on an SAE trained to fire k per token
    (TopK) those few take most of the error (docs/results.md)."""
    err_parts, l0_parts = [], []
    for chunk in x.to(module.device).split(module.batch_size):
        code, ctx = rd.encode(module, factor)(chunk)
        x_hat = module.sae.denormalise(module.sae.decode(code), ctx)
        err_parts.append((chunk.double() - x_hat.double()).pow(2).sum(1).cpu())
        l0_parts.append(code.l0_per_token().double().cpu())
    err, l0 = torch.cat(err_parts), torch.cat(l0_parts)
    xd = x.double().cpu()
    total = float((xd - xd.mean(0)).pow(2).sum())
    many = l0 > wide * rd.k
    q = torch.quantile(l0, torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "fvu": float(err.sum()) / total,
        "l0_mean": float(l0.mean()),
        "l0_quantiles": dict(zip(("10", "50", "90", "99"), q)),
        "wide": wide,
        "tokens_over_wide": float(many.double().mean()),
        "error_share_over_wide": float(err[many].sum() / err.sum()) if float(err.sum()) > 0 else 0.0,
        "fvu_others": float(err[~many].sum()) / total,
    }


@torch.no_grad()
def dl_at_k(module, rd: Reader, x: Tensor, sums: ContextSums, tolerance: float = 0.01) -> float:
    """The description length (bits per token) of ``x`` read by ``rd`` at L0 = k: topk's own; a
    threshold rule's at the factor of ``sums`` that gives L0 = k on ``x`` (score() measures
    there), else interpolated, as FVU is, between the two factors whose L0 bracket k."""
    points = sums.points()
    near = min(points, key=lambda p: abs(p["l0"] - rd.k))
    if rd.theta is None or abs(near["l0"] - rd.k) <= 1e-3 * rd.k:
        return description_length(module, x, rd.encode(module, near["factor"]), tolerance)["description_length"]
    for a, b in zip(points, points[1:]):
        if a["l0"] <= rd.k <= b["l0"]:
            da = description_length(module, x, rd.encode(module, a["factor"]), tolerance)["description_length"]
            db = description_length(module, x, rd.encode(module, b["factor"]), tolerance)["description_length"]
            return at_target([{**a, "dl": da}, {**b, "dl": db}], "l0", "dl", rd.k)
    return float("nan")


@torch.no_grad()
def dl_curve(module, rd: Reader, x: Tensor, sums: ContextSums, tolerance: float = 0.01) -> list[dict[str, float]]:
    """The description length, L0 and FVU of ``x`` read by ``rd`` at each factor of ``sums`` (a
    threshold rule) or at k′ = round(k·c) per token for c in SPREAD (topk), sorted by FVU: the
    DL-against-FVU curve that the MDL-SAE comparison reads at a common FVU (:func:`dl_at_fvu`)."""
    if rd.theta is None:
        readers = [(Reader(rd.rule, None, max(1, round(rd.k * c)), float("nan")), 1.0) for c in SPREAD]
    else:
        readers = [(rd, p["factor"]) for p in sums.points()]
    curve = []
    for r, factor in readers:
        got = description_length(module, x, r.encode(module, factor), tolerance)
        l0 = float(r.k) if r.theta is None else next(p["l0"] for p in sums.points() if p["factor"] == factor)
        curve.append({"factor": factor, "k": r.k, "l0": l0, "fvu": got["dl_fvu"], "dl": got["description_length"]})
    return sorted(curve, key=lambda p: p["fvu"])


def dl_at_fvu(curve: list[dict[str, float]], fvu: float) -> float:
    """The description length at FVU = ``fvu`` on a curve (:func:`dl_curve`), interpolated linearly
    in log FVU and log DL between the two points that bracket it; NaN outside the curve."""
    return at_target(sorted(curve, key=lambda p: p["fvu"]), "fvu", "dl", fvu)


def evaluate_rules(
    module,
    calibration: Tensor,
    x: Tensor,
    contexts: Tensor,
    rules: list[str],
    dl: tuple[str, ...] = (),
    curve: tuple[str, ...] = (),
) -> dict[str, dict]:
    """Every rule of ``rules`` set up on the calibration tokens and scored on ``x``: per rule its
    figures (FVU at L0 = k, the L0 and FVU at the calibrated factor, the calibration L0; for the
    rules in ``dl`` the description length at L0 = k, for those in ``curve`` the DL-against-FVU
    curve along the factor sweep) and its per-context sums (``sums``, for paired statistics)."""
    out = {}
    for rule in rules:
        rd = reader(module, rule, calibration)
        sums = score(module, rd, x, contexts)
        at_one = next(p for p in sums.points() if p["factor"] == 1.0)
        figures: dict[str, Any] = {
            "fvu_at_k": sums.fvu_at(rd.k) if rd.theta is not None else at_one["fvu"],
            "fvu_calibrated": at_one["fvu"],
            "l0_calibrated": at_one["l0"],
            "l0_calibration_tokens": rd.l0_calibration,
            "contexts": sums.sse.shape[0],
            "tokens": int(sums.tokens.sum()),
        }
        if rule in dl:
            figures["dl_at_k"] = dl_at_k(module, rd, x, sums)
        if rule in curve:
            figures["dl_curve"] = dl_curve(module, rd, x, sums)
        out[rule] = {"figures": figures, "sums": sums.as_dict()}
    return out
