"""JumpReLU: fixed per-latent thresholds θ_j (z = z' where z' > θ_j and z' > 0), in both modes.

Not trained here: it is what an SAE imported from SAELens with thresholds (``jumprelu``) or plain
ReLU (``standard``, θ = 0) becomes, so that every tool of this package can evaluate it."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..blockwise import AffinityBlocks
from ..collective import Collective
from ..rescore import Exact
from ..selection import check_finite, threshold_selection
from ..sparse import Selection
from .base import Allocator, AllocatorConfig, register


@dataclasses.dataclass(kw_only=True)
class JumpReLUConfig(AllocatorConfig):
    """``k`` is the SAE's nominal sparsity (informational: the thresholds set the L0)."""


@register("jumprelu")
class JumpReLU(Allocator):
    Config = JumpReLUConfig
    trainable = False
    rescores = False
    theta: Tensor

    def __init__(self, cfg: JumpReLUConfig, n_latents: int, batch_size: int):
        super().__init__(cfg, n_latents, batch_size)
        self.register_buffer("theta", torch.zeros(n_latents))

    has_thresholds = True  # fixed ones: ready as they are

    def current_theta(self, source: str = "calibrated") -> Tensor:
        return self.theta  # fixed: no calibration, no running estimate

    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        *,
        step: int = 0,
        density: Tensor | None = None,
        update: bool = False,
        collective: Collective | None = None,
        exact: Exact | None = None,
    ) -> Selection:
        return self.threshold(z)

    def threshold(self, z: Tensor | AffinityBlocks, source: str = "calibrated") -> Selection:
        if isinstance(z, AffinityBlocks):  # fixed thresholds, for SAEs trained elsewhere: no blockwise path
            z = z.dense()
        check_finite(z.amax(1))  # NaN and +inf propagate through the row maximum
        return threshold_selection(z, self.theta)
