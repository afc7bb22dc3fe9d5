"""Downstream loss of a causal LM with the SAE spliced in: ΔCE and loss recovered.

On held-out contexts of the activation cache (the last ``data.downstream.contexts`` contexts
wholly inside the validation split at each validation during training, the last
``data.downstream.final_contexts`` inside the test split for the final figures; a run without a
test split, or ``evaluate``, reads the cache's last contexts), the language model's
next-token cross-entropy is measured
three ways: clean; with the hooked site's activations at the kept positions (special tokens
are left alone, as the SAE never saw them) replaced by the SAE's reconstruction, for each
inference mode; and with them replaced by zeros. ΔCE = CE_spliced − CE_clean; loss recovered
= (CE_zero − CE_spliced) / (CE_zero − CE_clean) (SAEBench's CE loss score); KL = the mean
KL(clean ‖ spliced) of the next-token distributions and its score (KL_zero − KL) / KL_zero
(SAEBench's KL divergence score). The final figures are also taken at L0 = k exactly on the
spliced tokens (:meth:`DownstreamLoss.splice_at_k`), where the calibrated thresholds of MC and FC land
a few % off k. The model is loaded on first use, on rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from .. import tb
from ..allocators import Mode
from ..atomic import atomic_write_json, file_lock
from ..data import Downstream
from ..data import lm as lm_mod

MODES = (Mode.BATCH, Mode.THRESHOLD)
CHUNK = 16  # contexts per forward pass


def eval_contexts(folder: Path, manifest: dict[str, Any], n: int, rows: np.ndarray | None = None) -> torch.Tensor:
    """The last ``n`` of the cache's contexts (of ``rows``, global rows of its token ids, where
    given) as token ids [n, context_length] (-1 = padding)."""
    if rows is not None and len(rows):
        want = np.asarray(rows)[-n:]
        parts, offset = [], 0
        for entry in manifest["shards"]:
            ids = np.load(Path(folder) / entry["ids"]["file"])
            inside = want[(want >= offset) & (want < offset + len(ids))]
            if inside.size:
                parts.append(ids[inside - offset])
            offset += len(ids)
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))
    blocks: list[np.ndarray] = []
    for entry in reversed(manifest["shards"]):
        blocks.insert(0, np.load(Path(folder) / entry["ids"]["file"]))
        if sum(len(r) for r in blocks) >= n:
            break
    return torch.from_numpy(np.concatenate(blocks)[-n:].astype(np.int64))


class DownstreamLoss(L.Callback):
    """``contexts`` at the validations during training (unless ``during_training`` is off);
    ``final_contexts`` at the validation after training (``trainer.validate``), whose figures
    go to metrics.json."""

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        contexts: int = 16,
        batch_size: int = 1024,
        final_contexts: int | None = None,
        during_training: bool = True,
        rows: dict[str, np.ndarray] | None = None,
    ):
        h = manifest["harvest"]
        self.spec, self.site, self.layer = h["lm"], h["site"], h["layer"]
        self.folder, self.manifest = Path(folder), manifest
        self.dropped = torch.tensor(h["dropped_token_ids"], dtype=torch.long)
        self.contexts, self.final_contexts = contexts, final_contexts or contexts
        self.batch_size = batch_size
        self.during_training = during_training
        self.model = None
        self.references: dict[tuple[int, str | None], dict[str, float]] = {}
        self.figures: dict[str, float] = {}
        self.rows = rows or {}
        self.use(contexts, "validation")

    @classmethod
    def of(cls, source: Downstream | None, batch_size: int) -> list[DownstreamLoss]:
        """The callback for a data source's description (none where it has no causal model)."""
        if source is None:
            return []
        return [
            cls(
                source.folder,
                source.manifest,
                source.contexts,
                batch_size,
                source.final_contexts,
                source.during_training,
                source.rows,
            )
        ]

    def use(self, n: int, split: str | None = None) -> None:
        """Measure on the last ``n`` contexts wholly inside ``split`` (where the callback knows the
        splits' rows: a cache's own run), else on the cache's last ``n`` contexts."""
        rows = self.rows.get(split) if split is not None else None
        self.asked = (n, split)
        self.n, self.split = n, split if rows is not None and len(rows) else None
        self.ids = eval_contexts(self.folder, self.manifest, n, rows)
        self.keep = (self.ids >= 0) & ~torch.isin(self.ids, self.dropped)

    def _load(self, device) -> None:
        self.model, _, _ = lm_mod.load(
            lm_mod.source_of(self.spec), self.spec.get("revision"), self.spec["dtype"], str(device)
        )

    @torch.inference_mode()
    def _losses(self, replacers: dict, chunk: int = CHUNK, recorded: list | None = None) -> dict[str, dict[str, float]]:
        """Per name in ``replacers``: the mean next-token cross-entropy over the contexts and the
        mean KL divergence KL(clean ‖ replaced) of the next-token distributions, over the same
        positions; ``replace(x_kept)`` gives the new activations at the kept positions (None:
        clean). Runs ``chunk`` contexts at a time (the logits of 128 contexts of a 49k-token
        vocabulary would take 3 GB), the clean model once per chunk. ``recorded``: per chunk of
        CHUNK contexts, what the blocks before the site return (:meth:`site_pass`); each pass then
        computes only the blocks after the site (the same figures, bitwise: tested)."""
        assert self.model is not None, "the language model is loaded by measure()"
        assert recorded is None or chunk == CHUNK, "the blocks are recorded per CHUNK contexts"
        device = self.model.device
        sums = {name: [0.0, 0.0] for name in replacers}
        count = 0
        for i, (ids, keep) in enumerate(zip(self.ids.split(chunk), self.keep.split(chunk))):
            ids, keep = ids.to(device), keep.to(device)
            before = recorded[i] if recorded is not None else None
            mask = ids >= 0
            target, valid = ids[:, 1:], mask[:, 1:] & mask[:, :-1]

            def log_probs(replace, keep=keep, ids=ids, mask=mask, valid=valid, before=before):
                def fn(hidden):
                    if replace is None:
                        return None
                    new = hidden.clone()
                    new[keep] = replace(hidden[keep].float()).to(hidden.dtype)
                    return new

                with (
                    lm_mod.replay_blocks(self.model, self.site, self.layer, before),
                    lm_mod.hook_site(self.model, self.site, self.layer, fn),
                ):
                    logits = self.model(input_ids=ids.clamp_min(0), attention_mask=mask.long(), use_cache=False).logits
                return F.log_softmax(logits[:, :-1][valid].float(), dim=-1)

            clean = log_probs(None)
            for name, replace in replacers.items():
                lp = clean if replace is None else log_probs(replace)
                sums[name][0] += float(F.nll_loss(lp, target[valid], reduction="sum"))
                sums[name][1] += float(F.kl_div(lp, clean, log_target=True, reduction="sum"))
            count += int(valid.sum())
        return {name: {"ce": ce / max(count, 1), "kl": kl / max(count, 1)} for name, (ce, kl) in sums.items()}

    def _reference(self, recorded: list | None = None) -> dict[str, float]:
        """Clean and zero-ablated CE (and the zero-ablated KL) on the contexts: they do not depend
        on the SAE, so they are kept in the cache folder (``downstream_reference.json``, keyed by
        the number of contexts and the model's dtype) and measured once per cache. A read-only
        cache is measured each time."""
        path = self.folder / "downstream_reference.json"
        which = f"{self.n}" if self.split is None else f"{self.split}:{self.n}:{int(self.rows[self.split][-1])}"
        key = f"{which}:{self.spec.get('dtype')}:{self.manifest['harvest']['lm'].get('weights_sha256')}"
        try:
            known = json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            known = {}
        if "kl_zero_ablation" in known.get(key, {}):
            return known[key]
        got = self._losses({"clean": None, "zero": torch.zeros_like}, recorded=recorded)
        ref = {
            "ce_clean": got["clean"]["ce"],
            "ce_zero_ablation": got["zero"]["ce"],
            "kl_zero_ablation": got["zero"]["kl"],
        }
        try:
            with file_lock(self.folder.with_name(f".{self.folder.name}.reference.lock")):
                current = json.loads(path.read_text()) if path.is_file() else {}
                atomic_write_json(path, {**current, key: ref}, indent=1)
        except (OSError, ValueError):
            pass
        return ref

    def site_pass(self) -> tuple[torch.Tensor, list | None]:
        """One forward pass of every chunk of CHUNK contexts, stopped at the site: (the site's
        clean activations at the kept positions, in order; per chunk, what the blocks before the
        site returned, for :meth:`_losses` to replay)."""
        assert self.model is not None, "the language model is loaded by measure()"
        device, got = self.model.device, []

        def record(hidden, keep):
            got.append(hidden[keep].float().cpu())
            return None

        with torch.inference_mode(), lm_mod.record_blocks(self.model, self.site, self.layer) as recorded:
            for ids, keep in zip(self.ids.split(CHUNK), self.keep.split(CHUNK)):
                ids, keep = ids.to(device), keep.to(device)
                with lm_mod.hook_site(
                    self.model, self.site, self.layer, lambda h, keep=keep: record(h, keep), stop=True
                ):
                    lm_mod.run_to_site(self.model, ids.clamp_min(0), (ids >= 0).long())
        return torch.cat(got), (list(recorded) if recorded else None)

    def kept_activations(self) -> torch.Tensor:
        """The site's clean activations at the kept positions of the contexts, in order."""
        return self.site_pass()[0]

    def splice_at_k(self, pl_module, kept: torch.Tensor) -> tuple[Any, list[int], float] | None:
        """The threshold mode at L0 = k exactly on the spliced tokens: (the replacement, the
        [latents fired, tokens] it counts as it runs, the factor): the calibrated thresholds times
        the one factor that gives mean L0 = k on these very activations (rules.Reader), so that
        every allocator is compared at the same L0 (``kept``: :meth:`site_pass`'s). None for TopK,
        whose threshold mode gives every token k latents: its threshold-mode figures are already at k."""
        from ..allocators.base import CalibratedThresholds, l0_matching_scale
        from ..rules import Reader, own_rule

        allocator = pl_module.allocator
        if not (isinstance(allocator, CalibratedThresholds) and allocator.thresholds_ready()):
            return None
        theta = allocator.current_theta("calibrated").detach().float().cpu()
        factor = l0_matching_scale(pl_module._calibration_set(kept), theta, pl_module.k)
        encode = Reader(own_rule(pl_module), theta, pl_module.k, float("nan")).encode(pl_module, factor)
        fired = [0, 0]

        def splice(x):
            parts = []
            for chunk in x.split(self.batch_size):
                code, ctx = encode(chunk)
                fired[0], fired[1] = fired[0] + code.nnz, fired[1] + chunk.shape[0]
                parts.append(pl_module.sae.denormalise(pl_module.sae.decode(code), ctx))
            return torch.cat(parts)

        return splice, fired, factor

    def measure(self, pl_module, at_k: bool = False) -> dict[str, float]:
        """The figures of both modes at the calibrated thresholds; with ``at_k``, also the
        threshold mode's at L0 = k on the spliced tokens (:meth:`splice_at_k`), as
        ``<prefix>/..._at_k`` where the prefix is the contexts' split (``test`` for the final
        figures). Every replacement is spliced in the same pass over the contexts, beside one
        clean forward per chunk."""
        if self.model is None:
            self._load(pl_module.device)
        kept, recorded = self.site_pass()  # a third of a pass for SmolLM2 L9; every pass after skips those blocks
        if (self.n, self.split) not in self.references:
            self.references[(self.n, self.split)] = self._reference(recorded)
        ref = self.references[(self.n, self.split)]
        clean, zero, kl_zero = ref["ce_clean"], ref["ce_zero_ablation"], ref["kl_zero_ablation"]
        out = {f"val/{k}": v for k, v in ref.items()}
        out["val/downstream_tokens"] = int(self.keep.sum())

        def splicer(mode):
            def splice(x):
                return torch.cat(
                    [pl_module.reconstruct(chunk.to(pl_module.device), mode) for chunk in x.split(self.batch_size)]
                )

            return splice

        replacers = {str(mode): splicer(mode) for mode in MODES}
        reading = self.splice_at_k(pl_module, kept) if at_k else None
        if reading is not None:
            replacers["at_k"] = reading[0]
        got = self._losses(replacers, recorded=recorded)

        def figures(name: str) -> dict[str, float]:  # ΔCE, loss recovered, KL and its score of a splice
            ce, kl = got[name]["ce"], got[name]["kl"]
            return {
                "delta_ce": ce - clean,
                "loss_recovered": (zero - ce) / (zero - clean) if zero != clean else float("nan"),
                "kl_div": kl,
                "kl_div_score": (kl_zero - kl) / kl_zero if kl_zero > 0 else float("nan"),
            }

        for mode in MODES:
            out[f"val/{mode}/ce_spliced"] = got[str(mode)]["ce"]
            out.update({f"val/{mode}/{key}": value for key, value in figures(str(mode)).items()})
        if at_k:
            prefix = "test" if self.split == "test" else "val/threshold"
            if reading is not None:
                fired, factor = reading[1], reading[2]
                at_k_figures = {
                    **{f"{key}_at_k": value for key, value in figures("at_k").items()},
                    "downstream_l0": fired[0] / max(1, fired[1]),
                    "downstream_factor": factor,
                }
            elif not pl_module.allocator.has_thresholds:  # TopK: its threshold mode is k per token
                at_k_figures = {
                    f"{key}_at_k": out[f"val/threshold/{key}"]
                    for key in ("delta_ce", "loss_recovered", "kl_div", "kl_div_score")
                }
            else:
                at_k_figures = {}
            out.update({f"{prefix}/{key}": value for key, value in at_k_figures.items()})
        return out

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        final = trainer.state.fn == "validate"  # the validation after training
        if not (final or self.during_training):
            return
        n, split = (self.final_contexts, "test") if final else (self.contexts, "validation")
        if self.asked != (n, split):
            self.use(n, split)
        was_training = pl_module.training
        pl_module.eval()
        self.figures = self.measure(pl_module, at_k=final)
        pl_module.train(was_training)
        pl_module.results.scalars.update(self.figures)
        tb.scalars(trainer, self.figures, trainer.global_step)
