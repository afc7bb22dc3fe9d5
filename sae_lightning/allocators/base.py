"""The allocator protocol, its registry, and the selection routines the allocators share."""

from __future__ import annotations

import abc
import dataclasses
from typing import Callable, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..errors import ConfigError, require
from ..sparse import Selection

ALLOCATORS: dict[str, type["Allocator"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        ALLOCATORS[name] = cls
        return cls

    return deco


@dataclasses.dataclass
class AllocatorConfig:
    k: int = 32  # target mean number of active latents per token


class CalibrationSet:
    """Held-out tokens, already normalised, with a way to get their affinities in chunks.

    Allocators that hold thresholds read it row-wise (all latents for some tokens) or
    column-wise (all tokens for some latents); it never holds the whole [N, F] matrix.
    """

    def __init__(self, x: Tensor, affinities: Callable[[Tensor, slice | None], Tensor], n_latents: int,
                 max_elements: int = 1 << 24):
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

    def __init__(self, cfg: AllocatorConfig, n_latents: int, batch_size: int):
        super().__init__()
        self.cfg, self.n_latents, self.batch_size = cfg, n_latents, batch_size

    # ---- configuration ------------------------------------------------------------------
    @classmethod
    def from_dict(cls, params: dict, n_latents: int, batch_size: int, prefix: str = "variant") -> "Allocator":
        cfg = cls.parse_config(params, prefix)
        cls.validate(cfg, n_latents, batch_size, prefix)
        return cls(cfg, n_latents, batch_size)

    @classmethod
    def parse_config(cls, params: dict, prefix: str = "variant") -> AllocatorConfig:
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        for key in params:
            if key not in fields:
                raise ConfigError(f"{prefix}.{key}", params[key], f"a key of allocator {cls.name!r}: {sorted(fields)}")
        return cls.Config(**params)

    @classmethod
    def validate(cls, cfg: AllocatorConfig, n_latents: int, batch_size: int, prefix: str = "variant") -> None:
        require(isinstance(cfg.k, int) and cfg.k > 0, f"{prefix}.k", cfg.k, "an integer > 0")
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


def topk_per_row(z: Tensor, k: int) -> Selection:
    """The top-k latents of every token (row-major order)."""
    B, F = z.shape
    k = min(k, F)
    idx = torch.topk(z, k, dim=1, sorted=False).indices
    rows = torch.arange(B, device=z.device).repeat_interleave(k)
    return Selection(rows=rows, cols=idx.reshape(-1), n_tokens=B)


class GlobalTopK:
    """Exact top-M of a flattened [B, F] matrix, in two stages: the top-c of every row, then
    the top-M of those candidates. A row whose c candidates all reach the cut might hold
    more, so only such rows are widened (×4) and the cut recomputed, until none is left;
    the result is then exactly the flat top-M. The c for the next batch is the 99th
    percentile of the per-row counts just selected (a hint, not state)."""

    def __init__(self, initial_c: int):
        self.c = max(1, initial_c)

    def __call__(self, z: Tensor, budget: int) -> tuple[Selection, Tensor]:
        B, F = z.shape
        budget = min(budget, B * F)
        c = min(F, max(self.c, -(-budget // B)))
        vals, idx = torch.topk(z, c, dim=1, sorted=True)
        groups = [(torch.arange(B, device=z.device), vals, idx)]  # (rows, values [n, w], latents [n, w])
        while True:
            flat = torch.cat([g[1].reshape(-1) for g in groups]) if len(groups) > 1 else vals.reshape(-1)
            top = torch.topk(flat, budget, sorted=False)
            cut = top.values.min()
            saturated = []
            for rows, v, _ in groups:
                if v.shape[1] < F:
                    hit = (v[:, -1] >= cut) & (v[:, -1] > 0)
                    if bool(hit.any()):
                        saturated.append((rows[hit], v.shape[1]))
            if not saturated:
                break
            wide = torch.cat([r for r, _ in saturated])
            width = min(F, 4 * max(w for _, w in saturated))
            kept = []
            for rows, v, i in groups:
                stay = ~torch.isin(rows, wide)
                if bool(stay.any()):
                    kept.append((rows[stay], v[stay], i[stay]))
            v_new, i_new = torch.topk(z[wide], width, dim=1, sorted=True)
            groups = kept + [(wide, v_new, i_new)]
        if len(groups) == 1 and groups[0][1] is vals:
            pos = torch.sort(top.indices).values  # row-major already
            rows = torch.div(pos, c, rounding_mode="floor")
            sel = Selection(rows=rows, cols=idx.reshape(-1)[pos], n_tokens=B)
            values = flat[pos]
        else:
            flat_rows = torch.cat([r.repeat_interleave(v.shape[1]) for r, v, _ in groups])
            flat_cols = torch.cat([i.reshape(-1) for _, _, i in groups])
            key = flat_rows[top.indices] * F + flat_cols[top.indices]
            order = torch.argsort(key)
            key = key[order]
            rows = torch.div(key, F, rounding_mode="floor")
            sel = Selection(rows=rows, cols=key - rows * F, n_tokens=B)
            values = top.values[order]
        counts = torch.bincount(sel.rows, minlength=B)
        p99 = int(torch.kthvalue(counts, max(1, int(0.99 * B))).values) if B > 1 else int(counts.max())
        self.c = max(1, min(F, p99 + 1))
        return sel, values


def threshold_selection(z: Tensor, theta: Tensor, layout: str = "token") -> Selection:
    """Pairs with z' > θ and z' > 0, token-major. θ is a scalar or one per latent."""
    if layout == "token":
        rows, cols = torch.nonzero((z > theta) & (z > 0), as_tuple=True)
        return Selection(rows=rows, cols=cols, n_tokens=z.shape[0])
    theta = theta.unsqueeze(1) if theta.dim() == 1 else theta
    cols, rows = torch.nonzero((z > theta) & (z > 0), as_tuple=True)
    return sort_pairs(rows, cols, n_tokens=z.shape[1], n_latents=z.shape[0])


def sort_pairs(rows: Tensor, cols: Tensor, n_tokens: int, n_latents: int) -> Selection:
    """Reorder (token, latent) pairs token-major."""
    key = torch.sort(rows * n_latents + cols).values
    rows = torch.div(key, n_latents, rounding_mode="floor")
    return Selection(rows=rows, cols=key - rows * n_latents, n_tokens=n_tokens)


def ema_update(ema: Tensor, count: Tensor, value: Tensor, beta: float) -> None:
    """In-place EMA with the first observation as its start (no zero bias)."""
    if int(count) == 0:
        ema.copy_(value)
    else:
        ema.mul_(beta).add_(value.to(ema.dtype), alpha=1 - beta)
    count.add_(1)
