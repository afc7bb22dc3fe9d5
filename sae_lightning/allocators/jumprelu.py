"""JumpReLU (Rajamanoharan et al. 2024): latent j fires where z′ > θ_j (and z′ > 0), with
learned per-latent thresholds θ_j = exp(log θ_j).

The step function has no gradient with respect to θ; training uses the paper's
straight-through estimator with a rectangle kernel of bandwidth ε: at every pair (t, j) with
|z′_tj − θ_j| < ε/2 (the *band*),

- the reconstruction's gradient reaches θ_j as ∂z_tj/∂θ_j = −θ_j/ε (times ∂L/∂z_tj, which a
  pair below θ gets through a zero-valued entry of a code added to x̂: :meth:`JumpReLU.surrogate`),
- the sparsity term's L0 = mean_t Σ_j H(z′_tj − θ_j) reaches θ_j as −1/ε per pair,

and z′ itself gets ∂z/∂z′ = H(z′ − θ) from the reconstruction (the code's own values) and
nothing from the L0 (as the paper's ``Step``). The sparsity term is ``losses.sparsity``
(losses.py): an L0 penalty or a target L0 = k. Here ε is relative: ε_j = ``bandwidth``·θ_j
(docs/method_choices.md says why).

An SAE imported from SAELens (``jumprelu``, or ``standard``: θ = 0) is this allocator with
its thresholds fixed. Batch mode applies the learned θ; the threshold mode applies them once
calibrated: the same θ scaled by one factor so that L0 = k on the calibration tokens, as every
other allocator's inference thresholds."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor, nn

from ..blockwise import AffinityBlocks, above_threshold
from ..errors import require
from ..selection import check_finite, sort_pairs
from ..sparse import Selection, SparseCode
from ..spec import setting
from .base import (
    PLAIN,
    AllocatorConfig,
    BatchContext,
    CalibratedThresholds,
    CalibrationSet,
    Surrogate,
    latent_cutoffs,
    register,
)


@dataclasses.dataclass(kw_only=True)
class JumpReLUConfig(AllocatorConfig):
    """``k``: the target of the sparsity term (``losses.sparsity.mode=target``) and the L0 the
    threshold mode is scaled to."""

    # ε of the rectangle kernel, relative to each latent's threshold: pair (t, j) is in the band
    # where |z′ − θ_j| < ε·θ_j/2 (relative, so that it follows the thresholds' scale)
    bandwidth: float = setting(0.1, gt=0, le=2, allowed="a number in (0, 2]")
    # the thresholds at the start: ``data`` (each latent fires on k/F of the initialisation
    # sample: L0 = k from the first step) or a number (every θ_j; SAELens and the paper: 0.001)
    theta_init: Literal["data"] | float = setting("data", allowed="data or a number > 0")
    # the thresholds' learning rate as a multiple of optim.lr (Adam moves log θ by about the
    # rate per step: at 1 they follow the encoder too slowly for runs of a few hundred steps)
    lr_scale: float = setting(30.0, gt=0)

    def check(self, prefix: str) -> None:
        if not isinstance(self.theta_init, str):
            require(self.theta_init > 0, f"{prefix}.theta_init", self.theta_init, "data or a number > 0")


class _BandGradient(torch.autograd.Function):
    """Zero in the forward; the backward sends −scale_e·g_e to θ at each band pair e."""

    @staticmethod
    def forward(ctx, theta_at: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return torch.zeros_like(theta_at)

    @staticmethod
    def backward(ctx, g: Tensor):
        (scale,) = ctx.saved_tensors
        return -g * scale, None


@register("jumprelu")
class JumpReLU(CalibratedThresholds):
    Config = JumpReLUConfig
    cfg: JumpReLUConfig
    rescores = False  # the band and the step read fp32 z′
    learns_thresholds = True

    def __init__(self, cfg: JumpReLUConfig, n_latents: int, batch_size: int):
        super().__init__(cfg, n_latents, batch_size, theta_shape=(n_latents,))
        start = 1e-3 if isinstance(cfg.theta_init, str) else float(cfg.theta_init)
        self.log_theta = nn.Parameter(torch.full((n_latents,), start).log())

    @property
    def theta(self) -> Tensor:
        """The learned thresholds θ_j (no gradient)."""
        return self.log_theta.detach().exp()

    def running_theta(self) -> Tensor:
        return self.theta

    def thresholds_ready(self) -> bool:
        """Its own thresholds (learned, or imported) are ready as they are: calibration only
        scales them to L0 = k."""
        return True

    def surrogate(self, z: Tensor | AffinityBlocks, code: SparseCode) -> Surrogate | None:
        if not (self.log_theta.requires_grad and torch.is_grad_enabled()):
            return None
        band = self.band(z)
        zeros = SparseCode.build(band.rows, band.cols, self.band_values(band, True), band.n_tokens, self.n_latents)
        l0 = (self.band_values(band, False).sum() + code.nnz) / code.n_tokens
        return Surrogate(zeros, l0)

    @torch.no_grad()
    def init_thresholds(self, cal: CalibrationSet) -> dict[str, float]:
        """``theta_init=data``: θ_j such that latent j fires on k/F of the sample's tokens."""
        if not isinstance(self.cfg.theta_init, str):
            return {}
        want = torch.full((self.n_latents,), round(self.cfg.k * cal.n_tokens / self.n_latents), dtype=torch.long)
        theta = latent_cutoffs(cal, want).clamp_min(1e-6)
        self.log_theta.copy_(theta.log().to(self.log_theta))
        return {"theta_init_median": float(theta.median())}

    @torch.no_grad()
    def scale_thresholds(self, factor: float) -> None:
        """θ ← factor·θ (the encoder was scaled by ``factor``: the same selection)."""
        self.log_theta.add_(torch.log(torch.tensor(factor)))

    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        batch: BatchContext = PLAIN,
    ) -> Selection:
        return self._step(z, self.theta)

    def threshold(self, z: Tensor | AffinityBlocks, source: str = "calibrated") -> Selection:
        return self._step(z, self.current_theta(source))

    def _step(self, z: Tensor | AffinityBlocks, theta: Tensor) -> Selection:
        if isinstance(z, Tensor):
            check_finite(z.amax(1) if self.layout == "token" else z.amax(0))  # NaN and +inf reach the maximum
        return above_threshold(z, theta.to(z.device if isinstance(z, Tensor) else theta.device), self.layout)

    @torch.no_grad()
    def band(self, z: Tensor | AffinityBlocks) -> Selection:
        """The pairs (t, j) with |z′_tj − θ_j| < ε·θ_j/2, token-major."""
        theta = self.theta
        half = theta * (self.cfg.bandwidth / 2)
        low, high = theta - half, theta + half
        blocks = [(0, z)] if isinstance(z, Tensor) else list(iter(z))
        rows, cols = [], []
        for j, zb in blocks:
            width = zb.shape[1]
            lo, hi = low[j : j + width].to(zb.device), high[j : j + width].to(zb.device)
            r, c = torch.nonzero((zb > lo) & (zb < hi), as_tuple=True)
            rows.append(r)
            cols.append(c + j)
        return sort_pairs(torch.cat(rows), torch.cat(cols), z.shape[0], self.n_latents)

    def band_values(self, band: Selection, scale_by_theta: bool) -> Tensor:
        """Zeros at the band's pairs whose backward sends −(θ_j if ``scale_by_theta`` else 1)/ε_j
        times the incoming gradient to log θ_j's chain (ε_j = ε·θ_j: the kernel's width there)."""
        theta = self.log_theta.exp()
        theta_at = theta[band.cols]
        with torch.no_grad():
            width = theta_at * self.cfg.bandwidth
            scale = (theta_at if scale_by_theta else torch.ones_like(theta_at)) / width
        return _BandGradient.apply(theta_at, scale)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # runs imported before the thresholds were learned held them as a buffer ``theta``
        old = state_dict.pop(prefix + "theta", None)
        if old is not None:
            state_dict.setdefault(prefix + "log_theta", old.float().log())
            state_dict.setdefault(prefix + "theta_calibrated", torch.zeros_like(self.theta_calibrated))
            state_dict.setdefault(prefix + "calibrated", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def calibrate(self, cal: CalibrationSet) -> dict[str, float]:
        theta = self.theta
        self.set_calibrated(theta.to(self.theta_calibrated))
        return {"theta_median": float(theta.median())}
