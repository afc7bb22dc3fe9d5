"""Loss terms, one signature each; the module sums ``coef · term(out, sae, stats)``.

Terms: ``recon`` (always on), ``aux_k`` (Gao et al.: dead latents explain the residual) and
``aux_zipf`` (the same form over dead and under-used latents, Zipf targets).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .allocators.base import per_column_topk, sort_pairs
from .errors import ConfigError, require, require_choice
from .sae import SparseAutoencoder
from .sparse import Selection, SparseCode, sparse_decode
from .stats import LatentStats


@dataclass
class StepOutput:
    """What one forward pass produced, in normalised units."""

    x: Tensor  # input [B, d]
    x_hat: Tensor  # reconstruction [B, d]
    z: Tensor  # affinities, no autograd: [B, F] if layout == "token", [F, B] if "latent"
    layout: str
    code: SparseCode

    def columns(self, latents: Tensor, tokens: slice = slice(None)) -> Tensor:
        """The affinities of some latents for (some) tokens, [tokens, len(latents)]."""
        return self.z[tokens][:, latents] if self.layout == "token" else self.z[latents, tokens].t()


LOSSES: dict[str, type["LossTerm"]] = {}


def _register(cls):
    LOSSES[cls.name] = cls
    return cls


@dataclass
class LossTerm(abc.ABC):
    name: ClassVar[str]
    coef: float = 1.0

    @abc.abstractmethod
    def __call__(self, out: StepOutput, sae: SparseAutoencoder, stats: LatentStats) -> Tensor:
        """The unweighted value of the term for this step."""

    def validate(self, prefix: str, d_model: int) -> None:
        require(self.coef >= 0, f"{prefix}.coef", self.coef, "a number >= 0")


@_register
@dataclass
class Reconstruction(LossTerm):
    """Mean squared error per element, in normalised units (≈ normalised MSE when the
    inputs have E‖x‖² = d)."""

    name: ClassVar[str] = "recon"

    def __call__(self, out, sae, stats):
        return (out.x - out.x_hat).pow(2).mean()


def per_token_aux_selection(out: StepOutput, candidates: Tensor, k_aux: int) -> Selection | None:
    """Each token's top-k_aux affinities among the ``candidates`` latents (aux_k's rule)."""
    idx = torch.nonzero(candidates).squeeze(1)
    if idx.numel() == 0:
        return None
    k = min(k_aux, idx.numel())
    B = out.x.shape[0]
    # the candidates' columns, a chunk of tokens at a time: never a second [B, F] tensor
    chunk = max(1, (1 << 22) // idx.numel())
    top = torch.cat([torch.topk(out.columns(idx, slice(i, i + chunk)), k, dim=1, sorted=False).indices
                     for i in range(0, B, chunk)])
    return Selection(rows=torch.arange(B, device=idx.device).repeat_interleave(k),
                     cols=idx[top].reshape(-1), n_tokens=B)


def per_latent_aux_selection(out: StepOutput, candidates: Tensor, quota: Tensor) -> Selection | None:
    """Each candidate latent j's top-quota_j tokens (Feature Choice's rule)."""
    idx = torch.nonzero(candidates).squeeze(1)
    if idx.numel() == 0:
        return None
    B = out.x.shape[0]
    lat, tok, _, _ = per_column_topk(out.columns(idx).t().contiguous(), quota[idx].clamp(1, B))
    return sort_pairs(tok, idx[lat], n_tokens=B, n_latents=out.code.n_latents)


def aux_residual_loss(out: StepOutput, sae: SparseAutoencoder, sel: Selection | None,
                      weights: Tensor | None = None) -> Tensor:
    """Σ‖e − ê‖² / Σ‖e − ē‖² where e = x − x̂ (detached) and ê decodes, without bias, the
    selected auxiliary entries; 0 when nothing is selected."""
    if sel is None:
        return out.x.new_zeros(())
    code = sae.code(out.x, out.z, sel, out.layout, weights)
    e = (out.x - out.x_hat).detach()
    e_hat = sparse_decode(code, sae.W_dec)
    return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)


@_register
@dataclass
class AuxK(LossTerm):
    name: ClassVar[str] = "aux_k"
    coef: float = 1.0 / 32
    k_aux: int | None = None  # None: d_model // 2

    def validate(self, prefix, d_model):
        super().validate(prefix, d_model)
        require(self.k_aux is None or self.k_aux >= 1, f"{prefix}.k_aux", self.k_aux, "null (d_model // 2) or an integer >= 1")

    def __call__(self, out, sae, stats):
        sel = per_token_aux_selection(out, stats.dead_mask(), self.k_aux or sae.d_model // 2)
        return aux_residual_loss(out, sae, sel)


@_register
@dataclass
class AuxZipf(LossTerm):
    """aux_k generalised from dead to under-used latents: U = dead ∪ {j : ρ_j < τ·t_j}, t the
    water-filled Zipf targets (Σ t_j = k, t_j ≤ 1). With ``selection = per_latent`` the loss
    is aux_k's term for the dead latents plus a second term of the same form in which each
    live under-used latent j takes its own top-q_j tokens, q_j = ⌈(t_j − ρ_j)·B⌉ (its
    deficit in tokens), so no latent is starved by others; ``per_token`` puts all of U in
    aux_k's per-token slots (one term).
    With ``deficit_weighting`` latent j's values are scaled by (t_j − ρ_j)/t_j (1 if dead).
    With τ = 0, U is the dead set and this is exactly aux_k."""

    name: ClassVar[str] = "aux_zipf"
    coef: float = 1.0 / 32
    k_aux: int | None = None
    tau: float = 0.25
    alpha: float = 1.0
    beta: float = 0.0
    deficit_weighting: bool = True
    selection: str = "per_token"  # per_token | per_latent (for the live under-used latents)

    def validate(self, prefix, d_model):
        super().validate(prefix, d_model)
        require(self.k_aux is None or self.k_aux >= 1, f"{prefix}.k_aux", self.k_aux, "null (d_model // 2) or an integer >= 1")
        require(self.tau >= 0, f"{prefix}.tau", self.tau, "a number >= 0")
        require(self.alpha >= 0, f"{prefix}.alpha", self.alpha, "a number >= 0")
        require(self.beta > -1, f"{prefix}.beta", self.beta, "a number > -1")
        require_choice(f"{prefix}.selection", self.selection, ("per_latent", "per_token"))

    def __call__(self, out, sae, stats):
        targets = stats.targets(alpha=self.alpha, beta=self.beta)
        dead = stats.dead_mask()
        under = stats.underused_mask(ratio=self.tau, targets=targets)
        k_aux = self.k_aux or sae.d_model // 2
        weights = None
        if self.deficit_weighting:
            deficit = ((targets - stats.density) / targets.clamp_min(1e-12)).clamp(0.0, 1.0)
            weights = torch.where(dead, torch.ones_like(deficit), deficit).to(out.x.dtype)
        if self.selection == "per_token":
            return aux_residual_loss(out, sae, per_token_aux_selection(out, under, k_aux), weights)
        # two residual reconstructions, each normalised: the dead latents' is exactly aux_k's,
        # so the many live under-used entries cannot explain the residual in their place
        B = out.x.shape[0]
        quota = torch.ceil((targets - stats.density).clamp_min(0) * B).to(torch.long)
        return (aux_residual_loss(out, sae, per_token_aux_selection(out, dead, k_aux), weights)
                + aux_residual_loss(out, sae, per_latent_aux_selection(out, under & ~dead, quota), weights))


def build_losses(spec: dict | None, d_model: int, prefix: str = "variant.losses") -> dict[str, LossTerm]:
    """From ``{name: {param: value}}`` (None or {} params allowed); ``recon`` is always on."""
    spec = dict(spec or {})
    spec.setdefault("recon", {})
    terms = {}
    for name, params in spec.items():
        if name not in LOSSES:
            raise ConfigError(f"{prefix}.{name}", name, "a loss among " + ", ".join(sorted(LOSSES)))
        params = dict(params or {})
        cls = LOSSES[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in params:
            if key not in fields:
                raise ConfigError(f"{prefix}.{name}.{key}", params[key], f"a parameter of loss {name!r}: {sorted(fields)}")
        term = cls(**params)
        term.validate(f"{prefix}.{name}", d_model)
        terms[name] = term
    return terms
