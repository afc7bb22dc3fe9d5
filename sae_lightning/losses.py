"""Loss terms, one signature each; the module sums them with ``total_loss``.

Terms: ``recon`` (always on), ``aux_k`` (Gao et al.: dead latents explain the residual),
``aux_zipf`` (the same form over dead and under-used latents, Zipf targets), ``sparsity``
(JumpReLU's L0 penalty or target) and ``matryoshka`` (nested prefixes of the dictionary each
reconstruct x).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, cast

import torch
from torch import Tensor

from .blockwise import AffinityBlocks
from .errors import require
from .registry import Registry
from .sae import SparseAutoencoder
from .selection import per_column_topk, sort_pairs
from .sparse import Selection, SparseCode, sparse_decode
from .spec import check_keys, parse, setting
from .stats import LatentStats


def sum_of_squares(t: Tensor) -> Tensor:
    """Σ t², as one dot product in at least fp32 (BLAS), in t's dtype."""
    flat = t.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    return torch.dot(flat, flat).to(t.dtype)


class _SquaredError(torch.autograd.Function):
    """(Σ‖x − x̂‖², x − x̂): one pass for the residual and one read for its dot product (where
    ``(x − x̂).pow(2).sum()`` takes three), and a backward of one pass (−2g·(x − x̂) for x̂)
    instead of three. The residual is returned without a gradient. The sum is a dot product in
    at least fp32 (BLAS: ~6e-7 relative against fp64 on a step's batch, ``linalg.vector_norm`` 4.5e-5)."""

    @staticmethod
    def forward(ctx, x, x_hat):
        e = x - x_hat
        ctx.save_for_backward(e)
        ctx.mark_non_differentiable(e)
        return sum_of_squares(e), e

    @staticmethod
    def backward(ctx, g, _):
        (e,) = ctx.saved_tensors
        g_x = e * (2 * g) if ctx.needs_input_grad[0] else None
        g_hat = (-g_x if g_x is not None else e * (-2 * g)) if ctx.needs_input_grad[1] else None
        return g_x, g_hat


@dataclass
class StepOutput:
    """What one forward pass produced, in normalised units."""

    x: Tensor  # input [B, d]
    x_hat: Tensor  # reconstruction [B, d]
    z: Tensor | AffinityBlocks  # affinities, no autograd: [B, F] if layout == "token", [F, B] if "latent"
    layout: str
    code: SparseCode
    # (latents, tokens, layout) -> those columns of z′ in the parameters' dtype, where z is held in
    # low precision (the auxiliary losses then select on exact values, as in an fp32 run)
    exact_columns: Callable[[Tensor, slice, str], Tensor] | None = None
    centred: Tensor | None = None  # x − b_pre (no gradient), where the step computed it
    # the batch's mean L0 as a function of learned thresholds (JumpReLU's surrogate), else None
    l0: Tensor | None = None
    _error: tuple[Tensor, Tensor] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def squared_error(self) -> tuple[Tensor, Tensor]:
        """(Σ‖x − x̂‖² over the batch, differentiable with respect to x̂; the residual x − x̂,
        without gradient), computed once for the loss terms and the step's metrics."""
        if self._error is None:
            self._error = cast(tuple[Tensor, Tensor], _SquaredError.apply(self.x, self.x_hat))
        return self._error

    def columns(self, latents: Tensor, tokens: slice = slice(None), layout: str = "token") -> Tensor:
        """The affinities of some latents for (some) tokens: [tokens, len(latents)], or
        [len(latents), tokens] contiguous for the ``latent`` layout."""
        if self.exact_columns is not None:
            return self.exact_columns(latents, tokens, layout)
        if isinstance(self.z, AffinityBlocks):
            cols = self.z.columns(latents, tokens)
        elif self.layout == "latent":
            rows = self.z[latents, tokens]
            return rows if layout == "latent" else rows.t()
        else:
            cols = self.z[tokens][:, latents]
        return cols if layout == "token" else cols.t().contiguous()


LOSSES = Registry("loss term")


def _register(cls):
    """Register a LossTerm subclass under its ``name`` (a key of ``variant.losses``)."""
    return LOSSES.register(cls.name, attribute=None)(cls)


@dataclass
class LossTerm(abc.ABC):
    """A term of the loss. After each call ``metrics`` holds figures of that step to log
    (e.g. the share of dead latents the term reached)."""

    name: ClassVar[str]
    coef: float = setting(1.0, ge=0)  # the term's weight in the total loss
    metrics: dict[str, Tensor | None] = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @abc.abstractmethod
    def __call__(self, out: StepOutput, sae: SparseAutoencoder, stats: LatentStats) -> Tensor:
        """The unweighted value of the term for this step."""


@_register
@dataclass
class Reconstruction(LossTerm):
    """Mean squared error per element, divided by the inputs' per-element ``second_moment``
    (the normalised MSE, ‖e‖²/E‖x‖²) or their ``variance`` (‖e‖²/E‖x − x̄‖², the FVU; Gao et
    al.'s ``mse_scale``), both measured on the initialisation sample; or ``sum``: ‖e‖² summed
    over the d dimensions, mean over tokens, not normalised (SAELens's loss: its size follows
    the inputs' norm, which matters only with gradient clipping). The choice sets the weight of
    the auxiliary terms relative to this one."""

    name: ClassVar[str] = "recon"
    # sum (‖x − x̂‖² per token, SAELens's) | second_moment (the normalised MSE) | variance (the FVU)
    scale: Literal["second_moment", "variance", "sum"] = "sum"

    def __call__(self, out, sae, stats):
        sse = out.squared_error()[0]
        if self.scale == "sum":
            return sse / out.x.shape[0]
        denom = sae.x_variance if self.scale == "variance" else sae.x_second_moment
        return sse / out.x.numel() / denom

    def units(self, sae: SparseAutoencoder) -> Tensor:
        """c such that this term = c · (the loss with ``second_moment`` scale): 1, E x²/Var x
        or d · E x² (per element, on the initialisation sample)."""
        if self.scale == "sum":
            return sae.d_model * sae.x_second_moment
        if self.scale == "variance":
            return sae.x_second_moment / sae.x_variance
        return torch.ones_like(sae.x_second_moment)


def total_loss(losses: dict[str, LossTerm], terms: dict[str, Tensor], sae: SparseAutoencoder) -> Tensor:
    """Σ coef · term, the auxiliary terms (dimensionless: residuals relative to their own
    variance, shortfalls relative to θ) multiplied by the reconstruction's ``units``: so they
    weigh against it as against the normalised (``second_moment``) loss whatever its scale.
    Without that, the summed loss (≈ d times the normalised one) leaves aux_k ~d times weaker
    and dead latents are not revived (Mutual Choice, synthetic data, k = 16: 61 % dead)."""
    units = cast(Reconstruction, losses["recon"]).units(sae).detach()
    return torch.stack(
        [losses[name].coef * value * (1 if name == "recon" else units) for name, value in terms.items()]
    ).sum()


AuxValues = Literal["relu", "softplus", "linear"]


def per_token_aux_selection(out: StepOutput, candidates: Tensor, k_aux: int) -> Selection | None:
    """Each token's top-k_aux affinities among the ``candidates`` latents (aux_k's rule)."""
    idx = torch.nonzero(candidates).squeeze(1)
    if idx.numel() == 0:
        return None
    k = min(k_aux, idx.numel())
    B = out.x.shape[0]
    # the candidates' columns, a chunk of tokens at a time: never a second [B, F] tensor
    chunk = max(1, (1 << 22) // idx.numel())
    parts = [torch.topk(out.columns(idx, slice(i, i + chunk)), k, dim=1, sorted=False) for i in range(0, B, chunk)]
    top = torch.cat([p.indices for p in parts])
    return Selection(
        rows=torch.arange(B, device=idx.device).repeat_interleave(k),
        cols=idx[top].reshape(-1),
        n_tokens=B,
        values=torch.cat([p.values for p in parts]).reshape(-1),  # the code's values: no second product
    )


def per_latent_aux_selection(
    out: StepOutput, candidates: Tensor, quota: Tensor, max_elements: int = 1 << 22
) -> Selection | None:
    """Each candidate latent j's top-quota_j tokens (Feature Choice's rule), token-major."""
    pairs = per_latent_aux_pairs(out, candidates, quota, max_elements)
    if pairs is None:
        return None
    lat, tok, val = pairs
    # with their values: the code reads them instead of a second product
    return sort_pairs(tok, lat, out.x.shape[0], out.code.n_latents, val)


def per_latent_aux_pairs(
    out: StepOutput, candidates: Tensor, quota: Tensor, max_elements: int = 1 << 22
) -> tuple[Tensor, Tensor, Tensor] | None:
    """(latent, token, ranked value) of each candidate latent j's top-quota_j tokens, grouped by
    latent (None when there are none)."""
    idx = torch.nonzero(candidates & (quota > 0)).squeeze(1)
    if idx.numel() == 0:
        return None
    B = out.x.shape[0]
    # the candidates' columns, a chunk of latents at a time: never a second [B, F] tensor
    chunk = max(1, max_elements // B)
    lats, toks, vals = [], [], []
    for i in range(0, idx.numel(), chunk):
        part = idx[i : i + chunk]
        lat, tok, val, _ = per_column_topk(out.columns(part, layout="latent"), quota[part].clamp(1, B))
        lats.append(part[lat])
        toks.append(tok)
        vals.append(val)
    return torch.cat(lats), torch.cat(toks), torch.cat(vals)


def union(a: Selection | None, b: Selection | None, n_latents: int) -> Selection | None:
    """The pairs of both selections, each once, token-major."""
    if a is None or b is None:
        return a if b is None else b
    key = torch.unique(torch.cat([a.rows * n_latents + a.cols, b.rows * n_latents + b.cols]))
    rows = torch.div(key, n_latents, rounding_mode="floor")
    return Selection(rows=rows, cols=key - rows * n_latents, n_tokens=a.n_tokens)


def aux_residual_loss(
    out: StepOutput, sae: SparseAutoencoder, sel: Selection | None, weights: Tensor | None = None, values: str = "relu"
) -> tuple[Tensor, Tensor | None]:
    """Σ‖e − ê‖² / Σ‖e − ē‖² where e = x − x̂ (detached) and ê decodes, without bias, the
    selected auxiliary entries (0 when nothing is selected); and the latents that the
    auxiliary code holds, which are the ones that receive a gradient from it: their encoder
    rows and biases and their decoder rows, never b_pre."""
    if sel is None:
        return out.x.new_zeros(()), None
    code = sae.code(out.x, out.z, sel, out.layout, weights, values, train_b_pre=False, centred=out.centred)
    e = out.squared_error()[1]
    e_hat = sparse_decode(code, sae.W_dec)
    return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12), code.latents


UnderusedTerm = Literal["residual", "pull"]


def selection_pull_loss(
    out: StepOutput,
    sae: SparseAutoencoder,
    pairs: tuple[Tensor, Tensor, Tensor] | None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Mean over the selected pairs (latent, token, ranked value: :func:`per_latent_aux_pairs`)
    of w_j · relu(θ − z'_ij) / θ, θ the batch's selection cutoff (the smallest value of the main
    code): how far those affinities fall short of being selected. Its gradient raises them
    (W_enc and b_enc only: not W_dec, not b_pre); the pairs already above θ add nothing. The
    pairs stay in their latent order (no code is decoded from them: no token-major sort)."""
    if pairs is None or out.code.nnz == 0:
        return out.x.new_zeros(()), None
    lat, tok, ranked = pairs
    theta = out.code.values.detach().min().clamp_min(1e-6)
    raw = sae.raw_values(out.x, tok, lat, ranked, out.centred)
    values = sae.pair_values(out.x, tok, lat, raw, train_b_pre=False, centred=out.centred)
    short = torch.relu(theta - values) / theta
    if weights is not None:
        short = short * weights[lat]
    return short.mean(), lat[(values.detach() < theta)]


def reached_fraction(latents: Tensor | None, group: Tensor) -> Tensor | None:
    """The share of the latents in ``group`` ([F] bool) that hold an auxiliary entry (so get a
    gradient from it); None when the group is empty."""
    n = int(group.sum())
    if n == 0:
        return None
    if latents is None or latents.numel() == 0:
        return torch.zeros(())
    hit = torch.zeros_like(group)
    hit[latents] = True
    return (hit & group).sum().float() / n


@_register
@dataclass
class AuxK(LossTerm):
    """Gao et al.: each token's top-k_aux affinities among the dead latents, ReLU values,
    explain the residual."""

    name: ClassVar[str] = "aux_k"
    coef: float = setting(1.0 / 32, ge=0)  # the term's weight (Gao et al.: 1/32)
    k_aux: int | None = setting(None, ge=1, allowed="null (d_model // 2) or an integer >= 1")  # dead latents per token

    def __call__(self, out, sae, stats):
        dead = stats.dead_mask()
        loss, latents = aux_residual_loss(out, sae, per_token_aux_selection(out, dead, self.k_aux or sae.d_model // 2))
        self.metrics = {"dead_reached": reached_fraction(latents, dead)}
        return loss


@_register
@dataclass
class AuxZipf(LossTerm):
    """aux_k generalised from dead to under-used latents, as two residual reconstructions,
    each normalised like aux_k's:

    - the **dead term**: each token's top-``k_aux`` affinities among the dead latents only (so
      live latents never take their slots), plus, with ``coverage_tokens`` = q > 0, each dead
      latent's own top-q tokens (so every dead latent gets a gradient at every step); the
      entries' ``values`` are ``relu`` (aux_k's: an entry with z' <= 0 is dropped, so a latent
      whose affinities are all negative gets no gradient), ``softplus`` (positive, always a
      gradient) or ``linear`` (z' itself, as SAELens);
    - the **under-used term**, weighted by ``underused_coef``: each live latent j below ``tau``
      of its Zipf target density t_j (water-filled so Σ t_j = k, t_j <= 1, ranked by density)
      takes its own top-q_j tokens, q_j = ⌈(t_j − ρ_j)·B⌉ (its deficit in tokens), weighted by
      the deficit (t_j − ρ_j)/t_j with ``deficit_weighting``. ``underused_term``: ``residual``
      (those entries explain the residual, as the dead term does) or ``pull`` (a load-balancing
      term: the mean shortfall of those affinities below the batch's selection cutoff θ — the
      smallest value the allocator kept — relative to θ, so each under-used latent, dead ones
      included (with the full deficit weight), is pulled towards being selected on the tokens it
      matches best; only the encoder is trained).

    With tau = 0, coverage_tokens = 0 and relu values it is exactly aux_k (tested)."""

    name: ClassVar[str] = "aux_zipf"
    coef: float = setting(1.0 / 32, ge=0)  # the term's weight
    k_aux: int | None = setting(None, ge=1, allowed="null (d_model // 2) or an integer >= 1")  # dead term's slots
    tau: float = setting(0.25, ge=0)  # under-used: density below tau × its Zipf target
    alpha: float = setting(1.0, ge=0)  # the Zipf targets' α: t_j ∝ (rank + β)^-α
    beta: float = setting(0.0, gt=-1)  # the Zipf targets' β
    coverage_tokens: int = setting(0, ge=0, allowed="an integer >= 0 (0: off)")  # each dead latent's own top tokens
    values: AuxValues = "relu"  # the dead term's entries: relu | softplus | linear
    underused_coef: float = setting(0.1, ge=0)  # the under-used term's weight within this term
    underused_term: UnderusedTerm = "pull"  # pull (towards the selection cutoff) | residual
    deficit_weighting: bool = True  # weight each under-used latent by its relative deficit

    def __call__(self, out, sae, stats):
        dead = stats.dead_mask()
        sel = per_token_aux_selection(out, dead, self.k_aux or sae.d_model // 2)
        if self.coverage_tokens:
            quota = torch.full_like(stats.tokens_since_fired, self.coverage_tokens)
            sel = union(sel, per_latent_aux_selection(out, dead, quota), sae.n_latents)
        dead_loss, dead_latents = aux_residual_loss(out, sae, sel, values=self.values)
        self.metrics = {"dead_reached": reached_fraction(dead_latents, dead)}
        if self.tau == 0 or self.underused_coef == 0:
            return dead_loss
        targets = stats.targets(alpha=self.alpha, beta=self.beta)
        under = stats.underused_mask(ratio=self.tau, targets=targets)  # dead ∪ {ρ_j < τ·t_j}
        if self.underused_term == "residual":  # the dead latents have the dead term
            under = under & ~dead
        deficit = (targets - stats.density).clamp_min(0)
        weights = (
            (deficit / targets.clamp_min(1e-12)).clamp(0.0, 1.0).to(out.x.dtype) if self.deficit_weighting else None
        )
        quota = torch.ceil(deficit * out.x.shape[0]).to(torch.long)
        if self.underused_term == "pull":
            pairs = per_latent_aux_pairs(out, under, quota)
            under_loss, under_latents = selection_pull_loss(out, sae, pairs, weights)
        else:
            sel = per_latent_aux_selection(out, under, quota)
            under_loss, under_latents = aux_residual_loss(out, sae, sel, weights)
        self.metrics["underused_reached"] = reached_fraction(under_latents, under)
        return dead_loss + self.underused_coef * under_loss


@_register
@dataclass
class Sparsity(LossTerm):
    """JumpReLU's sparsity term on the batch's mean L0 (its gradient reaches the learned
    thresholds only, through the straight-through estimator: allocators/jumprelu.py):
    ``target``, (L0/k − 1)² (dictionary_learning's target L0: the run lands near L0 = k
    whatever the data, with no coefficient to tune per k), or ``penalty``, L0/k (SAELens's
    and the paper's L0 penalty, measured in units of k: the L0 it settles at depends on
    ``coef`` and the data). Dimensionless, like the auxiliary terms."""

    name: ClassVar[str] = "sparsity"
    mode: Literal["target", "penalty"] = "target"  # target: (L0/k − 1)²; penalty: L0/k

    def __call__(self, out, sae, stats):
        if out.l0 is None:
            raise ValueError("losses.sparsity needs learned thresholds (variant.allocator=jumprelu)")
        ratio = out.l0 / stats.k
        return (ratio - 1).pow(2) if self.mode == "target" else ratio


@_register
@dataclass
class Matryoshka(LossTerm):
    """Nested dictionaries (Bussmann et al. 2025; Nabeshima 2024): the latents 0..m_i − 1 of
    each prefix i (``prefixes``: fractions of F, increasing, each < 1) reconstruct x on their
    own from the entries of the step's code that fall among them (the allocator selects once,
    for the whole dictionary): Σ_i w_i‖x − x̂_i‖², x̂_i = b_pre + Σ_{j < m_i} z_j d_j, in the
    ``recon`` term's units (which is the whole dictionary's, the last level). ``weights``:
    one per prefix (null: all 1)."""

    name: ClassVar[str] = "matryoshka"
    # the nested prefixes, as fractions of F (increasing, each < 1); the whole dictionary is recon
    prefixes: list[float] = setting(default_factory=lambda: [1 / 16, 1 / 4])
    weights: list[float] | None = None  # one per prefix; null: all 1

    def check(self, prefix: str) -> None:
        p = self.prefixes
        ok = len(p) > 0 and all(0 < f < 1 for f in p) and all(a < b for a, b in zip(p, p[1:]))
        require(ok, f"{prefix}.prefixes", p, "a non-empty increasing list of fractions of F, each in (0, 1)")
        if self.weights is not None:
            w = self.weights
            require(
                len(w) == len(p) and all(x >= 0 for x in w),
                f"{prefix}.weights",
                w,
                f"null or {len(p)} numbers >= 0 (one per prefix)",
            )

    def sizes(self, n_latents: int) -> list[int]:
        """Each prefix's number of latents m_i (at least 1)."""
        return [max(1, round(f * n_latents)) for f in self.prefixes]

    def __call__(self, out, sae, stats):
        code = out.code
        tokens = code.token_index()
        weights = self.weights or [1.0] * len(self.prefixes)
        total = out.x.new_zeros(())
        for m, w in zip(self.sizes(code.n_latents), weights):
            keep = code.latents < m
            part = SparseCode.build(tokens[keep], code.latents[keep], code.values[keep], code.n_tokens, code.n_latents)
            x_hat = sparse_decode(part, sae.W_dec) + sae.b_pre
            total = total + w * cast(Tensor, _SquaredError.apply(out.x, x_hat)[0])
        # the normalised MSE: total_loss multiplies it by the recon term's units
        return total / out.x.numel() / sae.x_second_moment


def build_losses(spec: dict | None, prefix: str = "variant.losses") -> dict[str, LossTerm]:
    """From ``{name: {param: value}}`` (None or {} params allowed); ``recon`` is always on."""
    spec = dict(spec or {})
    spec.setdefault("recon", {})
    check_keys(spec, LOSSES, prefix, what="the losses")
    return {
        name: parse(LOSSES[name], params, f"{prefix}.{name}", what=f"loss {name!r}") for name, params in spec.items()
    }
