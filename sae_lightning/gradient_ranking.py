"""Gradient-aware ranking (g-SAE, Olmo et al. 2024, "Features that Make a Difference"): what an
allocator ranks in a training batch is each affinity weighted by the latent's first-order effect
on the language model's loss,

    s_ij = z'_ij · (1 + β·|d̂_j · ĝ_i|),

where d̂_j is latent j's unit decoder direction and ĝ_i the gradient ∇ₓL of token i (stored in
the activation cache by a harvest with ``data.harvest.gradients=true``) in the SAE's normalised
input units, divided by its RMS per coordinate (``grad_rms``, a buffer set from the
initialisation sample, so that β is dimensionless: |d̂_j · ĝ| is ~0.8 on average for a direction
unrelated to the gradient). The factor is ≥ 1 and the sign of s is z′'s, so the ReLU still drops
what z′ ≤ 0 would. Only the ranking changes: the selected pairs' values are the affinities, and
the auxiliary losses, the statistics and every mode without gradients (validation, calibration,
inference) use the plain affinities. [choice] where the paper is silent; docs/method_choices.md.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .blockwise import AffinityBlocks
from .rescore import Exact
from .sae import SparseAutoencoder
from .sparse import pair_products


class _ExactScores:
    """:class:`rescore.Exact` of the weighted scores."""

    def __init__(self, ranking: GradientRanking, sae: SparseAutoencoder, gn: Tensor, exact: Exact):
        self.ranking, self.sae, self.exact = ranking, sae, exact
        self.D = ranking._directions(sae, None, sae.W_dec.dtype)
        self.g = gn.to(sae.W_dec.dtype)

    def __call__(self, tokens: Tensor, latents: Tensor) -> Tensor:
        effect = pair_products(self.g, self.D, tokens, latents)
        return effect.abs_().add_(1.0).mul_(self.exact(tokens, latents))

    def latent_rows(self, tokens: Tensor) -> Tensor:
        return self.ranking._weight(self.exact.latent_rows(tokens), self.g[tokens], self.sae, None, "latent")


class GradientRanking(nn.Module):
    """β and the gradients' scale; :meth:`scores` weights a batch's affinities."""

    grad_rms: Tensor

    def __init__(self, beta: float):
        super().__init__()
        self.beta = float(beta)
        self.register_buffer("grad_rms", torch.ones(()))

    @torch.no_grad()
    def init_from_sample(self, gn: Tensor) -> dict[str, float]:
        """Set ``grad_rms`` from a sample of gradients already in normalised units."""
        rms = float(gn.double().pow(2).mean().sqrt())
        self.grad_rms.fill_(rms if rms > 0 else 1.0)
        return {"grad_rms": float(self.grad_rms)}

    def _directions(self, sae: SparseAutoencoder, cols: slice | None, dtype: torch.dtype) -> Tensor:
        """β/grad_rms · d̂_j for the latents ``cols`` ([|cols|, d]): unit rows (a free decoder's
        are divided by their norm), with the constant folded in (one [F, d] scaling)."""
        W = sae.W_dec if cols is None else sae.W_dec[cols]
        norms = sae.decoder_norms(cols)
        scale = self.beta / float(self.grad_rms)
        W = W * (scale / norms.unsqueeze(1)) if norms is not None else W * scale
        return W.to(dtype)

    @torch.no_grad()
    def _weight(self, z: Tensor, gn: Tensor, sae: SparseAutoencoder, cols: slice | None, layout: str) -> Tensor:
        """z ⊙ (1 + β·|d̂ ĝ|) for one dense matrix (or block) of affinities in ``layout``."""
        D = self._directions(sae, cols, z.dtype)
        g = gn.to(z.dtype)
        effect = torch.mm(g, D.t()) if layout == "token" else torch.mm(D, g.t())
        return effect.abs_().add_(1.0).mul_(z)

    def exact_scores(self, sae: SparseAutoencoder, gn: Tensor, exact: Exact) -> Exact:
        """The weighted scores in the parameters' dtype, from the affinities' ``exact``: the
        re-scoring of low-precision scores (:mod:`rescore`)."""
        return _ExactScores(self, sae, gn, exact)

    @torch.no_grad()
    def scores(self, sae: SparseAutoencoder, z: Tensor | AffinityBlocks, gn: Tensor, layout: str):
        """What the allocator ranks: the weighted matrix, or blocks of it computed on demand
        beside ``z``'s (only the selection reads them; the auxiliary losses read ``z``)."""
        if isinstance(z, AffinityBlocks):
            blocks = z
            return AffinityBlocks(
                lambda cols: self._weight(blocks.block_of(cols), gn, sae, cols, layout),
                blocks.n_tokens,
                blocks.n_latents,
                blocks.block,
                layout,
            )
        return self._weight(z, gn, sae, None, layout)
