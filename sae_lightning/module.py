"""The LightningModule: SAE + allocator + loss terms + latent statistics + metrics."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor, nn

from . import checkpoint_file, tb
from .allocators import CalibrationSet, Mode
from .allocators.base import BatchContext, CalibratedThresholds, ThresholdAllocator, l0_matching_scale, threshold_l0
from .blockwise import AUTO_BLOCK_ELEMENTS, AUTO_DENSE_ELEMENTS, AffinityBlocks, above_thresholds
from .collective import Collective
from .config import ModuleSpec, TrainConfig
from .data import DataSource
from .description_length import description_length
from .errors import DataError, TrainingDiverged
from .gradient_ranking import GradientRanking
from .losses import StepOutput, sum_of_squares, total_loss
from .metrics import L0, VALIDATION_METRICS, Firing, ValidationMetric, absorption, feature_recovery
from .paired import at_target
from .provenance import code_version
from .rescore import Exact
from .sae import AFFINITY_DTYPES, ExactRanked, SparseAutoencoder, auto_affinity_choice, auto_affinity_dtype
from .sparse import Selection, SparseCode, sparse_decode
from .stats import LatentStats
from .zipf import fit_zipf


def fvu_at_l0(points: list[dict[str, float]], target: float) -> float:
    """FVU at mean L0 = ``target``, interpolated linearly in log L0 and log FVU between the two
    points of a sweep (sorted by L0) that bracket it; NaN when none do."""
    return at_target(points, "l0", "fvu", target)


def default_lr(n_latents: int) -> float:
    """Gao et al.'s scaling: 2e-4 / sqrt(F / 2^14)."""
    return 2e-4 / math.sqrt(n_latents / 2**14)


@dataclass
class ValidationResults:
    """The last validation's figures: scalars (FVU, L0, ..., and what callbacks add, e.g. ΔCE),
    each mode's per-token L0 histogram, the batch mode's latent densities, and the calibrated
    thresholds' sweep around L0 = k."""

    scalars: dict[str, float] = field(default_factory=dict)
    l0_hists: dict[str, Tensor] = field(default_factory=dict)
    density: Tensor | None = None
    l0_sweep: list[dict[str, float]] = field(default_factory=list)  # threshold mode's FVU against L0 near k


class SAEModule(L.LightningModule):
    """The SAE, its allocator, loss terms, latent statistics and metrics. ``config`` is the
    typed :class:`TrainConfig` of a run, or the plain dict a checkpoint stores; the module reads
    its :class:`ModuleSpec` from it, once. ``d_model`` comes from the data."""

    def __init__(self, config: TrainConfig | dict, d_model: int):
        super().__init__()
        self.spec = spec = ModuleSpec.of(config)
        self.model_spec, self.variant, self.optim_spec, self.stats_spec = (
            spec.model,
            spec.variant,
            spec.optim,
            spec.stats,
        )
        self.evaluation, self.batch_size = spec.evaluation, spec.batch_size
        self.histogram_every = spec.logging.histogram_every_n_steps
        if isinstance(config, TrainConfig):
            config = config.as_dict()
        self.save_hyperparameters({"config": config, "d_model": d_model})
        m, s = self.model_spec, self.stats_spec
        F = m.n_latents
        self.k = self.variant.params.k
        self.sae = SparseAutoencoder(d_model, F, m.normalisation, m.b_pre_init, m.decoder_norm, m.decoder_init_norm)
        # the dtype batch selection reads z′ in; None: auto, by the device (auto_affinity_dtype)
        self.affinity_dtype = AFFINITY_DTYPES.get(m.affinity_dtype)
        self.allocator = self.variant.build_allocator(F, self.batch_size)
        beta = self.variant.params.gradient_ranking.beta
        # g-SAE ranking of training batches (None at β = 0: the plain path, and no extra state)
        self.gradient_ranking = GradientRanking(beta) if beta > 0 else None
        self.losses = self.variant.losses
        self.stats = LatentStats(
            F,
            self.k,
            s.dead_window_tokens,
            s.density_time_constant_tokens,
            s.underused_ratio,
            s.zipf_alpha,
            s.zipf_beta,
            s.underused_reference,
        )
        ema = isinstance(self.allocator, ThresholdAllocator)
        self.modes = [Mode.BATCH, Mode.THRESHOLD] + ([Mode.THRESHOLD_EMA] if ema else [])
        # every registered validation metric, for every mode (metrics.VALIDATION_METRICS)
        self.val_metrics = nn.ModuleDict({mode: self._new_metrics() for mode in self.modes})
        self.results = ValidationResults()
        self.restoring = False  # set when a checkpoint will replace the initial weights (resume)
        self.train_seconds_before = 0.0  # training time of the run before this session (from the checkpoint)
        self.code_versions_before: list[dict] = []  # the code of earlier sessions (from the checkpoint)
        self.init_seconds = 0.0  # the initialisation from data (the run's phase table)
        self._session_start: float | None = None
        self._warned_trainer_clip = False

    @classmethod
    def from_checkpoint(cls, checkpoint: dict, strict: bool = True) -> SAEModule:
        """The module a loaded checkpoint dict holds (its config, weights and thresholds), in eval mode."""
        hp = checkpoint["hyper_parameters"]
        module = cls(hp["config"], hp["d_model"])
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"], strict=strict)
        return module.eval()

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: str | torch.device | None = None, strict: bool = True
    ) -> SAEModule:
        """A trained SAE from a ``.ckpt`` file, read weights-only (checkpoint_file.load: a file that
        holds anything but tensors and plain data is refused, DataError, without running it),
        on ``map_location`` (default: CPU), in eval mode."""
        ckpt = checkpoint_file.load(checkpoint_path, "checkpoint_path", map_location or "cpu")
        return cls.from_checkpoint(ckpt, strict).to(map_location or "cpu")

    # ---- the forward pass ---------------------------------------------------------------------
    def forward_step(
        self,
        x: Tensor,
        mode: Mode | str = Mode.BATCH,
        update: bool = False,
        collective: Collective | None = None,
        grad: Tensor | None = None,
    ):
        """Returns (StepOutput in normalised units, the normalisation context). Raises
        DataError for a non-finite input and TrainingDiverged for non-finite affinities. With a
        ``collective``, batch mode allocates over every rank's batch (see :meth:`collective`).
        With ``grad`` (∇ₓL of the tokens, model units) and ``variant.gradient_ranking.beta`` > 0,
        batch mode ranks the gradient-weighted affinities (gradient_ranking.py); the code's values
        and everything else stay the plain affinities'."""
        self._check_input(x)
        xn, ctx = self.sae.normalise(x)
        xc = xn - self.sae.b_pre.detach()  # once: the product, re-scoring, aux columns, backward
        z, exact = self._affinities_to_select(xn, xc, mode)
        ranked, exact = self._ranked(z, exact, grad, ctx, mode)
        sel = self._select(ranked, z, mode, update, collective, exact)
        code = self.sae.code(xn, z, sel, self.allocator.layout, centred=xc)
        x_hat = self.sae.decode(code)
        surrogate = self.allocator.surrogate(z, code) if mode == Mode.BATCH else None
        if surrogate is not None:  # learned thresholds: their straight-through path (zeros in x̂)
            x_hat = x_hat + sparse_decode(surrogate.zeros, self.sae.W_dec)
        columns = (  # a low-precision z′: the auxiliary losses read exact columns
            (lambda latents, tokens, lay: self.sae.affinities(xn[tokens], latents, lay, centred=xc[tokens]))
            if exact is not None
            else None
        )
        out = StepOutput(
            x=xn,
            x_hat=x_hat,
            z=z,
            layout=self.allocator.layout,
            code=code,
            exact_columns=columns,
            centred=xc,
            l0=surrogate.l0 if surrogate is not None else None,
        )
        return out, ctx

    def _check_input(self, x: Tensor) -> None:
        """DataError naming the first token with a NaN or inf (one sum first: far cheaper than a mask)."""
        if not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(1).nonzero()[0])
            raise DataError(
                f"non-finite input activations (NaN or inf) at token {bad} of a batch of {x.shape[0]}"
                + (f", training step {self.global_step}" if self._trainer is not None else "")
            )

    def _affinities_to_select(
        self, xn: Tensor, xc: Tensor, mode: Mode | str
    ) -> tuple[Tensor | AffinityBlocks, Exact | None]:
        """z′ without autograd, in the dtype selection reads (low precision only where batch
        allocation re-scores it; thresholds read the parameters' dtype), and the exact re-scoring
        that goes with a low-precision z′ (None otherwise)."""
        dtype = self.selection_dtype()
        low = dtype != self.sae.W_enc.dtype and mode == Mode.BATCH and self.allocator.rescores
        z = self.affinities(xn, self.allocator.layout, dtype if low else self.sae.W_enc.dtype, xc)
        if not low:
            return z, None
        if not self.sae.encoder_finite():  # what the re-scoring's candidates cannot see (rescore.py)
            raise TrainingDiverged(
                f"non-finite affinities z' (NaN or inf) reached the allocator at step {self.global_step}"
                + self._non_finite_parameters()
            )
        return z, ExactRanked(self.sae, xn, xc)

    def _ranked(
        self, z: Tensor | AffinityBlocks, exact: Exact | None, grad: Tensor | None, ctx, mode: Mode | str
    ) -> tuple[Tensor | AffinityBlocks, Exact | None]:
        """What batch allocation ranks: z′, or with ∇ₓL (``grad``) and g-SAE ranking on, the
        gradient-weighted scores (and their exact re-scoring)."""
        if grad is None or self.gradient_ranking is None or mode != Mode.BATCH:
            return z, exact
        gn = self.sae.normalise_gradient(grad, ctx)
        ranked = self.gradient_ranking.scores(self.sae, z, gn, self.allocator.layout)
        return ranked, (self.gradient_ranking.exact_scores(self.sae, gn, exact) if exact is not None else None)

    @torch.no_grad()
    def _select(
        self,
        ranked: Tensor | AffinityBlocks,
        z: Tensor | AffinityBlocks,
        mode: Mode | str,
        update: bool,
        collective: Collective | None,
        exact: Exact | None,
    ) -> Selection:
        """The allocator's pairs: batch allocation of ``ranked``, or its threshold mode on ``z``."""
        try:
            if mode == Mode.BATCH:
                context = BatchContext(step=self.global_step, update=update, collective=collective, exact=exact)
                sel = self.allocator.allocate(ranked, context)
            else:
                sel = self.allocator.threshold(z, source="ema" if mode == Mode.THRESHOLD_EMA else "calibrated")
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e} at step {self.global_step}{self._non_finite_parameters()}") from None
        if ranked is not z:  # the values a re-scoring kept are scores, not the code's affinities
            sel.values = None
        return sel

    def selection_dtype(self) -> torch.dtype:
        """The dtype batch selection reads z′ in (``model.affinity_dtype``; auto: by the device;
        the parameters' for an allocator that does not re-score a low-precision matrix)."""
        if not self.allocator.rescores:
            return self.sae.W_enc.dtype
        return self.affinity_dtype if self.affinity_dtype is not None else auto_affinity_dtype(self.sae.W_enc.device)

    def selection_dtype_reason(self) -> str:
        """Why :meth:`selection_dtype` is what it is, in a few words (the run's summary)."""
        if not self.allocator.rescores:
            return f"{self.variant.allocator} compares z′ with its thresholds in the parameters' dtype"
        if self.affinity_dtype is not None:
            return f"model.affinity_dtype={self.model_spec.affinity_dtype}"
        return auto_affinity_choice(self.sae.W_enc.device)[1]

    def affinities(
        self, xn: Tensor, layout: str, dtype: torch.dtype = torch.float32, centred: Tensor | None = None
    ) -> Tensor | AffinityBlocks:
        """z′ of normalised tokens in ``dtype``: the dense matrix, or blocks of
        ``model.block_latents`` latents computed on demand (never [B, F] at once); ``centred``:
        xn − b_pre, where the caller holds it."""
        block = self.block_latents(xn.shape[0])
        if block is not None and block < self.sae.n_latents:
            return self.sae.affinity_blocks(xn, block, layout, dtype, centred)
        return self.sae.affinities(xn, layout=layout, dtype=dtype, centred=centred)

    def block_latents(self, n_tokens: int) -> int | None:
        """Latents per block of z′ for ``n_tokens`` tokens (``model.block_latents``; ``auto``:
        None, the dense matrix, while it holds at most AUTO_DENSE_ELEMENTS entries, else blocks
        of AUTO_BLOCK_ELEMENTS entries)."""
        block = self.model_spec.block_latents
        if block == "auto":
            if n_tokens * self.sae.n_latents <= AUTO_DENSE_ELEMENTS:
                return None
            return max(1, AUTO_BLOCK_ELEMENTS // n_tokens)
        return block

    @torch.no_grad()
    def encode(self, x: Tensor, mode: Mode | str = Mode.BATCH) -> SparseCode:
        return self.forward_step(x, mode)[0].code

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mode: Mode | str = Mode.BATCH) -> Tensor:
        """x̂ in the model's own units."""
        out, ctx = self.forward_step(x, mode)
        return self.sae.denormalise(out.x_hat, ctx)

    def _non_finite_parameters(self) -> str:
        bad = [name for name, p in self.named_parameters() if not bool(torch.isfinite(p).all())]
        bad += [
            name
            for name, b in self.sae.named_buffers(prefix="sae")
            if b.is_floating_point() and not bool(torch.isfinite(b).all())
        ]
        return (
            f" (not finite: {', '.join(bad)}; lower optim.lr)"
            if bad
            else " (the input batch and the parameters are finite but their product overflowed; lower optim.lr)"
        )

    def collective(self) -> Collective | None:
        """The ranks a training or validation batch is allocated across: all of them in a
        multi-process run with ``variant.global_allocation`` (the method's global batch), else
        None (each rank its own batch). Only the trainer's steps use it: every rank reaches them
        together; calibration, measures and inference allocate the tokens they are given."""
        if self._trainer is None or not self.variant.params.global_allocation:
            return None
        return Collective.current()

    # ---- set-up ---------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._session_start = time.perf_counter()

    def train_seconds(self) -> float:
        """Training time of the whole run (every session, from the checkpoints) until now."""
        now = time.perf_counter() - self._session_start if self._session_start is not None else 0.0
        return self.train_seconds_before + now

    def code_versions(self) -> list[dict]:
        """The code of every session that trained this module (provenance.py), oldest first."""
        now = code_version()
        return self.code_versions_before + ([now] if now not in self.code_versions_before else [])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["sae_lightning"] = {"train_seconds": self.train_seconds(), "code_versions": self.code_versions()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = checkpoint.get("sae_lightning", {})
        self.train_seconds_before = float(own.get("train_seconds", 0.0))
        self.code_versions_before = list(own.get("code_versions", []))
        for key in ("sae.x_second_moment", "sae.x_variance"):  # checkpoints from before these buffers
            checkpoint["state_dict"].setdefault(key, torch.ones(()))
        if self.restoring and "allocator.calibrated" in checkpoint["state_dict"]:
            # training goes on (from a finished run's final.ckpt too): its thresholds are calibrated
            # anew when it ends, and until then validation shows the running EMA, as in the first session
            checkpoint["state_dict"]["allocator.calibrated"] = torch.zeros((), dtype=torch.bool)

    def setup(self, stage: str) -> None:
        # once, before training; on resume the checkpoint's weights and buffers replace these
        if stage == "fit" and not bool(self.sae.initialised) and not self.restoring:
            start = time.perf_counter()
            n = self.model_spec.init_sample_tokens
            grad = self.data().sample_gradients(n) if self.gradient_ranking is not None else None
            figures = self.init_from_data(self.data().sample(n), grad)
            self.print("initialised from data: " + ", ".join(f"{key}={value:.4g}" for key, value in figures.items()))
            self.init_seconds = time.perf_counter() - start

    @torch.no_grad()
    def init_from_data(self, x: Tensor, grad: Tensor | None = None) -> dict[str, float]:
        """Normalisation scale and b_pre from a sample (and the gradients' scale from their
        ∇ₓL ``grad`` for gradient ranking); then, with ``model.init_encoder_scale = fit``, one
        scalar s on W_enc chosen by least squares so that the first batch allocation
        reconstructs the sample as well as a scalar allows (a tied random init overshoots badly
        where an allocator gives a token many latents)."""
        x = x.to(self.device)
        figures = self.sae.init_from_sample(x)
        if self.gradient_ranking is not None:
            if grad is None:
                raise ValueError("gradient ranking needs the sample's gradients to set their scale")
            _, ctx = self.sae.normalise(x)
            figures.update(self.gradient_ranking.init_from_sample(self.sae.normalise_gradient(grad.to(x), ctx)))
        figures.update(self.allocator.init_thresholds(self._calibration_set(x)))
        if self.model_spec.init_encoder_scale == "gao":
            gain = self._gain_on_random_directions()
            if gain > 0:
                self.sae.W_enc.div_(gain)
                self.allocator.scale_thresholds(1.0 / gain)
                figures["encoder_scale"] = 1.0 / gain
        elif self.model_spec.init_encoder_scale == "fit":
            num = den = 0.0
            for chunk in x.split(self.batch_size):
                out, _ = self.forward_step(chunk)
                decoded = out.x_hat - self.sae.b_pre
                num += float(((out.x - self.sae.b_pre) * decoded).sum())
                den += float(decoded.pow(2).sum())
            if den > 0 and num > 0:
                self.sae.W_enc.mul_(num / den)
                self.allocator.scale_thresholds(num / den)
                figures["encoder_scale"] = num / den
        return figures

    @torch.no_grad()
    def _gain_on_random_directions(self, n: int = 256) -> float:
        """Mean ‖x̂ − b_pre‖ / ‖x − b_pre‖ of the first allocation on random unit directions
        around b_pre (Gao et al.'s reference code divides W_enc by it, so that the untrained SAE
        passes random inputs at unit gain). b_enc = 0 at init and every allocator is invariant
        to a positive scale, so the gain does not depend on the directions' norm."""
        g = torch.Generator().manual_seed(0)
        u = torch.nn.functional.normalize(torch.randn(n, self.sae.d_model, generator=g), dim=1).to(self.device)
        xn = u + self.sae.b_pre
        layout = self.allocator.layout
        z = self.affinities(xn, layout)
        code = self.sae.code(xn, z, self.allocator.allocate(z), layout)
        return float((self.sae.decode(code) - self.sae.b_pre).norm(dim=1).mean())

    def configure_optimizers(self):
        o = self.optim_spec
        lr = o.lr if o.lr is not None else default_lr(self.sae.n_latents)
        # fused Adam unscales gradients itself, which Lightning's gradient clipping under mixed
        # precision refuses: auto takes the plain kernel there
        mixed = self._trainer is not None and "mixed" in str(self.trainer.precision)
        fused = o.fused if o.fused != "auto" else not mixed
        # learned thresholds (JumpReLU) at their own rate: variant.lr_scale times optim.lr
        own = [p for p in self.allocator.parameters() if p.requires_grad]
        held = {id(p) for p in own}
        groups: list[dict[str, Any]] = [{"params": [p for p in self.parameters() if id(p) not in held]}]
        if own:
            groups.append({"params": own, "lr": lr * getattr(self.variant.params, "lr_scale", 1.0)})
        opt = torch.optim.Adam(groups, lr=lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, fused=fused)
        warm = o.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm) if warm else 1.0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch: Tensor | tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One step on a batch of tokens ``x``, or ``(x, ∇ₓL)`` when the run ranks by gradients."""
        x, grad = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
        # the parameters change only at the optimiser's step; z′ is not kept past the step
        with self.sae.holding_ranked_encoder(), self.sae.reusing_affinities():
            out, ctx = self.forward_step(x, Mode.BATCH, update=True, collective=self.collective(), grad=grad)
            terms = {name: term(out, self.sae, self.stats) for name, term in self.losses.items()}
        loss = total_loss(self.losses, terms, self.sae)
        if not torch.isfinite(loss):
            bad = {name: float(value) for name, value in terms.items()}
            raise TrainingDiverged(f"non-finite loss at step {self.global_step}: {bad}{self._non_finite_parameters()}")
        fire = out.code.fire_counts()
        n_tokens = x.shape[0]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(fire)  # statistics count every rank's tokens
            n_tokens *= torch.distributed.get_world_size()
        self.stats.update(fire, n_tokens)

        with torch.no_grad():
            l0 = out.code.l0_per_token().to(torch.float32)
            fvu, nmse = self._fit_figures(x, out, ctx)
        logs = {
            "train/loss": loss.detach(),
            "train/fvu": fvu,
            "train/nmse": nmse,
            "train/l0_mean": l0.mean(),
            "train/l0_std": l0.std(),
        }
        logs.update({f"train/loss_{name}": value.detach() for name, value in terms.items()})
        logs.update(
            {
                f"train/{name}_{key}": value
                for name, term in self.losses.items()
                for key, value in term.metrics.items()
                if value is not None
            }
        )
        self.log_dict(logs, prog_bar=False)
        self.log("fvu", fvu, prog_bar=True, logger=False)
        self.log("l0", l0.mean(), prog_bar=True, logger=False)
        if self.histogram_every and self.global_step % self.histogram_every == 0:
            tb.histogram(self._trainer, "train/l0_per_token", out.code.l0_per_token(), self.global_step)
        return loss

    @torch.no_grad()
    def _fit_figures(self, x: Tensor, out: StepOutput, ctx) -> tuple[Tensor, Tensor]:
        """The batch's FVU and NMSE in the model's units. A scalar normalisation (or none)
        cancels from both ratios, so they come from the step's own residual in normalised units
        (:meth:`StepOutput.squared_error`, no second residual; ~5 passes over [B, d] fewer);
        layernorm's per-token scales do not cancel: de-normalised there."""
        if self.sae.normalisation == "layernorm":
            x_hat = self.sae.denormalise(out.x_hat.detach(), ctx)
            sse, x_ = (x - x_hat).pow(2).sum(), x
        else:
            sse, x_ = out.squared_error()[0].detach(), out.x
        fvu = sse / sum_of_squares(x_ - x_.mean(0)).clamp_min(1e-30)
        nmse = sse / sum_of_squares(x_).clamp_min(1e-30)
        return fvu, nmse

    def on_before_optimizer_step(self, optimizer) -> None:
        self.sae.project_decoder_grad()

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """The recipe's clipping, read from the module's own config (``optim.clip_grad_norm``: the
        global L2 norm of all gradients, after the decoder's projection), whatever Trainer runs
        the module. A Trainer's own ``gradient_clip_val`` is ignored, with a warning: it would clip a
        second time, or by another rule, and train differently from train.py."""
        if gradient_clip_val and not self._warned_trainer_clip:
            self._warned_trainer_clip = True
            warnings.warn(
                f"Trainer(gradient_clip_val={gradient_clip_val}) is ignored: SAEModule clips its own gradients "
                f"(optim.clip_grad_norm={self.optim_spec.clip_grad_norm}); set that in the module's config instead",
                stacklevel=2,
            )
        norm = self.optim_spec.clip_grad_norm
        if norm is not None:
            self.trainer.precision_plugin.clip_gradients(optimizer, norm, GradClipAlgorithmType.NORM)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.renormalise_decoder()

    # ---- validation -----------------------------------------------------------------------------
    def _new_metrics(self) -> nn.ModuleDict:
        d, F = self.sae.d_model, self.sae.n_latents
        return nn.ModuleDict({name: cls.build(d, F) for name, cls in VALIDATION_METRICS.items()})

    def _metrics(self, mode: str) -> dict[str, ValidationMetric]:
        return cast(dict[str, ValidationMetric], self.val_metrics[mode])

    def data(self) -> DataSource:
        """The run's data source (its DataModule)."""
        return cast(DataSource, self.trainer.datamodule)  # type: ignore[attr-defined]

    def active_modes(self) -> list[Mode]:
        """The modes a validation evaluates: ``threshold`` only once its thresholds are calibrated
        (before that it would repeat ``threshold_ema``, under another name), ``threshold_ema``
        only once the EMA has a cutoff (after ``variant.threshold_ema_warmup_steps``)."""
        ready = {
            Mode.THRESHOLD: self.allocator.thresholds_ready(),
            Mode.THRESHOLD_EMA: isinstance(self.allocator, ThresholdAllocator) and self.allocator.ema_ready(),
        }
        return [m for m in self.modes if ready.get(m, True)]

    def _update(
        self,
        metrics: dict[str, ValidationMetric],
        x: Tensor,
        mode: Mode | str,
        collective: Collective | None = None,
    ) -> None:
        out, ctx = self.forward_step(x, mode, collective=collective)
        x_hat = self.sae.denormalise(out.x_hat, ctx)
        for metric in metrics.values():
            metric.observe(x, x_hat, out.code)

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        collective = self.collective()
        for mode in self.active_modes():
            self._update(self._metrics(mode), x, mode, collective if mode == Mode.BATCH else None)

    @torch.no_grad()
    def measure(self, x: Tensor, mode: Mode | str) -> dict[str, float]:
        """The validation's figures (every registered validation metric's) of tokens ``x`` (model
        units) in ``mode``, a batch at a time, outside any trainer."""
        metrics = cast(dict[str, ValidationMetric], self._new_metrics().to(self.device))
        for chunk in x.to(self.device).split(self.batch_size):
            self._update(metrics, chunk, mode)
        return {key: value for metric in metrics.values() for key, value in metric.figures().items()}

    def on_validation_epoch_end(self) -> None:
        logs: dict[str, float] = {}
        results = ValidationResults()
        step = self.global_step
        for mode in self.active_modes():
            metrics = self._metrics(mode)
            for metric in metrics.values():
                logs.update({f"val/{mode}/{key}": value for key, value in metric.figures().items()})
            l0_m, firing_m = cast(L0, metrics["l0"]), cast(Firing, metrics["firing"])
            results.l0_hists[mode] = l0_m.hist.detach().cpu().clone()
            tb.count_histogram(self._trainer, f"val/{mode}/l0_per_token", results.l0_hists[mode], step)
            if mode == Mode.BATCH:
                n_val = int(firing_m.n)
                logs["val/expected_never_fired_fraction"] = self.stats.expected_never_fired(n_val)
                results.density = firing_m.compute()["density"].detach().cpu()
                density = results.density.to(torch.float32)
                tb.histogram(self._trainer, f"val/{mode}/log10_density", density[density > 0].log10(), step)
                fit = fit_zipf(density)
                if fit is not None:
                    logs["val/zipf_fit_alpha"], logs["val/zipf_fit_beta"] = fit[0], fit[1]
            for metric in metrics.values():
                metric.reset()
        if isinstance(self.allocator, CalibratedThresholds) and bool(self.allocator.calibrated):
            results.l0_sweep = self.l0_sweep(self.data().val_tensor())
            logs["val/threshold/fvu_at_k"] = fvu_at_l0(results.l0_sweep, self.k)
        elif not self.allocator.has_thresholds:  # TopK: k per token, its threshold mode is itself
            logs["val/threshold/fvu_at_k"] = logs["val/threshold/fvu"]
        if self._trainer is not None and self.trainer.state.fn == "validate" and self.evaluation.description_length:
            val = self.data().val_tensor()  # the validation after training: its description length
            for mode in (m for m in (Mode.BATCH, Mode.THRESHOLD) if m in self.active_modes()):
                figures = description_length(self, val, mode, self.evaluation.dl_tolerance)
                logs.update({f"val/{mode}/{key}": value for key, value in figures.items()})
        summary = self.stats.summary()
        logs["val/dead_fraction"] = summary["dead_fraction"]
        logs["val/underused_fraction"] = summary["underused_fraction"]
        true = self.data().true_features if self._trainer is not None else None
        if true is not None:
            logs.update({f"val/{key}": value for key, value in feature_recovery(true, self.sae.W_dec).items()})
            tree = self.data().hierarchy()
            if tree is not None:  # read as deployed: the threshold mode
                logs.update({f"val/{key}": value for key, value in self._absorption(tree).items()})
        self.log_dict(logs, sync_dist=False)
        results.scalars = logs
        self.results = results

    @torch.no_grad()
    def _absorption(self, tree) -> dict[str, float]:
        """:func:`metrics.absorption` of the threshold mode on the hierarchy's tokens."""
        codes = [self.encode(chunk.to(self.device), Mode.THRESHOLD) for chunk in tree.x.split(self.batch_size)]

        def fired(latents: Tensor) -> Tensor:
            parts = []
            for code in codes:
                hit = code.latents.unsqueeze(1) == latents.to(code.latents.device).unsqueeze(0)  # [nnz, P]
                on = torch.zeros(code.n_tokens, latents.numel(), dtype=torch.int32, device=hit.device)
                parts.append(on.index_add_(0, code.token_index(), hit.to(torch.int32)) > 0)
            return torch.cat(parts)

        return absorption(tree.parent_features, self.sae.folded()[2], fired, tree.parent, tree.child)

    # ---- thresholds ---------------------------------------------------------------------------
    def _calibration_set(self, x: Tensor) -> CalibrationSet:
        xn, _ = self.sae.normalise(x.to(self.device))
        return CalibrationSet(xn, lambda xs, cols: self.sae.affinities(xs, cols), self.sae.n_latents)

    @torch.no_grad()
    def calibrate(self, x: Tensor, match_l0: bool = True) -> dict[str, float]:
        """Set the allocator's inference thresholds from held-out raw activations ``x``; with
        ``match_l0``, then scale them by the one factor that makes the mean L0 on ``x`` equal k
        (the allocators' own rules land near k, not on it: FC's per-latent rates are rounded,
        and either rule ignores what the ReLU drops)."""
        cal = self._calibration_set(x)
        figures = self.allocator.calibrate(cal)
        if match_l0 and isinstance(self.allocator, CalibratedThresholds):
            factor = l0_matching_scale(cal, self.allocator.current_theta("calibrated"), self.k)
            self.allocator.scale_calibrated(factor)
            figures["theta_scale"] = factor
        if isinstance(self.allocator, CalibratedThresholds):
            figures["l0"] = threshold_l0(cal, self.allocator.current_theta("calibrated"))
        return figures

    @torch.no_grad()
    def l0_sweep(self, x: Tensor, spread: tuple[float, ...] = (0.9, 0.95, 1.0, 1.05, 1.1)) -> list[dict[str, float]]:
        """Threshold mode with the calibrated thresholds times a few factors, on tokens ``x``
        (model units): (factor, mean L0, FVU) for factor 1 and for ``spread`` times the factor
        that gives L0 = k on ``x`` itself, sorted by L0."""
        assert isinstance(self.allocator, CalibratedThresholds)
        theta = self.allocator.current_theta("calibrated")
        on_x = l0_matching_scale(self._calibration_set(x), theta, self.k)
        factors = sorted({1.0, *(on_x * c for c in spread)})
        x = x.to(self.device)
        sse = torch.zeros(len(factors), dtype=torch.float64)
        fired = torch.zeros(len(factors), dtype=torch.float64)
        layout = self.allocator.layout
        for chunk in x.split(self.batch_size):
            xn, ctx = self.sae.normalise(chunk)
            z = self.affinities(xn, layout)
            selections = above_thresholds(z, [theta * factor for factor in factors], layout)
            for i, sel in enumerate(selections):
                code = self.sae.code(xn, z, sel, layout)
                x_hat = self.sae.denormalise(self.sae.decode(code), ctx)
                sse[i] += float((chunk.double() - x_hat.double()).pow(2).sum())
                fired[i] += code.nnz
        x64 = x.double()
        total = float((x64 - x64.mean(0)).pow(2).sum())
        points = [
            {"factor": f, "l0": float(fired[i]) / x.shape[0], "fvu": float(sse[i]) / max(total, 1e-30)}
            for i, f in enumerate(factors)
        ]
        return sorted(points, key=lambda p: p["l0"])
