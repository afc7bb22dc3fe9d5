"""Evaluation metrics as torchmetrics objects (sum-reduced states, so they are exact under
DDP), SAEBench's core reconstruction and sparsity figures among them, plus feature recovery
against known ground-truth features and absorption on data with a known feature hierarchy."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from .registry import Registry
from .sparse import SparseCode

VALIDATION_METRICS = Registry("validation metric")


class ValidationMetric(Metric):
    """The seam for a validation figure: a registered subclass (``@validation_metric("name")``)
    is built for every mode of a validation (:meth:`build`), sees each batch's tokens, their
    reconstruction in model units and the code (:meth:`observe`), and reports scalars
    (:meth:`figures`), which the module logs as ``val/<mode>/<key>`` and metrics.json keeps.
    As any torchmetrics ``Metric`` it also defines ``update`` (which :meth:`observe` calls) and
    ``compute``, and its states are reduced across ranks."""

    name: ClassVar[str]
    # the columns it adds to the run's summary table: title -> the cell, from one mode's figures
    # ({key: value}, this metric's keys among them); none: metrics.json and TensorBoard only
    summary: ClassVar[dict[str, Callable[[dict[str, float]], str]]] = {}

    @classmethod
    def build(cls, d_model: int, n_latents: int) -> ValidationMetric:
        raise NotImplementedError

    def observe(self, x: Tensor, x_hat: Tensor, code: SparseCode) -> None:
        raise NotImplementedError

    def figures(self) -> dict[str, float]:
        """The scalars to log, from :meth:`compute`."""
        return {key: float(value) for key, value in self.compute().items() if value.numel() == 1}


def validation_metric(name: str):
    """Register a :class:`ValidationMetric` subclass: every validation then computes it."""
    return VALIDATION_METRICS.register(name)


@validation_metric("recon")
class Reconstruction(ValidationMetric):
    summary = {"FVU": lambda f: f"{f['fvu']:.4f}"}
    """Reconstruction figures over an evaluation, in the model's own units (call with
    de-normalised reconstructions), as SAEBench's ``core`` evaluation defines them:

    - ``fvu`` = Σ‖x − x̂‖² / Σ‖x − x̄‖², ``nmse`` = Σ‖x − x̂‖² / Σ‖x‖²;
    - ``explained_variance`` = 1 − Σ_d Var(x − x̂) / Σ_d Var(x) (the error's mean removed, so a
      constant offset is not counted; 1 − FVU when the error has zero mean);
    - ``cossim``: mean over tokens of cos(x, x̂) (0 where x̂ = 0); ``l2_ratio``: mean of ‖x̂‖/‖x‖;
    - ``relative_reconstruction_bias`` = E‖x̂‖² / E⟨x, x̂⟩ (Wright & Sharkey; 1: no shrinkage,
      < 1: x̂ too short)."""

    sse: Tensor
    sum_x: Tensor
    sum_sq: Tensor
    sum_err: Tensor
    sum_xhat_sq: Tensor
    sum_dot: Tensor
    sum_cos: Tensor
    sum_ratio: Tensor
    n: Tensor
    full_state_update = False

    def __init__(self, d_model: int):
        super().__init__()
        for name in ("sse", "sum_sq", "sum_xhat_sq", "sum_dot", "sum_cos", "sum_ratio", "n"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("sum_x", "sum_err"):
            self.add_state(name, torch.zeros(d_model, dtype=torch.float64), dist_reduce_fx="sum")

    @classmethod
    def build(cls, d_model: int, n_latents: int) -> Reconstruction:
        return cls(d_model)

    def observe(self, x: Tensor, x_hat: Tensor, code: SparseCode) -> None:
        self.update(x, x_hat)

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        x64, h64 = x.detach().to(torch.float64), x_hat.detach().to(torch.float64)
        err = x64 - h64
        self.sse += err.pow(2).sum()
        self.sum_x += x64.sum(0)
        self.sum_err += err.sum(0)
        self.sum_sq += x64.pow(2).sum()
        self.sum_xhat_sq += h64.pow(2).sum()
        self.sum_dot += (x64 * h64).sum()
        x_norm, h_norm = x64.norm(dim=1), h64.norm(dim=1)
        self.sum_cos += ((x64 * h64).sum(1) / (x_norm * h_norm).clamp_min(1e-30)).sum()
        self.sum_ratio += (h_norm / x_norm.clamp_min(1e-30)).sum()
        self.n += x.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.n.clamp_min(1)
        total_var = self.sum_sq - self.sum_x.pow(2).sum() / n
        err_var = self.sse - self.sum_err.pow(2).sum() / n
        return {
            "fvu": self.sse / total_var.clamp_min(1e-30),
            "nmse": self.sse / self.sum_sq.clamp_min(1e-30),
            "explained_variance": 1 - err_var / total_var.clamp_min(1e-30),
            "cossim": self.sum_cos / n,
            "l2_ratio": self.sum_ratio / n,
            "relative_reconstruction_bias": self.sum_xhat_sq / self.sum_dot,  # x̂ = 0: nan
        }


@validation_metric("l0")
class L0(ValidationMetric):
    """Distribution over tokens of the number of active latents (a histogram of counts)."""

    summary = {
        "L0 mean": lambda f: f"{f['l0_mean']:.2f}",
        "L0 p10-p90": lambda f: f"{f['l0_p10']:.0f}-{f['l0_p90']:.0f}",
    }

    hist: Tensor
    full_state_update = False

    def __init__(self, n_latents: int):
        super().__init__()
        self.add_state("hist", torch.zeros(n_latents + 1, dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def build(cls, d_model: int, n_latents: int) -> L0:
        return cls(n_latents)

    def observe(self, x: Tensor, x_hat: Tensor, code: SparseCode) -> None:
        self.update(code.l0_per_token())

    def update(self, l0_per_token: Tensor) -> None:
        self.hist += torch.bincount(l0_per_token, minlength=self.hist.numel())

    def compute(self) -> dict[str, Tensor]:
        return l0_summary(self.hist)


def l0_summary(hist: Tensor) -> dict[str, Tensor]:
    h = hist.to(torch.float64)
    n = h.sum().clamp_min(1)
    v = torch.arange(h.numel(), dtype=torch.float64, device=h.device)
    mean = (h * v).sum() / n
    std = ((h * (v - mean).pow(2)).sum() / n).sqrt()
    cdf = h.cumsum(0) / n

    def q(p):
        return torch.searchsorted(cdf, torch.tensor(p, dtype=torch.float64, device=h.device)).to(torch.float64)

    nz = torch.nonzero(hist)
    return {
        "l0_mean": mean,
        "l0_std": std,
        "l0_p10": q(0.10),
        "l0_p50": q(0.5),
        "l0_p90": q(0.90),
        "l0_p99": q(0.99),
        "l0_max": nz.max().to(torch.float64) if nz.numel() else mean * 0,
        "l0_zero_fraction": h[0] / n,
    }


@validation_metric("firing")
class Firing(ValidationMetric):
    """Per-latent firing counts over an evaluation: density and the share never fired."""

    summary = {"never fired on val": lambda f: f"{100 * f['never_fired_fraction']:.1f}%"}

    counts: Tensor
    n: Tensor
    full_state_update = False

    def __init__(self, n_latents: int):
        super().__init__()
        self.add_state("counts", torch.zeros(n_latents, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("n", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    @classmethod
    def build(cls, d_model: int, n_latents: int) -> Firing:
        return cls(n_latents)

    def observe(self, x: Tensor, x_hat: Tensor, code: SparseCode) -> None:
        self.update(code.fire_counts(), x.shape[0])

    def update(self, fire_counts: Tensor, n_tokens: int) -> None:
        self.counts += fire_counts
        self.n += n_tokens

    def compute(self) -> dict[str, Tensor]:
        density = self.counts.to(torch.float64) / self.n.clamp_min(1)
        never = (self.counts == 0).to(torch.float64).mean()
        return {
            "density": density,
            "never_fired_fraction": never,
            "alive_fraction": 1 - never,  # SAEBench's frac_alive: fired at least once here
            "density_mean": density.mean(),
            "density_median": density.median(),
        }


@torch.no_grad()
def feature_recovery(true_features: Tensor, decoder_rows: Tensor, threshold: float = 0.9) -> dict[str, float]:
    """Mean over true features of the max cosine similarity to any decoder direction, and
    the share of true features recovered above ``threshold``."""
    t = torch.nn.functional.normalize(true_features.to(torch.float32), dim=1)
    d = torch.nn.functional.normalize(decoder_rows.detach().to(t.device, torch.float32), dim=1)
    best = torch.cat([(chunk @ d.t()).max(dim=1).values for chunk in t.split(1024)])
    return {
        "recovery_mean_max_cos": float(best.mean()),
        f"recovery_share_above_{threshold}": float((best > threshold).float().mean()),
    }


def absorption(
    parent_features: Tensor,
    decoder_rows: Tensor,
    fired: Callable[[Tensor], Tensor],
    parent: Tensor,
    child: Tensor,
    min_tokens: int = 20,
) -> dict[str, float]:
    """Feature absorption on data with a known hierarchy (Chanin et al. 2024): for each parent
    feature, its latent (the decoder direction closest to it) should fire wherever the parent is
    active. ``fired(latents)`` gives, for the tokens, whether each of those latents fires ([N, P]);
    ``parent``/``child`` [N, P]: the parent active, one of its children active. A parent's
    absorption is 1 − (its latent's firing rate where a child co-fires) / (its rate where the
    parent is alone), clamped to [0, 1]: 0 when children take nothing from it, 1 when its latent
    never fires beside a child. Mean over the parents with at least ``min_tokens`` tokens of each
    kind; also the parents' recovery (best decoder cosine) and their latents' rate alone."""
    t = torch.nn.functional.normalize(parent_features.to(torch.float32), dim=1)
    d = torch.nn.functional.normalize(decoder_rows.detach().to(t.device, torch.float32), dim=1)
    cos, latents = (t @ d.t()).max(dim=1)
    on = fired(latents).cpu()
    alone, with_child = parent & ~child, parent & child
    n_alone, n_child = alone.sum(0), with_child.sum(0)
    rate_alone = (on & alone).sum(0) / n_alone.clamp_min(1)
    rate_child = (on & with_child).sum(0) / n_child.clamp_min(1)
    ok = (n_alone >= min_tokens) & (n_child >= min_tokens) & (rate_alone > 0)
    if not bool(ok.any()):
        return {}
    score = (1 - rate_child[ok] / rate_alone[ok]).clamp(0, 1)
    return {
        "absorption": float(score.mean()),
        "parent_recovery_mean_max_cos": float(cos.mean()),
        "parent_latent_rate_alone": float(rate_alone[ok].mean()),
    }
