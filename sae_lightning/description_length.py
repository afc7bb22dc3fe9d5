"""Description length of an SAE's codes, in bits per token (Ayonrinde et al., "Interpretability
as Compression", arXiv 2410.11179): what it costs to send which latents fire and their values.

Per latent j over N held-out tokens: p_j its firing probability, H_b(p_j) the binary entropy of
firing, and H(q_j) the entropy of its nonzero values quantised to a precision Δ::

    DL = Σ_j [ H_b(p_j) + p_j · H(q_j) ]   bits per token

Values are quantised as **contributions in the model's units**, u = v·‖d_j‖ (times the
normalisation's scale back to model units): the same Δ then means the same error in x for every
latent and for every SAE of the same activations, whatever its decoder-norm convention (ours,
SAELens's). A value is sent as its bin ⌊u/Δ⌋ and decoded as the bin's centre, so a latent that
fires still fires. Δ is chosen per SAE and mode: the coarsest Δ on the grid u_max·2^(-i/4) whose
quantised reconstruction, and that of every finer Δ, keeps the FVU within ``tolerance``
(relative) of the unquantised one (see :func:`choose_precision`). Entropies are plug-in estimates from the held-out
counts (a latent that fires n_j times carries at most log2 n_j bits per value).

Also reported for scale: the naive cost L0·(log2 F + b), b = ⌈log2⌉ of the levels the largest
value needs at Δ, and the raw activation's cost at the same Δ (each of its d coordinates in
model units, quantised to Δ; Σ of their entropies).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .sparse import SparseCode, sparse_decode

GRID_RATIO = 2 ** (1 / 4)
GRID_STEPS = 160  # the finest Δ tried: 2^-40 of the largest contribution
START_STEP = 64  # the search starts at 2^-16 of it


def entropy_bits(counts: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Per group g, the entropy in bits of the histogram of the ``counts`` whose ``group`` is g
    ([n_groups] float64; 0 for an empty group)."""
    counts = counts.to(torch.float64)
    totals = torch.zeros(n_groups, dtype=torch.float64, device=counts.device).index_add_(0, group, counts)
    p = counts / totals[group]
    return torch.zeros_like(totals).index_add_(0, group, -p * torch.log2(p))


def binary_entropy_bits(p: Tensor) -> Tensor:
    p = p.to(torch.float64)
    q = 1 - p
    return -(torch.xlogy(p, p) + torch.xlogy(q, q)) / math.log(2)


def code_bits(latents: Tensor, bins: Tensor, n_tokens: int, n_latents: int) -> dict[str, float]:
    """DL of entries (latent, value bin) over ``n_tokens`` tokens: the firing part Σ H_b(p_j),
    the value part Σ p_j·H(q_j) and their sum, in bits per token."""
    fires = torch.bincount(latents, minlength=n_latents)
    p = fires.to(torch.float64) / max(n_tokens, 1)
    firing = float(binary_entropy_bits(p).sum())
    if latents.numel() == 0:
        return {"firing_bits": firing, "value_bits": 0.0, "bits": firing}
    bins = bins - bins.min()
    keys, counts = torch.unique(latents * (int(bins.max()) + 1) + bins, return_counts=True)
    h = entropy_bits(counts, torch.div(keys, int(bins.max()) + 1, rounding_mode="floor"), n_latents)
    value = float((p * h).sum())
    return {"firing_bits": firing, "value_bits": value, "bits": firing + value}


# tokens (model units) -> (their sparse code, the normalisation's context): an inference rule
Encode = Callable[[Tensor], tuple[SparseCode, Any]]


@dataclass
class HeldOutCodes:
    """Every held-out token's code in one mode, and what decodes it back to model units."""

    x: Tensor  # [N, d] the tokens, model units
    rows: Tensor  # [nnz] token of each entry
    latents: Tensor  # [nnz]
    values: Tensor  # [nnz] the code's values (the SAE's normalised units)
    unit: Tensor  # [nnz] model units of x per unit of value: ‖d_j‖ · (the normalisation's scale back)
    decode: Callable[[Tensor], Tensor]  # values [nnz] -> x̂ [N, d] in model units
    directions: Tensor | None = None  # [F, d] the unit decoder directions d_j/‖d_j‖ (for the bound)

    def __post_init__(self) -> None:
        self._x = self.x.double()  # every FVU the precision search takes divides by the same total
        self._total = (self._x - self._x.mean(0)).pow(2).sum().clamp_min(1e-30)

    @property
    def contributions(self) -> Tensor:
        return self.values * self.unit

    @torch.no_grad()
    def fvu(self, values: Tensor) -> float:
        return float(self._error(values) / self._total)

    def _error(self, values: Tensor) -> Tensor:
        return (self._x - self.decode(values).double()).pow(2).sum()

    @torch.no_grad()
    def passes_for_sure(self, limit: float) -> Callable[[float], bool]:
        """A test of a precision Δ that is true only where quantising the contributions to Δ
        certainly keeps the FVU ≤ ``limit``, so the search need not decode there. With r_t the
        unquantised residual of token t, a_e = ⟨r_t, d̂_j⟩ for its entry e on latent j, and
        |δu_e| ≤ Δ/2 (a bin's centre is within Δ/2 of the value): ‖r_t − Σ_e δu_e d̂_j‖² ≤
        ‖r_t‖² + Δ·Σ_e |a_e| + (n_t·Δ/2)². A relative margin of 1e-4 (rounding is ~1e-6 of it)
        keeps the certificate valid for the FVU as decoded in float32."""
        assert self.directions is not None, "held_out_codes sets the decoder directions"
        residual = self._x - self.decode(self.values).double()
        error = float(residual.pow(2).sum())
        # a_e in float32 (its rounding, ≤ d·2^-23·‖r_t‖, is covered by adding 2^-10·‖r_t‖)
        r32, norms = residual.float(), residual.norm(dim=1).float()
        reach = torch.empty(self.rows.numel(), dtype=torch.float32)
        for start in range(0, self.rows.numel(), 8192):  # small chunks of gathered rows: cache-sized
            r, j = self.rows[start : start + 8192], self.latents[start : start + 8192]
            dots = torch.index_select(r32, 0, r).mul_(torch.index_select(self.directions, 0, j)).sum(1)
            reach[start : start + 8192] = dots.abs_() + 2**-10 * norms[r]
        linear = float(reach.double().sum())
        per_token = torch.bincount(self.rows, minlength=self.x.shape[0]).double()
        quadratic = float(per_token.pow(2).sum()) / 4
        slack = 2**-20 * float(self.contributions.abs().max()) if self.values.numel() else 0.0  # float32 centres
        allowed = limit * float(self._total) * (1 - 1e-4)

        def certain(delta: float) -> bool:
            step = delta + 2 * slack
            return error + step * linear + step * step * quadratic <= allowed

        return certain


@torch.no_grad()
def held_out_codes(module, x: Tensor, mode: str | Encode, chunk: int | None = None) -> HeldOutCodes:
    """Encode ``x`` (model units) in ``mode`` (or by an inference rule's ``encode``, see
    rules.py), ``chunk`` tokens at a time (the batch size)."""
    sae = module.sae
    x = x.to(module.device)
    rows, latents, values, contexts = [], [], [], []
    start = 0
    for part in x.split(chunk or module.batch_size):
        if callable(mode):
            code, ctx = mode(part)
        else:
            out, ctx = module.forward_step(part, mode)
            code = out.code
        rows.append(code.token_index() + start)
        latents.append(code.latents)
        values.append(code.values.float())
        contexts.append(ctx)
        start += part.shape[0]
    r, j, v = torch.cat(rows), torch.cat(latents), torch.cat(values)
    norms = sae.W_dec.norm(dim=1)[j]
    if sae.normalisation == "dataset_scale":
        back = (1 / sae.scale).expand(r.shape)
    elif sae.normalisation == "layernorm":
        back = torch.cat([sigma.squeeze(1) for _, sigma in contexts])[r]
    else:
        back = torch.ones_like(v)
    ctx_all = None
    if sae.normalisation == "layernorm":
        ctx_all = (torch.cat([c[0] for c in contexts]), torch.cat([c[1] for c in contexts]))
    n, n_latents = x.shape[0], sae.n_latents

    def decode(vals: Tensor) -> Tensor:
        code = SparseCode.build(r, j, vals.to(sae.W_dec.dtype), n, n_latents)
        return sae.denormalise(sparse_decode(code, sae.W_dec) + sae.b_pre, ctx_all)

    directions = sae.W_dec.detach().float() / sae.W_dec.detach().float().norm(dim=1, keepdim=True).clamp_min(1e-30)
    return HeldOutCodes(x=x, rows=r, latents=j, values=v, unit=norms * back, decode=decode, directions=directions)


def quantise(u: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """(bin index ⌊u/Δ⌋, the bin's centre) of contributions ``u``."""
    bins = torch.floor(u.double() / delta).to(torch.long)
    return bins, ((bins.double() + 0.5) * delta).to(u.dtype)


def raw_bits(x: Tensor, delta: float) -> float:
    """Σ over the d coordinates of x of the entropy of the coordinate quantised to Δ."""
    bins = torch.floor(x.double() / delta).to(torch.long)
    bins = bins - bins.min(0).values
    width = int(bins.max()) + 1
    d = x.shape[1]
    keys, counts = torch.unique(torch.arange(d, device=x.device) * width + bins, return_counts=True)
    return float(entropy_bits(counts, torch.div(keys, width, rounding_mode="floor"), d).sum())


def choose_precision(codes: HeldOutCodes, tolerance: float) -> tuple[float, float, float]:
    """(Δ, FVU unquantised, FVU at Δ): the coarsest Δ = u_max·2^(-i/4) such that it and every
    finer Δ keep the FVU within ``tolerance`` of the unquantised one. (FVU is not monotone in Δ:
    a coarse grid can land bin centres that offset the SAE's shrinkage by luck; taking the first
    failure on the way up from fine precisions keeps Δ from jumping between such points.) The
    fine steps that :meth:`HeldOutCodes.passes_for_sure` certifies are taken without decoding:
    the same Δ as decoding every step, in a third of the time (docs/performance.md)."""
    u = codes.contributions
    f0 = codes.fvu(codes.values)
    top = float(u.abs().max()) if u.numel() else 1.0
    limit = f0 * (1 + tolerance) + 1e-12
    certain = codes.passes_for_sure(limit) if codes.directions is not None else (lambda delta: False)

    def fvu_at(i: int) -> float:
        _, centres = quantise(u, top * GRID_RATIO**-i)
        return codes.fvu(centres / codes.unit)

    i = START_STEP
    fq: float | None = None if certain(top * GRID_RATIO**-i) else fvu_at(i)
    while fq is not None and fq > limit and i < GRID_STEPS:  # not fine enough yet (rare): go finer until it passes
        i += 1
        fq = fvu_at(i)
    while i > 0:  # then coarser, one grid step at a time, until the first that fails
        if certain(top * GRID_RATIO ** -(i - 1)):
            i, fq = i - 1, None  # passes: its FVU is measured only if it is the answer
            continue
        coarser = fvu_at(i - 1)
        if coarser > limit:
            break
        i, fq = i - 1, coarser
    return top * GRID_RATIO**-i, f0, fvu_at(i) if fq is None else fq


@torch.no_grad()
def description_length(module, x: Tensor, mode: str | Encode, tolerance: float = 0.01) -> dict[str, float]:
    """The description length of ``module``'s codes of held-out tokens ``x`` in ``mode`` (or by
    an ``encode`` function: tokens -> (their code, the normalisation context)), with the
    precision it chose and the figures for scale (see the module's docstring)."""
    codes = held_out_codes(module, x, mode)
    delta, f0, fq = choose_precision(codes, tolerance)
    u = codes.contributions
    bins, _ = quantise(u, delta)
    n = codes.x.shape[0]
    bits = code_bits(codes.latents, bins, n, module.sae.n_latents)
    l0 = codes.latents.numel() / max(n, 1)
    levels = int(bins.max() - bins.min()) + 1 if bins.numel() else 1
    value_bits = math.ceil(math.log2(levels)) if levels > 1 else 0
    return {
        "description_length": bits["bits"],
        "dl_firing_bits": bits["firing_bits"],
        "dl_value_bits": bits["value_bits"],
        "dl_precision": delta,
        "dl_tolerance": tolerance,
        "dl_fvu": f0,
        "dl_fvu_quantised": fq,
        "dl_naive_bits": l0 * (math.log2(module.sae.n_latents) + value_bits),
        "dl_naive_value_bits": float(value_bits),
        "dl_raw_bits": raw_bits(codes.x, delta),
        "dl_tokens": float(n),
    }
