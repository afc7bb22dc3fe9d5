"""Exact selections over the union of every rank's batch (global allocation under DDP).

Each rank holds the affinities of its own tokens only. For Mutual Choice's global top-M and
Feature Choice's per-latent top-m_j over the global batch the ranks exchange candidate values
(each rank's own top-M, or each latent's top-min(m_j, B) — never the [B, F] matrix), every rank
finds the same cutoffs from them, and each keeps its own pairs. Ties at a cutoff go to the lower
rank first, then in the rank's own candidate order (token-major for MC, value order for FC),
so the result is deterministic and the ranks' selections never overlap or fall short.

Cost per step and rank: one local top-(k·B·W) instead of top-(k·B) (MC), one all-gather of
M·W float32 values (MC: M = k·B·W; FC: M = Σ_j min(m_j, B) ≈ k·B) and one of 2·W counts (MC)
or 2·W·F counts (FC).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .blockwise import AffinityBlocks
from .rescore import Exact, per_column, top_m
from .selection import sort_pairs
from .sparse import Selection


class Collective:
    """The ranks an allocation is shared across (the default process group)."""

    def __init__(self) -> None:
        self.world, self.rank = dist.get_world_size(), dist.get_rank()

    @staticmethod
    def current() -> Collective | None:
        """The default process group when one with more than one rank is running, else None."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return Collective()
        return None

    def gather(self, t: Tensor) -> Tensor:
        """[world, *t.shape]: every rank's ``t`` (the same shape on every rank)."""
        out = t.new_empty((self.world, *t.shape))
        if dist.get_backend() == "nccl":
            dist.all_gather_into_tensor(out, t.contiguous())
        else:  # gloo has no all_gather_into_tensor
            dist.all_gather(list(out.unbind(0)), t.contiguous())
        return out

    def sum(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def min(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return t


def _tie_shares(above: Tensor, ties: Tensor, want: Tensor, rank: int) -> Tensor:
    """How many of this rank's entries equal to the cutoff it keeps: ``above``/``ties`` are
    [world, ...] counts of every rank's candidates above / at the cutoff, ``want`` the number
    to select; the ties still wanted go to the lower ranks first."""
    short = (want - above.sum(0)).clamp_min(0)
    before = ties.cumsum(0) - ties  # ties of the lower ranks
    return (short - before[rank]).clamp(min=0).minimum(ties[rank])


def global_top_m(
    z: Tensor | AffinityBlocks, per_token: int, coll: Collective, exact: Exact | None = None
) -> tuple[Selection, Tensor]:
    """Mutual Choice over every rank's batch: the entries of this rank's z' [B, F] among the
    per_token·ΣB largest of all ranks' entries, token-major, with their values. Every rank
    must hold the same B. ``exact``: re-score a low-precision ``z`` (:mod:`rescore`)."""
    B, F = z.shape
    budget = per_token * B * coll.world
    # every entry of ours the global top-M can hold
    local, values = top_m(z, min(budget, B * F), exact)
    padded = values.new_full((budget,), float("-inf"), dtype=torch.float32)
    padded[: values.numel()] = values.float()
    pool = coll.gather(padded).reshape(-1)
    theta = torch.topk(pool, budget, sorted=False).values.min()
    v = values.float()
    counts = torch.stack([(v > theta).sum(), (v == theta).sum()])
    every = coll.gather(counts)  # [world, 2]
    take = _tie_shares(every[:, 0], every[:, 1], torch.tensor(budget, device=values.device), coll.rank)
    tie = v == theta
    keep = (v > theta) | (tie & (tie.cumsum(0) <= take))
    kept = None if local.values is None else local.values[keep]
    return Selection(rows=local.rows[keep], cols=local.cols[keep], n_tokens=B, values=kept), values[keep]


def global_per_column_topk(
    zt: Tensor | AffinityBlocks, m: Tensor, coll: Collective, exact: Exact | None = None
) -> tuple[Selection, Tensor]:
    """Feature Choice over every rank's batch: latent j takes its top-m_j tokens of all ranks'
    tokens (m_j ≤ ΣB, the same on every rank); returns this rank's pairs, token-major, and each
    latent's cutoff (its m_j-th largest over all ranks, -inf where m_j = 0). ``zt`` is this
    rank's [F, B], every rank with the same B; ``exact``: re-score a low-precision ``zt``."""
    F_, B = zt.shape
    mine = m.clamp(max=B)  # no rank can give a latent more than its B tokens
    lat, tok, val, _ = per_column(zt, mine, exact)
    order = torch.argsort(lat, stable=True)  # latent-major; each latent's entries stay in value order
    lat, tok, val = lat[order], tok[order], val[order].float()
    pool = coll.gather(val)  # [world, S]: the same layout on every rank (S = Σ_j min(m_j, B))
    # each latent's cutoff: sort every rank's candidates of a latent together, by value then latent
    lat_all = lat.repeat(coll.world)
    by_value = torch.argsort(pool.reshape(-1), descending=True, stable=True)
    by_latent = by_value[torch.argsort(lat_all[by_value], stable=True)]
    sorted_v = pool.reshape(-1)[by_latent]
    start = (torch.cumsum(mine, 0) - mine) * coll.world  # where each latent's run of W·min(m_j, B) begins
    has = m > 0
    theta = torch.full((F_,), float("-inf"), dtype=torch.float32, device=val.device)
    theta[has] = sorted_v[(start + m - 1)[has]]
    th = theta[lat]
    counts = (
        torch.stack(
            [
                torch.bincount(lat, weights=(val > th).float(), minlength=F_),
                torch.bincount(lat, weights=(val == th).float(), minlength=F_),
            ]
        )
        .round_()
        .long()
    )
    every = coll.gather(counts)  # [world, 2, F]
    take = _tie_shares(every[:, 0], every[:, 1], m, coll.rank)  # [F]
    tie = val == th
    seen = tie.long().cumsum(0) - tie.long()  # ties before this entry, over all latents
    own_start = (torch.cumsum(mine, 0) - mine)[lat]  # where this entry's latent begins here
    tie_rank = seen - seen[own_start]  # ties of the same latent before this entry
    keep = (val > th) | (tie & (tie_rank < take[lat]))
    exact_values = val[keep] if exact is not None else None  # the re-scored values (fp32) of the kept pairs
    return sort_pairs(tok[keep], lat[keep], B, F_, exact_values), theta
