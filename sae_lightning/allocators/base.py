"""The allocator protocol and its registry (the selection kernels are in ``selection.py``)."""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from enum import StrEnum
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..blockwise import AffinityBlocks
from ..collective import Collective
from ..errors import require
from ..registry import Registry
from ..rescore import Exact
from ..selection import per_column_topk
from ..sparse import Selection, SparseCode
from ..spec import parse, setting

ALLOCATORS = Registry("allocator")


class Mode(StrEnum):
    """How a code is computed: ``batch`` allocation (training, batch evaluation), ``threshold``
    inference with the calibrated thresholds (one token at a time), or with the running-EMA
    thresholds (``threshold_ema``)."""

    BATCH = "batch"
    THRESHOLD = "threshold"
    THRESHOLD_EMA = "threshold_ema"


def register(name: str):
    """Register an Allocator subclass under ``name`` (the value of ``variant.allocator``)."""
    return ALLOCATORS.register(name)


@dataclasses.dataclass(kw_only=True)
class GradientRankingConfig:
    """g-SAE ranking (Olmo et al. 2024): training batches rank z'·(1 + β·|d̂_j·ĝ|), ĝ = ∇ₓL in
    the SAE's input units over its RMS (gradient_ranking.py). 0 = off: the plain affinities."""

    beta: float = setting(0.0, ge=0)  # β of the ranking z'·(1 + β·|d̂·ĝ|); 0: off


@dataclasses.dataclass(kw_only=True)
class AllocatorConfig:
    k: int = setting(32, gt=0)  # target mean number of active latents per token
    # under DDP: allocate over the global batch (every rank's tokens), exactly as one process
    # would; false: each rank allocates its own batch. No effect on one process or for TopK.
    global_allocation: bool = True
    # rank by each latent's first-order effect on the LM's loss too (needs a cache harvested with
    # data.harvest.gradients=true); the kept values are still the affinities
    gradient_ranking: GradientRankingConfig = setting(default_factory=GradientRankingConfig)

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


@dataclasses.dataclass(frozen=True)
class BatchContext:
    """What a batch allocation may read besides z′: the training ``step``; whether it may
    ``update`` its running state (threshold EMAs, demand: training steps only); the
    ``collective`` of ranks that allocate one global batch together (None: this batch alone,
    each rank calling at the same point with the same batch size); and ``exact``, for a
    low-precision z′, the ranked values in the parameters' dtype at given pairs (the allocator
    then selects candidates on z′ and the final pairs on their exact values: rescore.py). Each
    allocator reads what it needs."""

    step: int = 0
    update: bool = False
    collective: Collective | None = None
    exact: Exact | None = None


PLAIN = BatchContext()  # a batch allocated on its own, outside training: no state changes


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
    learns_thresholds: ClassVar[bool] = False  # thresholds are parameters (JumpReLU): losses.sparsity
    # batch allocation re-scores a low-precision z' exactly (``exact``); else it reads fp32 z'
    rescores: ClassVar[bool] = True
    has_thresholds: ClassVar[bool] = False  # a threshold mode of its own (θ per latent or one θ)

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
    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        batch: BatchContext = PLAIN,
    ) -> Selection:
        """Batch allocation of ``z`` in the setting ``batch`` describes (:class:`BatchContext`)."""

    def threshold(self, z: Tensor | AffinityBlocks, source: str = "calibrated") -> Selection:
        """Threshold inference; ``source`` is ``'calibrated'`` (falls back to the EMA when
        no calibration has run) or ``'ema'``. Allocators without thresholds allocate."""
        return self.allocate(z)

    def thresholds_ready(self) -> bool:
        """Whether the threshold mode uses thresholds set from held-out tokens (or needs none)."""
        return True

    def calibrate(self, cal: CalibrationSet) -> dict[str, float]:
        """Set the thresholds from held-out affinities; returns figures to log."""
        return {}

    # ---- learned thresholds (JumpReLU) --------------------------------------------------
    def surrogate(self, z: Tensor | AffinityBlocks, code: SparseCode) -> Surrogate | None:
        """In a training step, the gradient path to thresholds the allocator learns (JumpReLU's
        straight-through estimator); None for the others (their selection has no parameters)."""
        return None

    def init_thresholds(self, cal: CalibrationSet) -> dict[str, float]:
        """Learned thresholds' start from the initialisation sample; returns figures to log."""
        return {}

    def scale_thresholds(self, factor: float) -> None:
        """The encoder was multiplied by ``factor``: learned thresholds follow (same selection)."""


@dataclasses.dataclass
class Surrogate:
    """A training step's gradient path to learned thresholds: ``zeros``, a code whose values
    are 0 (added to x̂ it changes nothing; its backward carries the reconstruction's gradient to
    the thresholds), and ``l0``, the batch's mean L0 as a function of the thresholds (the
    sparsity term's input)."""

    zeros: SparseCode
    l0: Tensor


def ema_update(ema: Tensor, count: Tensor, value: Tensor, beta: float) -> None:
    """In-place EMA with the first observation as its start (no zero bias)."""
    if int(count) == 0:
        ema.copy_(value)
    else:
        ema.mul_(beta).add_(value.to(ema.dtype), alpha=1 - beta)
    count.add_(1)


class CalibratedThresholds(Allocator):
    """An allocator whose threshold mode reads inference thresholds θ (one, or one per latent):
    calibrated ones set from held-out tokens (:meth:`calibrate`), then scaled by one factor so
    that the mean L0 there is k (:meth:`scale_calibrated`); before calibration, the allocator's
    running ones (:meth:`running_theta`: an EMA of batch cutoffs, or learned thresholds)."""

    theta_calibrated: Tensor
    calibrated: Tensor
    has_thresholds = True

    def __init__(self, cfg: AllocatorConfig, n_latents: int, batch_size: int, theta_shape: tuple[int, ...]):
        super().__init__(cfg, n_latents, batch_size)
        self.register_buffer("theta_calibrated", torch.zeros(theta_shape))
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def thresholds_ready(self) -> bool:
        return bool(self.calibrated)

    @abc.abstractmethod
    def running_theta(self) -> Tensor:
        """The thresholds used until calibration (and by ``threshold_ema``)."""

    def current_theta(self, source: str = "calibrated") -> Tensor:
        """The calibrated θ (once calibrated; else the running one) or, with ``source='ema'``, the running one."""
        return self.theta_calibrated if (source == "calibrated" and bool(self.calibrated)) else self.running_theta()

    def set_calibrated(self, theta: Tensor | float) -> None:
        if isinstance(theta, Tensor):
            self.theta_calibrated.copy_(theta)
        else:
            self.theta_calibrated.fill_(theta)
        self.calibrated.fill_(True)

    def scale_calibrated(self, factor: float) -> None:
        """θ ← factor·θ for the calibrated thresholds (see :func:`l0_matching_scale`)."""
        self.theta_calibrated.mul_(factor)


@dataclasses.dataclass(kw_only=True)
class ThresholdConfig(AllocatorConfig):
    """The keys of every allocator with thresholds: the running EMA of its batch cutoffs."""

    # the decay of the running EMA of the batch cutoffs (threshold_ema mode; the thresholds until calibration)
    threshold_ema_beta: float = setting(0.999, ge=0, lt=1, allowed="a number in [0, 1)")
    threshold_ema_warmup_steps: int = setting(100, ge=0)  # training steps before the EMA starts


class ThresholdAllocator(CalibratedThresholds):
    """An allocator with calibrated thresholds whose running ones are an EMA of its batch
    cutoffs, updated in training steps after a warm-up. Subclasses say how a cutoff is measured
    and calibrated."""

    cfg: ThresholdConfig
    theta_ema: Tensor
    theta_ema_count: Tensor

    def __init__(self, cfg: ThresholdConfig, n_latents: int, batch_size: int, theta_shape: tuple[int, ...]):
        super().__init__(cfg, n_latents, batch_size, theta_shape)
        self.register_buffer("theta_ema", torch.zeros(theta_shape))
        self.register_buffer("theta_ema_count", torch.zeros((), dtype=torch.long))

    def running_theta(self) -> Tensor:
        return self.theta_ema

    def ema_ready(self) -> bool:
        """Whether the EMA has seen a training cutoff (before, θ = 0 would take every positive
        affinity: ~F/2 latents a token, a [B, F]-sized selection)."""
        return int(self.theta_ema_count) > 0

    def update_theta_ema(self, cutoff: Tensor, step: int) -> None:
        """Fold a training batch's cutoff into the EMA once the warm-up has passed."""
        if step >= self.cfg.threshold_ema_warmup_steps:
            ema_update(self.theta_ema, self.theta_ema_count, cutoff, self.cfg.threshold_ema_beta)


def largest_beyond(chunks: Iterable[Tensor], keep: int) -> float | None:
    """The largest value that is not among the ``keep`` largest of all the chunks' values (the
    (keep+1)-th largest), streamed chunk by chunk with a buffer of keep + 1 values; None when
    there are no more than ``keep`` values."""
    want = keep + 1
    buf: Tensor | None = None
    for chunk in chunks:
        cand = chunk.reshape(-1)
        if buf is not None and buf.numel() >= want:
            cand = cand[cand >= buf.min()]
        pool = cand if buf is None else torch.cat([buf, cand])
        buf = torch.topk(pool, min(want, pool.numel()), sorted=False).values
    if buf is None or buf.numel() < want:
        return None
    return float(buf.min())


def l0_matching_scale(cal: CalibrationSet, theta: Tensor, k: float) -> float:
    """The factor s for which threshold inference with s·θ gives mean L0 = k on the calibration
    tokens: an entry fires when z' > s·θ_j and z' > 0, i.e. when its ratio z'/θ_j exceeds s, so
    s is the (round(k·N) + 1)-th largest ratio (exact, no bisection: the same streaming top-M
    as Mutual Choice's calibration). θ_j = 0 fires on every positive entry (ratio +inf), θ_j = +inf
    never (ratio 0). Clamped to [1e-12, 1e12] so that s·θ stays well defined."""
    theta = theta.to(torch.float32)

    def ratios() -> Iterator[Tensor]:
        for z in cal.row_chunks():
            th = theta.to(z.device)
            yield torch.where(z > 0, z / th, torch.zeros((), dtype=z.dtype, device=z.device))

    s = largest_beyond(ratios(), int(round(k * cal.n_tokens)))
    if s is None:  # no more entries than k·N: every positive one fires at any scale
        return 1e-12
    return min(max(s, 1e-12), 1e12)


def latent_cutoffs(cal: CalibrationSet, want: Tensor) -> Tensor:
    """θ_j at which latent j fires (z′ > θ_j) on ``want[j]`` of the calibration tokens: the
    (want_j + 1)-th largest of its N values, 0 where want_j ≥ N; each latent's by a
    top-(want_j + 1), grouped by size (not a sort of all N)."""
    N = cal.n_tokens
    theta = torch.zeros(cal.n_latents)
    for cols, z in cal.column_chunks():
        q = want[cols].to(device=z.device, dtype=torch.long)
        _, _, _, cut = per_column_topk(z.t().contiguous(), (q + 1).clamp(max=N))
        cut = torch.where(q >= N, torch.zeros_like(cut), cut)
        theta[cols] = cut.clamp_min(0.0).float().cpu()
    return theta


def threshold_l0(cal: CalibrationSet, theta: Tensor) -> float:
    """Mean L0 of threshold inference with θ on the calibration tokens."""
    theta = theta.to(torch.float32)
    fired = sum(int(((z > theta.to(z.device)) & (z > 0)).sum()) for z in cal.row_chunks())
    return fired / max(1, cal.n_tokens)
