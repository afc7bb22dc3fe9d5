"""Mutual Choice (= BatchTopK): the k·B largest affinities of the whole batch; one global
threshold θ for threshold inference (a JumpReLU SAE with a single threshold)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from ..blockwise import AffinityBlocks, above_threshold
from ..collective import global_top_m
from ..rescore import top_m
from ..sparse import Selection
from .base import PLAIN, BatchContext, CalibrationSet, ThresholdAllocator, ThresholdConfig, largest_beyond, register


@dataclasses.dataclass(kw_only=True)
class MutualChoiceConfig(ThresholdConfig):
    """Mutual Choice has no keys of its own beyond k and the threshold EMA's."""


def global_threshold_for_rate(cal: CalibrationSet, per_token: float) -> tuple[float, float]:
    """θ such that exactly round(per_token·N) affinities of the calibration set exceed it:
    the largest value that is not among the top round(per_token·N). Returns (θ, kept)."""
    keep = int(round(per_token * cal.n_tokens))
    theta = largest_beyond(cal.row_chunks(), keep)
    if theta is None:  # fewer affinities than asked for: keep everything positive
        return 0.0, float(keep)
    return max(theta, 0.0), float(keep)


@register("mutual_choice")
class MutualChoice(ThresholdAllocator):
    Config = MutualChoiceConfig
    cfg: MutualChoiceConfig

    def __init__(self, cfg: MutualChoiceConfig, n_latents: int, batch_size: int):
        super().__init__(cfg, n_latents, batch_size, theta_shape=())

    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        batch: BatchContext = PLAIN,
    ) -> Selection:
        step, update, collective, exact = batch.step, batch.update, batch.collective, batch.exact
        B = z.shape[0]
        if collective is None:
            sel, values = top_m(z, self.cfg.k * B, exact)
        else:
            sel, values = global_top_m(z, self.cfg.k, collective, exact)
        if update:
            positive = values[values > 0]
            lowest = positive.min().float() if positive.numel() else torch.full((), float("inf"), device=values.device)
            if collective is not None:  # every rank's smallest kept value: the same EMA everywhere
                lowest = collective.min(lowest)
            if bool(torch.isfinite(lowest)):
                self.update_theta_ema(lowest, step)
        return sel

    def threshold(self, z: Tensor | AffinityBlocks, source: str = "calibrated") -> Selection:
        return above_threshold(z, self.current_theta(source))

    @torch.no_grad()
    def calibrate(self, cal: CalibrationSet) -> dict[str, float]:
        theta, _ = global_threshold_for_rate(cal, float(self.cfg.k))
        self.set_calibrated(theta)
        return {"theta": theta, "theta_ema": float(self.theta_ema)}
