"""The sparse code every allocator returns: CSR rows of (latent, value) per token, and its decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Selection:
    """Which (token, latent) pairs an allocator keeps, sorted by token (row-major order).

    Carries no gradient: the selection itself is not differentiated.
    """

    rows: Tensor  # [nnz] int64, non-decreasing
    cols: Tensor  # [nnz] int64
    n_tokens: int
    # the ranked matrix's values at the pairs in the parameters' dtype, where selection computed
    # them pair by pair (the re-scoring of a low-precision matrix, rescore.py); else None
    values: Tensor | None = None


@dataclass
class SparseCode:
    """A batch of sparse codes in CSR layout; the number of latents per token varies.

    ``offsets[i]:offsets[i+1]`` index the entries of token ``i`` in ``latents`` and
    ``values``. Only active entries are stored (value > 0); TopK's fixed k per token is the
    special case where every row has k entries.
    """

    offsets: Tensor  # [B + 1] int64
    latents: Tensor  # [nnz] int64
    values: Tensor  # [nnz] float, > 0, carries the gradient to the affinities
    n_latents: int

    @property
    def n_tokens(self) -> int:
        return self.offsets.numel() - 1

    @property
    def nnz(self) -> int:
        return self.latents.numel()

    def l0_per_token(self) -> Tensor:
        return self.offsets.diff()

    def fire_counts(self) -> Tensor:
        """Number of tokens each latent is active on, [F] int64."""
        return torch.bincount(self.latents, minlength=self.n_latents)

    def token_index(self) -> Tensor:
        return torch.repeat_interleave(torch.arange(self.n_tokens, device=self.offsets.device), self.l0_per_token())

    def to_dense(self) -> Tensor:
        dense = self.values.new_zeros(self.n_tokens, self.n_latents)
        dense[self.token_index(), self.latents] = self.values
        return dense

    @staticmethod
    def build(rows: Tensor, cols: Tensor, values: Tensor, n_tokens: int, n_latents: int) -> SparseCode:
        """CSR from (row, col, value) triples already sorted by row."""
        offsets = torch.zeros(n_tokens + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(torch.bincount(rows, minlength=n_tokens), 0, out=offsets[1:])
        return SparseCode(offsets=offsets, latents=cols, values=values, n_latents=n_latents)

    @staticmethod
    def from_selection(affinities: Tensor, selection: Selection) -> SparseCode:
        """ReLU(z') at the selected pairs of a token-major matrix, non-positive ones dropped.

        A plain (autograd) gather for dense inputs, used by tests and analysis; training
        goes through :meth:`SparseAutoencoder.code`, whose backward is sparse.
        """
        rows, cols = selection.rows, selection.cols
        raw = affinities[rows, cols]
        keep = raw.detach() > 0
        return SparseCode.build(rows[keep], cols[keep], raw[keep], selection.n_tokens, affinities.shape[1])


def sparse_decode(code: SparseCode, decoder_rows: Tensor) -> Tensor:
    """Σ_j z_ij · W_dec[:, j] for each token, without bias; ``decoder_rows`` is [F, d].

    Uses ``embedding_bag`` so that the cost scales with the number of active entries, not
    with B·F; its backward gives the gradients of both the values and the decoder rows.
    """
    return F.embedding_bag(
        code.latents,
        decoder_rows,
        code.offsets,
        mode="sum",
        per_sample_weights=code.values,
        include_last_offset=True,
    )
