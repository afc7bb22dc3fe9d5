"""The autoencoder: parameters, normalisation, initialisation, encode, sparse decode, and
the decoder's norm: held at 1 (gradient projection before a step, renormalisation after), or
free, with selection on z'_j·‖d_j‖."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blockwise import AffinityBlocks
from .sparse import ByLatent, Selection, SparseCode, pair_products, sparse_decode, sum_by_latent

Normalisation = Literal["none", "dataset_scale", "layernorm"]
BPreInit = Literal["geometric_median", "mean", "zeros"]
AffinityDtype = Literal["auto", "float32", "bfloat16"]
DecoderNorm = Literal["unit", "free"]
AFFINITY_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _cpu_has(feature: str) -> bool:
    probe = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return probe is not None and bool(probe())


def auto_affinity_choice(device: torch.device) -> tuple[torch.dtype, str]:
    """``model.affinity_dtype=auto``, and why: bfloat16 on a CPU with a bf16 matrix product in
    hardware (AMX tiles, Intel Sapphire Rapids on; or AVX512_BF16, AMD Zen 4 and Intel Cooper
    Lake on), where it runs several times fp32's and selection stays exact by re-scoring
    (rescore.py; docs/performance.md has the measurements); float32 elsewhere (where the bf16
    product is emulated, and on GPUs, not measured)."""
    if device.type != "cpu":
        return torch.float32, f"auto on {device.type}: fp32 (bf16 selection is measured on CPUs only)"
    if _cpu_has("amx_tile"):
        return torch.bfloat16, "auto: this CPU has AMX tiles, whose bf16 product runs several times fp32's"
    if _cpu_has("avx512_bf16"):
        return torch.bfloat16, "auto: this CPU has AVX512_BF16, whose bf16 product runs 2-5x fp32's (Zen 4, measured)"
    return torch.float32, "auto: this CPU has no bf16 product in hardware (no AMX, no AVX512_BF16)"


def auto_affinity_dtype(device: torch.device) -> torch.dtype:
    """The dtype of :func:`auto_affinity_choice`."""
    return auto_affinity_choice(device)[0]


BIAS_COLUMNS = 16  # the low-precision product's extra inner dimension: the bias, then zeros


def _with_bias_column(a: Tensor, bias: Tensor | None, dtype: torch.dtype, scale: Tensor | None = None) -> Tensor:
    """[n, d] → [n, d + 16] in ``dtype``: ``a`` (each row times ``scale``, where given: written
    straight into the operand, no full-precision [n, d] copy), then ``bias`` (None: ones; also
    scaled), then zeros. The low-precision affinities are one plain product of two such
    operands, the bias added inside it: ``addmm`` first writes the broadcast bias into the whole
    [B, F] output, a pass the bias column saves (docs/performance.md). Only selection's
    candidates read that matrix (rescore.py), so how it rounds is free."""
    n, d = a.shape
    out = torch.empty((n, d + BIAS_COLUMNS), dtype=dtype, device=a.device)
    if scale is None:
        out[:, :d] = a
    else:
        torch.mul(a, scale.unsqueeze(1), out=out[:, :d])
    out[:, d] = 1.0 if bias is None else (bias if scale is None else bias * scale)
    out[:, d + 1 :] = 0
    return out


class SelectedAffinities(torch.autograd.Function):
    """The selected affinities v_e = W_enc[c_e]·(x[r_e] − b_pre) + b_enc[c_e] as a function
    of the encoder parameters, with a sparse backward.

    Forward takes the values already computed (from the affinity matrix, which is built
    without autograd). Backward costs O(nnz·d): ∂b_enc is a scatter-add of the incoming
    gradient, ∂W_enc[j] = Σ_{e: c_e = j} g_e (x[r_e] − b_pre) is one ``embedding_bag`` over
    the entries grouped by latent, and ∂b_pre = −∂b_encᵀ W_enc. No dense [B, F] gradient is
    ever formed, and the dense matmul of the encoder's backward is skipped. ``centred``: the
    value of xn − b_pre, where the step holds it (else formed again in the backward).
    """

    @staticmethod
    def forward(ctx, values, W_enc, b_enc, b_pre, xn, rows, cols, by_latent=None, centred=None):
        if centred is None:
            ctx.save_for_backward(W_enc, b_pre, xn, rows, cols)
        else:
            ctx.save_for_backward(W_enc, centred, rows, cols)
        ctx.by_latent, ctx.centred = by_latent, centred is not None
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        if ctx.centred:
            W_enc, xc, rows, cols = ctx.saved_tensors
        else:
            W_enc, b_pre, xn, rows, cols = ctx.saved_tensors
            xc = xn - b_pre
        n_latents = W_enc.shape[0]
        g = g.contiguous()
        g_b = torch.zeros(n_latents, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        g_W = None
        if ctx.needs_input_grad[1]:
            g_W = sum_by_latent(cols, rows, g, xc.to(g.dtype), n_latents, ctx.by_latent)
        g_pre = -(g_b @ W_enc) if ctx.needs_input_grad[3] else None
        return None, g_W, g_b if ctx.needs_input_grad[2] else None, g_pre, None, None, None, None, None


def geometric_median(x: Tensor, iters: int = 100, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's iterations for argmin_y Σ_i ‖x_i − y‖, started at the mean."""
    x = x.to(torch.float64)
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w.unsqueeze(1) * x).sum(0) / w.sum()
        done = (y_new - y).norm() <= tol * y.norm().clamp_min(1.0)
        y = y_new
        if done:
            break
    return y


class ExactRanked:
    """What a SAE's affinity matrix ranks, in the parameters' dtype, for normalised tokens
    ``xn``: the re-scoring of a low-precision matrix (:class:`rescore.Exact`). ``centred``:
    xn − b_pre, where the caller holds it (else computed here, once for every call)."""

    def __init__(self, sae: SparseAutoencoder, xn: Tensor, centred: Tensor | None = None):
        self.sae, self.xn = sae, xn
        self.centred = xn - sae.b_pre.detach() if centred is None else centred

    def __call__(self, tokens: Tensor, latents: Tensor) -> Tensor:
        return self.sae.exact_ranked(self.xn, tokens, latents, self.centred)

    def latent_rows(self, tokens: Tensor) -> Tensor:
        return self.sae.affinities(self.xn[tokens], layout="latent", centred=self.centred[tokens])


class SparseAutoencoder(nn.Module):
    """x → normalise → z' = W_enc (x − b_pre) + b_enc → [allocator] → x̂ = W_dec z + b_pre.

    ``W_dec`` is stored as [F, d]: row j is latent j's decoder direction (a column of the
    W_dec of the paper), which is the layout ``embedding_bag`` reads.
    """

    scale: Tensor
    x_second_moment: Tensor
    x_variance: Tensor
    initialised: Tensor

    def __init__(
        self,
        d_model: int,
        n_latents: int,
        normalisation: str = "dataset_scale",
        b_pre_init: str = "geometric_median",
        decoder_norm: str = "unit",
        decoder_init_norm: float | None = None,
    ):
        super().__init__()
        self.d_model, self.n_latents = d_model, n_latents
        self.normalisation, self.b_pre_init = normalisation, b_pre_init
        self.decoder_norm, self.decoder_init_norm = decoder_norm, decoder_init_norm
        self._held_norms: Tensor | None = None  # decoder_norms() held (holding_ranked_encoder)
        self._held_encoder: tuple[Tensor, Tensor] | None = None  # ranked_encoder() held
        self._held_operand: Tensor | None = None  # ranked_operand() held
        self._holding = False  # inside holding_ranked_encoder
        # the dense affinity matrix's buffer, kept between training steps (reusing_affinities)
        self._workspace: Tensor | None = None
        self._workspace_free = False  # inside reusing_affinities, until the matrix is handed out
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_model))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_model))
        self.b_pre = nn.Parameter(torch.zeros(d_model))
        self.register_buffer("scale", torch.ones(()))  # dataset_scale's c
        # per-element second moment and variance of the normalised inputs (from the init sample):
        # what the reconstruction loss can be divided by
        self.register_buffer("x_second_moment", torch.ones(()))
        self.register_buffer("x_variance", torch.ones(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.d_model)
        self.W_enc.uniform_(-bound, bound)
        self.W_dec.copy_(self.W_enc)  # tied init, untied afterwards
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if self.decoder_init_norm is not None:  # SAELens: rows of this norm, the encoder tied to them
            self.W_dec.mul_(self.decoder_init_norm)
            self.W_enc.copy_(self.W_dec)
        self.b_enc.zero_()
        self.b_pre.zero_()

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> dict[str, float]:
        """Set the normalisation scale and b_pre from a sample of raw activations."""
        x = x.to(self.W_enc.device, torch.float32)
        if self.normalisation == "dataset_scale":
            self.scale.fill_(math.sqrt(self.d_model / float(x.pow(2).sum(1).mean().clamp_min(1e-30))))
        xn, _ = self.normalise(x)
        self.x_second_moment.fill_(float(xn.pow(2).mean()))
        self.x_variance.fill_(float((xn - xn.mean(0)).pow(2).mean()))
        if self.b_pre_init == "geometric_median":
            self.b_pre.copy_(geometric_median(xn).to(self.b_pre.dtype))
        elif self.b_pre_init == "mean":
            self.b_pre.copy_(xn.mean(0))
        else:
            self.b_pre.zero_()
        self.initialised.fill_(True)
        return {
            "scale": float(self.scale),
            "b_pre_norm": float(self.b_pre.norm()),
            "variance_share": float(self.x_variance / self.x_second_moment),
        }

    # ---- normalisation ------------------------------------------------------------------
    def normalise(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        if self.normalisation == "dataset_scale":
            return x * self.scale, None
        if self.normalisation == "layernorm":
            mu = x.mean(dim=1, keepdim=True)
            xc = x - mu
            sigma = xc.pow(2).mean(dim=1, keepdim=True).add(1e-5).sqrt()  # ‖x − μ‖ / √d
            return xc / sigma, (mu, sigma)
        return x, None

    def denormalise(self, x_hat: Tensor, ctx: tuple[Tensor, Tensor] | None) -> Tensor:
        """Map a reconstruction back to the model's own units."""
        if self.normalisation == "dataset_scale":
            return x_hat / self.scale
        if self.normalisation == "layernorm":
            assert ctx is not None, "layernorm needs the (mean, scale) that normalise() returned"
            mu, sigma = ctx
            return x_hat * sigma + mu
        return x_hat

    def normalise_gradient(self, g: Tensor, ctx: tuple[Tensor, Tensor] | None) -> Tensor:
        """∇ₓL in normalised units (∇ with respect to what :meth:`normalise` returned, its
        per-token mean and scale held fixed): a latent's unit of code moves the model's x by
        d_j/c (dataset_scale) or σ·d_j (layernorm), so the loss by (d_j·g)/c or σ·(d_j·g)."""
        if self.normalisation == "dataset_scale":
            return g / self.scale
        if self.normalisation == "layernorm":
            assert ctx is not None, "layernorm needs the (mean, scale) that normalise() returned"
            return g * ctx[1]
        return g

    # ---- encode / decode ----------------------------------------------------------------
    @torch.no_grad()
    def affinities(
        self,
        xn: Tensor,
        cols: slice | Tensor | None = None,
        layout: str = "token",
        dtype: torch.dtype = torch.float32,
        centred: Tensor | None = None,
    ) -> Tensor:
        """z' = W_enc (x − b_pre) + b_enc for normalised x, without autograd: [B, F] for the
        ``token`` layout, [F, B] for ``latent``; ``cols`` restricts the latents. A bfloat16
        ``dtype`` computes the matrix in bf16 (for selection only; see :meth:`code`).
        ``centred``: xn − b_pre, where the caller holds it."""
        xc = xn - self.b_pre if centred is None else centred
        low = dtype != self.W_enc.dtype
        if low:  # the bias inside the product (_with_bias_column)
            W = self.ranked_operand(dtype) if cols is None else _with_bias_column(*self.ranked_encoder(cols), dtype)
            xc = _with_bias_column(xc, None, dtype)
        else:
            W, b = self.ranked_encoder(cols)
        n_rows, n_cols = (xn.shape[0], W.shape[0]) if layout == "token" else (W.shape[0], xn.shape[0])
        out = self._workspace_for(n_rows, n_cols, dtype, xn.device) if cols is None else None
        if low:
            return torch.mm(xc, W.t(), out=out) if layout == "token" else torch.mm(W, xc.t(), out=out)
        if layout == "token":
            return torch.addmm(b, xc, W.t(), out=out)
        return torch.addmm(b.unsqueeze(1), W, xc.t(), out=out)

    @contextlib.contextmanager
    def reusing_affinities(self) -> Iterator[None]:
        """Within (a training step), the first dense affinity matrix of all latents is written
        into a buffer this SAE keeps from one such step to the next (on a CPU): the matrix is
        the step's largest allocation, and a fresh one each step lets glibc's heap place the
        step's smaller, longer-lived blocks in the hole the last one left, so that the next
        matrix no longer fits there and the heap grows, each growth step slower than the last
        (docs/performance.md).
        Only one matrix per step is handed out: the step must not keep it (nor a view of it)
        past its end, which the training step does not."""
        self._workspace_free = True
        try:
            yield
        finally:
            self._workspace_free = False

    def _workspace_for(self, n_rows: int, n_cols: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        if not self._workspace_free or device.type != "cpu":  # CUDA's caching allocator reuses already
            return None
        self._workspace_free = False
        w = self._workspace
        if w is None or w.shape != (n_rows, n_cols) or w.dtype != dtype or w.device != device:
            self._workspace = None  # (the old one freed before the new one is allocated)
            w = self._workspace = torch.empty(n_rows, n_cols, dtype=dtype, device=device)
        return w

    def affinity_blocks(
        self,
        xn: Tensor,
        block: int,
        layout: str = "token",
        dtype: torch.dtype = torch.float32,
        centred: Tensor | None = None,
    ) -> AffinityBlocks:
        """z′ of ``xn`` as blocks of ``block`` latents (see :mod:`blockwise`), computed on demand
        (xn − b_pre once for all of them; ``centred``: that, where the caller holds it)."""
        xc = xn - self.b_pre.detach() if centred is None else centred
        return AffinityBlocks(
            lambda cols: self.affinities(xn, cols, layout, dtype, xc),
            xn.shape[0],
            self.n_latents,
            block,
            layout,
            columns_of=lambda latents, tokens: self.affinities(xn[tokens], latents, "token", dtype, xc[tokens]),
        )

    @torch.no_grad()
    def exact_affinities(self, xn: Tensor, rows: Tensor, cols: Tensor, centred: Tensor | None = None) -> Tensor:
        """z'[r_e, c_e] in the parameters' dtype for distinct pairs (r_e, c_e), computed pair by
        pair (O(nnz·d)); without the decoder norms that a free decoder's affinity matrix carries.
        ``centred``: xn − b_pre, where the caller holds it."""
        return pair_products(xn - self.b_pre if centred is None else centred, self.W_enc, rows, cols, self.b_enc)

    @torch.no_grad()
    def exact_ranked(self, xn: Tensor, rows: Tensor, cols: Tensor, centred: Tensor | None = None) -> Tensor:
        """What the affinity matrix ranks (z', times ‖d_j‖ for a free decoder) at distinct pairs,
        in the parameters' dtype: the re-scoring of a low-precision matrix (:mod:`rescore`)."""
        values = self.exact_affinities(xn, rows, cols, centred)
        norms = self.decoder_norms()
        return values if norms is None else values * norms[cols]

    @torch.no_grad()
    def encoder_finite(self) -> bool:
        """Whether the parameters z′ is computed from are finite (then, for finite inputs, so
        is z′, but where the product overflows). One sum each: NaN and ±inf reach it (a sum of
        finite entries overflows only where they are ~1e32, a run long diverged), a read of
        each tensor where ``isfinite(...).all()`` writes a mask of it first (docs/performance.md)."""
        return all(bool(torch.isfinite(p.sum())) for p in (self.W_enc, self.b_enc, self.b_pre))

    @torch.no_grad()
    def decoder_norms(self, cols: slice | Tensor | None = None) -> Tensor | None:
        """‖d_j‖ of a free decoder (what the affinity matrix is scaled by), None for a unit one;
        inside :meth:`holding_ranked_encoder`, all of them are computed once."""
        if self.decoder_norm != "free":
            return None
        if cols is None and self._held_norms is not None:
            return self._held_norms
        W = self.W_dec if cols is None else self.W_dec[cols]
        return W.norm(dim=1).clamp_min(1e-12)

    @torch.no_grad()
    def ranked_encoder(self, cols: slice | Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(W, b) of the affinity matrix the allocators rank: W_enc and b_enc, each latent's
        times ‖d_j‖ for a free decoder (one [F, d] scaling, not a pass over [B, F]); inside
        :meth:`holding_ranked_encoder`, all of them are computed once."""
        if cols is None and self._held_encoder is not None:
            return self._held_encoder
        W, b = (self.W_enc, self.b_enc) if cols is None else (self.W_enc[cols], self.b_enc[cols])
        norms = self.decoder_norms(cols)
        if norms is not None:
            W, b = W * norms.unsqueeze(1), b * norms
        if cols is None and self._holding:
            self._held_encoder = W, b
        return W, b

    @torch.no_grad()
    def ranked_operand(self, dtype: torch.dtype) -> Tensor:
        """The ranked encoder (W, b) of all latents as the low-precision product's [F, d + 16]
        operand (:func:`_with_bias_column`; a free decoder's norms applied as it is written, with
        no full-precision W·‖d‖ formed); inside :meth:`holding_ranked_encoder`, computed once."""
        held = self._held_operand
        if held is not None and held.dtype == dtype:
            return held
        if self._held_encoder is not None:  # already formed in full precision this step
            operand = _with_bias_column(*self._held_encoder, dtype)
        else:
            operand = _with_bias_column(self.W_enc, self.b_enc, dtype, self.decoder_norms())
        if self._holding:
            self._held_operand = operand
        return operand

    @contextlib.contextmanager
    def holding_ranked_encoder(self) -> Iterator[None]:
        """While the parameters do not change (a step's forward and loss terms: they ask ~5
        times, each an [F, d] pass), :meth:`decoder_norms`, :meth:`ranked_encoder`
        and :meth:`ranked_operand` compute theirs once (the latter two when first asked: a
        low-precision step needs only the operand)."""
        held = self._held_norms, self._held_encoder, self._held_operand, self._holding
        self._held_norms = self._held_encoder = self._held_operand = None
        self._held_norms = self.decoder_norms()
        self._holding = True
        try:
            yield
        finally:
            self._held_norms, self._held_encoder, self._held_operand, self._holding = held

    @torch.no_grad()
    def folded(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W_enc, b_enc, W_dec) with a free decoder's norms folded in (W_enc_j·‖d_j‖,
        b_enc_j·‖d_j‖, d_j/‖d_j‖): unit rows, the same codes' ranking and the same x̂, the form
        other tools read (and the only one for a unit decoder)."""
        norms = self.decoder_norms()
        if norms is None:
            return self.W_enc, self.b_enc, self.W_dec
        return self.W_enc * norms.unsqueeze(1), self.b_enc * norms, self.W_dec / norms.unsqueeze(1)

    def code(
        self,
        xn: Tensor,
        z: Tensor | AffinityBlocks,
        selection: Selection,
        layout: str = "token",
        weights: Tensor | None = None,
        values: str = "relu",
        train_b_pre: bool = True,
        centred: Tensor | None = None,
    ) -> SparseCode:
        """The sparse code of a selection, differentiable with respect to the encoder through a
        sparse backward. ``values``: ``relu`` (the SAE's own: ReLU(z') at the selected pairs,
        non-positive ones dropped), or, for auxiliary codes, ``linear`` (z' itself, negative
        values kept, as SAELens's aux-k) or ``softplus`` (log(1 + e^z'): positive, with a
        gradient however negative z' is). ``weights`` ([F]) scales each latent's values.
        ``train_b_pre=False`` (the auxiliary codes): the values' gradient reaches W_enc and b_enc
        only, not b_pre (which the reconstruction alone trains). ``centred``: xn − b_pre (no
        gradient), where the caller holds it."""
        rows, cols = selection.rows, selection.cols
        with torch.no_grad():
            ranked = None  # the ranked matrix's values at the pairs, where at hand
            if isinstance(z, Tensor) and z.dtype == self.W_enc.dtype:
                ranked = z[rows, cols] if layout == "token" else z[cols, rows]
            elif selection.values is not None:  # re-scored by the selection itself (rescore.py)
                ranked = selection.values.to(self.W_enc.dtype)
            raw = self.raw_values(xn, rows, cols, ranked, centred)
            if values == "relu":
                keep = raw > 0
                if not bool(keep.all()):
                    rows, cols, raw = rows[keep], cols[keep], raw[keep]
        by_latent = ByLatent(cols, self.n_latents)  # sorted once, for both backwards (encoder, decoder)
        v = self.pair_values(xn, rows, cols, raw, train_b_pre, centred, by_latent)
        if values == "softplus":
            v = F.softplus(v)
        if weights is not None:
            v = v * weights[cols]
        return SparseCode.build(rows, cols, v, selection.n_tokens, self.n_latents, by_latent)

    @torch.no_grad()
    def raw_values(
        self, xn: Tensor, rows: Tensor, cols: Tensor, ranked: Tensor | None, centred: Tensor | None = None
    ) -> Tensor:
        """z' at the pairs (no gradient): from the ranked matrix's values there (divided by a
        free decoder's norms, which it carries), else (None) computed pair by pair."""
        if ranked is None:  # selection made in low precision or blockwise: computed pair by pair
            return self.exact_affinities(xn, rows, cols, centred)
        norms = self.decoder_norms()  # a free decoder's matrix ranks z'·‖d‖; the code holds z'
        return ranked if norms is None else ranked / norms[cols]

    def pair_values(
        self,
        xn: Tensor,
        rows: Tensor,
        cols: Tensor,
        raw: Tensor,
        train_b_pre: bool = True,
        centred: Tensor | None = None,
        by_latent: ByLatent | None = None,
    ) -> Tensor:
        """z' at distinct (token, latent) pairs in any order, its values ``raw`` (:meth:`raw_values`)
        made differentiable with respect to the encoder through the sparse backward
        (:class:`SelectedAffinities`), no code built; ``train_b_pre=False``: no gradient to b_pre."""
        b_pre = self.b_pre if train_b_pre else self.b_pre.detach()
        by_latent = by_latent or ByLatent(cols, self.n_latents)
        return SelectedAffinities.apply(raw, self.W_enc, self.b_enc, b_pre, xn, rows, cols, by_latent, centred)

    def decode(self, code: SparseCode) -> Tensor:
        return sparse_decode(code, self.W_dec) + self.b_pre

    # ---- unit-norm decoder (nothing to do for a free one) -----------------------------------
    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder direction's gradient its component along the direction."""
        g = self.W_dec.grad
        if g is not None and self.decoder_norm == "unit":
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    @torch.no_grad()
    def renormalise_decoder(self) -> None:
        if self.decoder_norm == "unit":
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
