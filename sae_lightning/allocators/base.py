"""The allocator protocol and its registry (the selection kernels are in ``selection.py``)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import ClassVar

from torch import Tensor, nn

from ..errors import require
from ..sparse import Selection
from ..spec import parse, setting

ALLOCATORS: dict[str, type[Allocator]] = {}


class Mode(StrEnum):
    """How a code is computed: ``batch`` allocation (training, batch evaluation), ``threshold``
    inference with the calibrated thresholds (one token at a time), or with the running-EMA
    thresholds (``threshold_ema``)."""

    BATCH = "batch"
    THRESHOLD = "threshold"
    THRESHOLD_EMA = "threshold_ema"


def register(name: str):
    def deco(cls):
        cls.name = name
        ALLOCATORS[name] = cls
        return cls

    return deco


@dataclasses.dataclass(kw_only=True)
class AllocatorConfig:
    k: int = setting(32, gt=0)  # target mean number of active latents per token

    def check(self, prefix: str) -> None:
        """Rules that span fields (ranges are checked from the field metadata)."""


class CalibrationSet:
    """Held-out tokens, already normalised, with a way to get their affinities in chunks.

    Allocators that hold thresholds read it row-wise (all latents for some tokens) or
    column-wise (all tokens for some latents); it never holds the whole [N, F] matrix.
    """

    def __init__(
        self,
        x: Tensor,
        affinities: Callable[[Tensor, slice | None], Tensor],
        n_latents: int,
        max_elements: int = 1 << 24,
    ):
        self.x, self._aff, self.n_latents, self.max_elements = x, affinities, n_latents, max_elements

    @property
    def n_tokens(self) -> int:
        return self.x.shape[0]

    def row_chunks(self) -> Iterator[Tensor]:
        step = max(1, self.max_elements // self.n_latents)
        for i in range(0, self.n_tokens, step):
            yield self._aff(self.x[i : i + step], None)

    def column_chunks(self) -> Iterator[tuple[slice, Tensor]]:
        step = max(1, self.max_elements // max(1, self.n_tokens))
        for j in range(0, self.n_latents, step):
            cols = slice(j, min(self.n_latents, j + step))
            yield cols, self._aff(self.x, cols)


class Allocator(nn.Module, abc.ABC):
    """Turns affinities z' [B, F] into a :class:`Selection` of (token, latent) pairs.

    ``z`` comes in the allocator's ``layout``, and the returned selection is always in
    token-major (CSR) order. Two modes: :meth:`allocate` (batch allocation, used in training and batch evaluation)
    and :meth:`threshold` (threshold inference: each token on its own). State that the
    threshold mode needs (thresholds, capacities) lives in buffers, so it is saved in the
    checkpoint. Subclasses set ``Config`` and implement ``allocate``.
    """

    name: ClassVar[str]
    Config: ClassVar[type[AllocatorConfig]] = AllocatorConfig
    # the layout of z' it reads: "token" = [B, F] (row per token), "latent" = [F, B]
    layout: ClassVar[str] = "token"
    trainable: ClassVar[bool] = True  # False: only for SAEs trained elsewhere (JumpReLU)

    def __init__(self, cfg: AllocatorConfig, n_latents: int, batch_size: int):
        super().__init__()
        self.cfg, self.n_latents, self.batch_size = cfg, n_latents, batch_size

    # ---- configuration ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, params: dict, n_latents: int, batch_size: int, prefix: str = "variant") -> Allocator:
        cfg = parse(cls.Config, params, prefix, what=f"allocator {cls.name!r}")
        cls.check_fits(cfg, n_latents, batch_size, prefix)
        return cls(cfg, n_latents, batch_size)

    @classmethod
    def check_fits(cls, cfg: AllocatorConfig, n_latents: int, batch_size: int, prefix: str = "variant") -> None:
        """The config against the dictionary and batch sizes (a budget the allocator can spend)."""
        require(cfg.k <= n_latents, f"{prefix}.k", cfg.k, f"at most model.n_latents = {n_latents}")

    # ---- the two modes ------------------------------------------------------------------
    @abc.abstractmethod
    def allocate(self, z: Tensor, *, step: int = 0, density: Tensor | None = None, update: bool = False) -> Selection:
        """Batch allocation. ``update`` lets the allocator update its running state
        (threshold EMAs, density ranking); it is True only in training steps."""

    def threshold(self, z: Tensor, source: str = "calibrated") -> Selection:
        """Threshold inference; ``source`` is ``'calibrated'`` (falls back to the EMA when
        no calibration has run) or ``'ema'``. Allocators without thresholds allocate."""
        return self.allocate(z)

    @property
    def has_thresholds(self) -> bool:
        return False

    def calibrate(self, cal: CalibrationSet) -> dict[str, float]:
        """Set the thresholds from held-out affinities; returns figures to log."""
        return {}


def ema_update(ema: Tensor, count: Tensor, value: Tensor, beta: float) -> None:
    """In-place EMA with the first observation as its start (no zero bias)."""
    if int(count) == 0:
        ema.copy_(value)
    else:
        ema.mul_(beta).add_(value.to(ema.dtype), alpha=1 - beta)
    count.add_(1)
