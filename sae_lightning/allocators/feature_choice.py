"""Feature Choice: latent j takes its top-m_j tokens, Σ m_j = k·B; a threshold θ_j per
latent for threshold inference. Capacities are uniform, Zipf (water-filled, ≤ B; α, β given
or fitted from another run's density curve; ranks map to latents statically or by demand), or
proportional to each latent's demand (water-filled, ≤ B, a small floor, stochastically
rounded each training step); optional Mutual Choice warm-up."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..blockwise import AffinityBlocks, above_threshold
from ..collective import Collective, global_per_column_topk, global_top_m
from ..errors import ConfigError, require
from ..rescore import Exact, count_above, per_column, sample_exact, top_m
from ..selection import sort_pairs
from ..sparse import Selection
from ..spec import setting
from ..zipf import round_preserving_sum, stochastic_round, uniform_capacities, waterfill, zipf_capacities
from .base import PLAIN, BatchContext, CalibrationSet, ThresholdAllocator, ThresholdConfig, latent_cutoffs, register


@dataclasses.dataclass(kw_only=True)
class FeatureChoiceConfig(ThresholdConfig):
    # demand: the default since the claims grid (docs/results.md: better or equal FVU at L0 = k than
    # zipf in 8 of its 9 cells); zipf: a fixed Zipf curve over latents ranked by demand
    capacity: Literal["uniform", "zipf", "demand"] = "demand"
    # capacity=zipf: m_j ∝ (rank + β)^-α (water-filled to sum k·B)
    zipf_alpha: float = setting(1.0, ge=0)
    zipf_beta: float = setting(
        0.0, gt=-1, allowed="a number > -1 (so that r + beta > 0 for r >= 1)"
    )  # the Zipf curve's β
    # zipf: tokens every latent may take per batch before the Zipf water-filling (0: a tail rank
    # may get no capacity and never fire); null: 1 where the budget allows it (k·B >= F), else 0
    min_capacity: int | None = setting(None, ge=0, allowed="null (1 if k·B >= F, else 0) or an integer >= 0")
    zipf_from: str | None = None  # a run folder: α, β of its validation density fit (metrics.json)
    # demand: tokens every latent may take per batch in expectation, before the rest is shared by demand
    demand_floor: float = setting(0.25, ge=0, allowed="a number >= 0 (tokens per batch, in expectation)")
    # which latent gets which Zipf rank (no effect with uniform capacities: every rank is equal)
    rank: Literal["static", "by_density"] = "by_density"
    rerank_every_steps: int = setting(100, ge=1)  # by_density: re-rank latents by their demand this often
    demand_tokens: int = setting(256, ge=1)  # by_density: tokens of each batch on which demand is counted
    # the time constant, in tokens, of the EMA of each latent's demand
    demand_time_constant_tokens: int = setting(100_000, ge=1, allowed="an integer >= 1 (tokens)")
    mc_warmup_steps: int = setting(0, ge=0)  # train with Mutual Choice for the first N steps

    def check(self, prefix: str) -> None:
        if self.zipf_from is not None:
            require(
                self.capacity == "zipf",
                f"{prefix}.zipf_from",
                self.zipf_from,
                f"null with {self.capacity} capacities (it sets the Zipf shape: set variant.capacity=zipf)",
            )
            fitted_zipf(self.zipf_from, f"{prefix}.zipf_from")


def fitted_zipf(run: str, key: str = "variant.zipf_from") -> tuple[float, float]:
    """α, β of the Zipf fit of a finished run's validation density curve (its metrics.json)."""
    path = Path(run).expanduser() / "metrics.json"
    try:
        m = json.loads(path.read_text())
        alpha, beta = float(m["val/zipf_fit_alpha"]), float(m["val/zipf_fit_beta"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            key,
            run,
            f"a finished run folder whose metrics.json holds val/zipf_fit_alpha and "
            f"val/zipf_fit_beta ({path}: {type(e).__name__})",
        ) from None
    if not (math.isfinite(alpha) and math.isfinite(beta) and alpha >= 0 and beta > -1):
        raise ConfigError(key, run, f"a run with a usable Zipf fit (it has alpha={alpha}, beta={beta})")
    return alpha, beta


def zipf_shape(cfg: FeatureChoiceConfig) -> tuple[float, float]:
    return fitted_zipf(cfg.zipf_from) if cfg.zipf_from else (cfg.zipf_alpha, cfg.zipf_beta)


def _token_major(z: Tensor | AffinityBlocks) -> Tensor | AffinityBlocks:
    """Latent-major z′ seen token-major (a Mutual Choice warm-up): a transposed view, or the
    blocks, transposed one by one."""
    if isinstance(z, AffinityBlocks):
        return AffinityBlocks(lambda cols: z.block_of(cols).t(), z.n_tokens, z.n_latents, z.block, "token")
    return z.t()


@dataclasses.dataclass
class DemandSample:
    """What demand is counted on: a strided sample of the latent-major matrix (about 2^16
    entries: the batch's Mutual Choice cutoff θ is estimated on it; entries that cannot reach
    it may be -inf) and the batch's first n tokens' values, latent-major [F, n] (with ``exact``:
    the int16 keys of a low-precision matrix's, counted by re-scoring those near θ)."""

    sample: Tensor
    first: Tensor
    exact: Exact | None = None

    @property
    def n(self) -> int:
        return self.first.shape[1]

    def count_above(self, theta: Tensor) -> Tensor:
        """[F]: how many of the first n tokens each latent's affinity exceeds θ on (summed as
        int32: a sum of booleans to int64 converts them first, most of the sum's time)."""
        if self.exact is None:
            return (self.first > theta).sum(1, dtype=torch.int32)
        if float(theta) <= 0:  # near 0 the low-precision signs decide: the exact columns
            return (self.exact.latent_rows(torch.arange(self.n)) > theta).sum(1, dtype=torch.int32)
        return count_above(self.first, theta, self.exact)


def _demand_sample(
    z: Tensor | AffinityBlocks, tokens: int, exact: Exact | None = None, top: float = 1.0
) -> DemandSample:
    """Feature Choice's :class:`DemandSample` of z. With ``exact`` (z is then a low-precision
    matrix) demand is counted as in an fp32 run, on exact values. A dense matrix: the sample's
    entries that can reach its top ``top`` share (the cutoff θ; ``top`` ≥ k/F, times the
    ranks whose samples are pooled) re-scored pair by pair (:func:`rescore.sample_exact`), the
    first n tokens' counts from the matrix's keys but near θ (:func:`rescore.count_above`),
    so only a few entries are re-scored (docs/performance.md). Blocks: the first
    n tokens' columns and the sample by one dense latent-major product (the fp32 run's own
    layout) where the stride divides B (the sample is then every latent at every stride-th
    token, in the fp32 run's order), else pair by pair."""
    F_, B = z.shape
    stride = max(1, F_ * B // (1 << 16))
    n = min(B, tokens)
    if exact is not None and isinstance(z, Tensor):
        size = len(range(0, F_ * B, stride))
        sample = sample_exact(z, stride, math.ceil(size * min(top, 1.0)), exact)
        return DemandSample(sample, z[:, :n].view(torch.int16), exact)
    if exact is not None:
        if B % stride == 0:  # one product for both: the sample's tokens and the first n
            cols = exact.latent_rows(torch.cat([torch.arange(n), torch.arange(0, B, stride)]))
            return DemandSample(cols[:, n:].reshape(-1), cols[:, :n])
        first = exact.latent_rows(torch.arange(n))
        flat = torch.arange(0, F_ * B, stride, device=first.device)
        lat = torch.div(flat, B, rounding_mode="floor")
        return DemandSample(exact(flat - lat * B, lat), first)
    if isinstance(z, AffinityBlocks):
        tap = _DemandTap(z, n)
        for _ in tap.blocks:
            pass
        return tap.sample()
    return DemandSample(z.reshape(-1)[::stride], z[:, :n])


class _DemandTap:
    """Blocks that, as they are computed (by whatever pass reads them), keep demand's strided
    sample and first tokens of each: the same values :func:`_demand_sample` takes of the dense
    matrix."""

    def __init__(self, z: AffinityBlocks, n: int):
        F_, B = z.shape
        self.stride, self.n, self.B, self.n_latents = max(1, F_ * B // (1 << 16)), n, B, F_
        self.parts: dict[int, tuple[Tensor, Tensor]] = {}
        self.blocks = AffinityBlocks(self._block, z.n_tokens, F_, z.block, z.layout, z.columns_of)
        self._inner = z

    def _block(self, cols: slice) -> Tensor:
        zb = self._inner.block_of(cols)
        j = int(cols.start or 0)
        if j not in self.parts:
            self.parts[j] = (
                zb.reshape(-1)[(-j * self.B) % self.stride :: self.stride].clone(),
                zb[:, : self.n].clone(),
            )  # copies: a view would keep the whole block alive
        return zb

    def sample(self) -> DemandSample:
        assert sum(h.shape[0] for _, h in self.parts.values()) == self.n_latents, "a block was not read"
        order = sorted(self.parts)
        return DemandSample(torch.cat([self.parts[j][0] for j in order]), torch.cat([self.parts[j][1] for j in order]))


def demand_capacities(demand: Tensor, budget: int, batch_size: int, floor: float) -> Tensor:
    """Expected capacities x_j (float64, latent order) proportional to demand: ``floor`` for every
    latent, the rest of the budget water-filled by demand on top, so that Σ x_j = k·B and
    floor ≤ x_j ≤ B. A floor that does not fit a small batch's budget shrinks to what fits."""
    n = demand.numel()
    floor = min(floor, budget / n, float(batch_size))
    w = demand.detach().to("cpu", torch.float64).clamp_min(0)
    w = w + 1e-12 * max(float(w.max()), 1.0)  # no zero weight: water-filling divides by the tail's sum
    order = torch.argsort(w, descending=True, stable=True)
    x = torch.empty_like(w)
    x[order] = floor + waterfill(w[order], budget - n * floor, batch_size - floor)
    return x


def capacities_by_rank(cfg: FeatureChoiceConfig, n_latents: int, batch_size: int, training: bool = True) -> Tensor:
    """m_r by rank for a batch of ``batch_size`` tokens. At the training batch size the floor
    (``min_capacity``; null: 1 where the budget k·B gives every latent a token, else 0) must fit
    the budget (checked with the config); a smaller batch given to
    batch mode later (encode on a few tokens) whose budget k·B cannot give every latent its floor
    gets the floor that fits, ⌊k·B/F⌋ (0 for B < F/k: only the Zipf head then fires)."""
    budget = cfg.k * batch_size
    if cfg.capacity in ("uniform", "demand"):  # demand: its prior (every latent the same demand)
        return uniform_capacities(n_latents, budget)
    alpha, beta = zipf_shape(cfg)
    floor = min(1, budget // n_latents) if cfg.min_capacity is None else cfg.min_capacity
    if not training:
        floor = min(floor, budget // n_latents)
    return zipf_capacities(n_latents, budget, batch_size, alpha, beta, floor)


@register("feature_choice")
class FeatureChoice(ThresholdAllocator):
    """Reads z' latent-major ([F, B]): each latent's tokens are one contiguous row, so the
    per-latent top-m_j needs no transposed copy of the matrix."""

    Config = FeatureChoiceConfig
    layout = "latent"
    cfg: FeatureChoiceConfig
    capacity_by_rank: Tensor
    rank_to_latent: Tensor
    demand: Tensor
    rounding_seed: Tensor
    allocation_batch: Tensor

    def __init__(self, cfg: FeatureChoiceConfig, n_latents: int, batch_size: int):
        super().__init__(cfg, n_latents, batch_size, theta_shape=(n_latents,))
        self.register_buffer("capacity_by_rank", capacities_by_rank(cfg, n_latents, batch_size))
        self.register_buffer("rank_to_latent", torch.arange(n_latents))  # latent holding rank r
        # capacity=demand: the stochastic rounding of step t draws from (rounding_seed, t), so a
        # resumed run rounds as the uninterrupted one (the seed is the run's, saved with it)
        self.register_buffer("rounding_seed", torch.tensor(torch.initial_seed() % (1 << 62), dtype=torch.long))
        # by_density: each latent's demand, the share of tokens whose affinity for it clears the
        # batch's Mutual Choice cutoff (an EMA in tokens); the prior is the uniform share k/F
        self.register_buffer("demand", torch.full((n_latents,), cfg.k / n_latents))
        # the tokens a training allocation spans: B, or B times the ranks under global allocation
        # (calibration gives each latent the firing rate it had there)
        self.register_buffer("allocation_batch", torch.tensor(batch_size, dtype=torch.long))
        self._capacity_cache: dict[int, Tensor] = {}

    @classmethod
    def check_fits(cls, cfg, n_latents, batch_size, prefix="variant"):
        super().check_fits(cfg, n_latents, batch_size, prefix)
        # Σ m_j = k·B with every m_j ≤ B needs k ≤ F (checked above); Zipf water-filling then
        # always has a solution, but say so plainly if a float edge case says otherwise.
        if cfg.capacity == "demand":
            require(
                cfg.demand_floor * n_latents <= cfg.k * batch_size and cfg.demand_floor <= batch_size,
                f"{prefix}.demand_floor",
                cfg.demand_floor,
                f"a floor that fits the budget: at most k·B/F = {cfg.k * batch_size / n_latents:g} tokens",
            )
        try:
            capacities_by_rank(cfg, n_latents, batch_size)
        except ValueError as e:
            require(False, f"{prefix}.k", cfg.k, f"a feasible capacity budget ({e})")

    def capacities(self, batch_size: int) -> Tensor:
        """m_j for each latent (latent order) at this batch size, outside training (validation,
        inference): under capacity=demand the expected capacities rounded by largest remainder."""
        if self.cfg.capacity == "demand":
            x = self.expected_capacities(batch_size)
            return round_preserving_sum(x, self.cfg.k * batch_size, batch_size).to(self.demand.device)
        if batch_size == self.batch_size:
            by_rank = self.capacity_by_rank
        else:  # e.g. a short last validation batch: same rule, that batch's budget
            if batch_size not in self._capacity_cache:
                self._capacity_cache[batch_size] = capacities_by_rank(self.cfg, self.n_latents, batch_size, False)
            by_rank = self._capacity_cache[batch_size].to(self.capacity_by_rank.device)
        m = torch.empty_like(by_rank)
        m[self.rank_to_latent] = by_rank
        return m

    def expected_capacities(self, batch_size: int) -> Tensor:
        """E[m_j] (float64, latent order): what calibration sets each latent's firing rate from."""
        if self.cfg.capacity == "demand":
            return demand_capacities(self.demand, self.cfg.k * batch_size, batch_size, self.cfg.demand_floor)
        return self.capacities(batch_size).to("cpu", torch.float64)

    def training_capacities(self, batch_size: int, step: int) -> Tensor:
        """m_j for training step ``step``: under capacity=demand drawn by stochastic rounding of
        the expected capacities (Σ m_j = k·B exactly, E[m_j] = x_j), seeded by (run, step)."""
        if self.cfg.capacity != "demand":
            return self.capacities(batch_size)
        g = torch.Generator().manual_seed((int(self.rounding_seed) * 1_000_003 + step) % (1 << 63))
        u = float(torch.rand((), generator=g, dtype=torch.float64))
        x = self.expected_capacities(batch_size)
        return stochastic_round(x, self.cfg.k * batch_size, batch_size, u).to(self.demand.device)

    def allocate(
        self,
        z: Tensor | AffinityBlocks,
        batch: BatchContext = PLAIN,
    ) -> Selection:
        step, update, collective, exact = batch.step, batch.update, batch.collective, batch.exact
        F_, B = z.shape
        zipf_by_demand = self.cfg.capacity == "zipf" and self.cfg.rank == "by_density"
        tap = None
        if update and (self.cfg.capacity == "demand" or zipf_by_demand):
            # during a Mutual Choice warm-up too: demand then measures MC's own allocation
            reads_demand_now = step >= self.cfg.mc_warmup_steps and (
                self.cfg.capacity == "demand" or step % self.cfg.rerank_every_steps == 0
            )
            if isinstance(z, AffinityBlocks) and not reads_demand_now and exact is None:
                # this step's selection does not read demand: take its sample in the selection's
                # own pass over the blocks (one pass, not two) and update it afterwards
                tap = _DemandTap(z, min(B, self.cfg.demand_tokens))
                z = tap.blocks
            else:
                world = collective.world if collective is not None else 1
                top = self.cfg.k / self.n_latents * world  # θ: the pooled samples' top k/F
                self._update_demand(_demand_sample(z, self.cfg.demand_tokens, exact, top), B, collective)
        sel = self._select(z, step, update, collective, exact)
        if tap is not None:
            self._update_demand(tap.sample(), B, collective)
        return sel

    def _select(
        self, z: Tensor | AffinityBlocks, step: int, update: bool, collective: Collective | None, exact: Exact | None
    ) -> Selection:
        F_, B = z.shape
        world = collective.world if collective is not None else 1
        if update and step < self.cfg.mc_warmup_steps:
            if collective is not None:
                return global_top_m(_token_major(z), self.cfg.k, collective, exact)[0]
            return top_m(_token_major(z), self.cfg.k * B, exact)[0]
        if update and self.cfg.capacity == "zipf" and self.cfg.rank == "by_density":
            if step % self.cfg.rerank_every_steps == 0:
                self.rank_to_latent.copy_(torch.argsort(self.demand, descending=True, stable=True))
        # capacities of the global batch (B tokens on each of the ranks)
        if update:
            self.allocation_batch.fill_(B * world)
        m = self.training_capacities(B * world, step) if update else self.capacities(B * world)
        if collective is not None:
            sel, cutoff = global_per_column_topk(z, m, collective, exact)
        else:
            lat, tok, val, cutoff = per_column(z, m, exact)
            sel = sort_pairs(tok, lat, B, F_, val if exact is not None else None)
        if update:  # a column with fewer than m_j positive entries fires on every positive one
            self.update_theta_ema(cutoff.clamp_min(0.0), step)
        return sel

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before global allocation: their training batch was this process's
        state_dict.setdefault(prefix + "allocation_batch", torch.tensor(self.batch_size, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _update_demand(self, demand: DemandSample, B: int, collective: Collective | None = None) -> None:
        """Not the latent's density, which Feature Choice fixes at m_j/B, but the share of the
        tokens it would take if the batch's budget were shared freely: its affinities above the
        Mutual Choice cutoff θ (the k·B-th largest of the batch, estimated on the strided
        sample of the latent-major matrix), counted on the batch's first n tokens. With a
        ``collective`` the sample is every rank's and the shares are averaged over the ranks:
        the same demand on every rank."""
        sample = demand.sample
        if collective is not None:
            sample = collective.gather(sample.float()).reshape(-1)
        keep = min(sample.numel(), max(1, math.ceil(sample.numel() * self.cfg.k / self.n_latents)))
        theta = torch.topk(sample, keep, sorted=False).values.min().clamp_min(0.0)
        share = demand.count_above(theta).to(self.demand.dtype) / demand.n
        tokens = B
        if collective is not None:
            share, tokens = collective.sum(share) / collective.world, B * collective.world
        # the time constant counts training tokens (B a step), not the n counted: the EMA follows the
        # model at the same pace whatever demand_tokens is (counted tokens made it lag 4x at 256)
        self.demand.lerp_(share, 1.0 - math.exp(-tokens / self.cfg.demand_time_constant_tokens))

    def current_theta(self, source: str = "calibrated") -> Tensor:
        theta = super().current_theta(source)
        # a latent with no capacity never fires
        can = (self.expected_capacities(int(self.allocation_batch)) > 0).to(theta.device)
        return torch.where(can, theta, torch.full_like(theta, float("inf")))

    def threshold(self, z: Tensor | AffinityBlocks, source: str = "calibrated") -> Selection:
        return above_threshold(z, self.current_theta(source), self.layout)

    @torch.no_grad()
    def calibrate(self, cal: CalibrationSet) -> dict[str, float]:
        """θ_j so that latent j fires on round(E[m_j]·N/B) of the N held-out tokens."""
        n = int(self.allocation_batch)
        m = self.expected_capacities(n)
        want = torch.round(m * cal.n_tokens / n).to(torch.long).clamp(max=cal.n_tokens)
        theta = latent_cutoffs(cal, want)
        self.set_calibrated(theta.to(self.theta_calibrated))
        return {"theta_mean": float(theta.mean()), "theta_ema_mean": float(self.theta_ema.mean())}
