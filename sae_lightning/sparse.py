"""The sparse code every allocator returns: CSR rows of (latent, value) per token, its decode,
and the O(nnz·d) products at (token, latent) pairs the sparse step is built from."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def csr_offsets(index: Tensor, n: int) -> Tensor:
    """[n + 1] offsets of entries grouped by ``index`` (values in [0, n)): group i holds
    entries offsets[i]:offsets[i + 1] once they are in index order."""
    offsets = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=n), 0, out=offsets[1:])
    return offsets


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


class ByLatent:
    """A code's entries grouped by latent: a stable ``argsort`` of their latents and each
    latent's offsets, computed on first use and then shared by the backward passes that need
    it (the encoder's and the decoder's weight gradients: one sort a step, not two)."""

    def __init__(self, latents: Tensor, n_latents: int):
        self.latents, self.n_latents = latents, n_latents
        self._grouped: tuple[Tensor, Tensor] | None = None

    def __call__(self) -> tuple[Tensor, Tensor]:
        """(perm, offsets [n_latents + 1]): latents[perm] is non-decreasing, stably."""
        if self._grouped is None:
            perm = torch.argsort(self.latents, stable=True)
            self._grouped = perm, csr_offsets(self.latents, self.n_latents)
        return self._grouped


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
    by_latent: ByLatent | None = None  # its entries grouped by latent, shared by the backwards

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
    def build(
        rows: Tensor, cols: Tensor, values: Tensor, n_tokens: int, n_latents: int, by_latent: ByLatent | None = None
    ) -> SparseCode:
        """CSR from (row, col, value) triples already sorted by row."""
        return SparseCode(
            offsets=csr_offsets(rows, n_tokens), latents=cols, values=values, n_latents=n_latents, by_latent=by_latent
        )

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


def csr_products(a: Tensor, b: Tensor, crow: Tensor, col: Tensor, start: Tensor | None = None) -> Tensor:
    """a[r]·b[c] (+ ``start``) for the entries (r, c) of a CSR pattern (``crow`` [n + 1],
    ``col`` [nnz]; columns in any order within a row) of a [n, d] and b [m, d], in their dtype:
    one ``torch.sparse.sampled_addmm``, O(nnz·d), no [nnz, d] copies."""
    if col.numel() == 0:
        return a.new_zeros(0)
    values = start if start is not None else a.new_zeros(col.numel())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(crow, col, values, size=(a.shape[0], b.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, b.t()).values()


def sum_by_latent(
    latents: Tensor, rows: Tensor, weights: Tensor, vectors: Tensor, n_latents: int, by_latent: ByLatent | None = None
) -> Tensor:
    """[n_latents, d]: Σ_e weights_e · vectors[rows_e] over each latent's entries e (the weight
    gradient of a sparse product), one ``embedding_bag`` over the entries grouped by latent
    (``by_latent``'s grouping of these ``latents``, where given)."""
    perm, offsets = (by_latent or ByLatent(latents, n_latents))()
    return F.embedding_bag(
        rows[perm], vectors, offsets, mode="sum", per_sample_weights=weights[perm], include_last_offset=True
    )


def pair_products(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor, bias: Tensor | None = None) -> Tensor:
    """a[r_e]·b[c_e] (+ bias[c_e]) for distinct pairs (r_e, c_e) of a [n, d] and b [m, d], in
    their dtype, O(nnz·d). One ``torch.sparse.sampled_addmm`` (the product only at a CSR
    pattern), where gathering the pairs' rows would write two [nnz, d] copies. Pairs already
    grouped by row, rows in order (a CSR pattern: the columns of a row in any order), skip the
    sort; so do pairs in column order, as the pattern of the transposed product b·aᵀ (the same
    dot products, bit for bit). Both measured in docs/performance.md."""
    n = a.shape[0]
    out = torch.empty(rows.numel(), dtype=a.dtype, device=rows.device)
    if rows.numel() == 0:
        return out
    ordered = bool((rows[1:] >= rows[:-1]).all())
    if not ordered and bool((cols[1:] >= cols[:-1]).all()):  # by column: the transposed product
        return csr_products(b, a, csr_offsets(cols, b.shape[0]), rows, bias[cols] if bias is not None else None)
    order = None if ordered else torch.argsort(rows, stable=True)  # CSR: by row
    r, c = (rows, cols) if order is None else (rows[order], cols[order])
    values = csr_products(a, b, csr_offsets(r, n), c, bias[c] if bias is not None else None)
    if order is None:
        return values
    out[order] = values
    return out


class _Decode(torch.autograd.Function):
    """``embedding_bag``'s forward with a backward of two O(nnz·d) kernels instead of its own
    (which scatters through a sorted copy of the indices; docs/performance.md): the values'
    gradient g[r]·d_j as one sampled
    product on the code's own CSR pattern, the decoder rows' gradient Σ v·g[r] as an
    ``embedding_bag`` over the entries grouped by latent."""

    @staticmethod
    def forward(ctx, values, decoder_rows, latents, offsets, by_latent=None):
        ctx.save_for_backward(values, decoder_rows, latents, offsets)
        ctx.by_latent = by_latent
        return F.embedding_bag(
            latents, decoder_rows, offsets, mode="sum", per_sample_weights=values, include_last_offset=True
        )

    @staticmethod
    def backward(ctx, g):
        values, decoder_rows, latents, offsets = ctx.saved_tensors
        g = g.contiguous().to(decoder_rows.dtype)
        g_values = csr_products(g, decoder_rows, offsets, latents) if ctx.needs_input_grad[0] else None
        g_rows = None
        if ctx.needs_input_grad[1]:
            rows = torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=g.device), offsets.diff())
            g_rows = sum_by_latent(latents, rows, values.to(g.dtype), g, decoder_rows.shape[0], ctx.by_latent)
        return g_values, g_rows, None, None, None


def sparse_decode(code: SparseCode, decoder_rows: Tensor) -> Tensor:
    """Σ_j z_ij · W_dec[:, j] for each token, without bias; ``decoder_rows`` is [F, d].

    Uses ``embedding_bag`` so that the cost scales with the number of active entries, not
    with B·F; on a CPU its backward is :class:`_Decode`'s (elsewhere ``embedding_bag``'s own)."""
    if decoder_rows.device.type == "cpu" and code.values.dtype == decoder_rows.dtype:
        return _Decode.apply(code.values, decoder_rows, code.latents, code.offsets, code.by_latent)
    return F.embedding_bag(
        code.latents,
        decoder_rows,
        code.offsets,
        mode="sum",
        per_sample_weights=code.values,
        include_last_offset=True,
    )
