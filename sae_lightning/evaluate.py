"""Evaluate a trained SAE: its downstream loss on more held-out contexts than validation uses,
SAEBench's core figures with the description length (``--core``; see :func:`core`), its dark
matter (``--dark-matter``; see :func:`dark_matter`), or its reconstruction read by an inference
rule (``--rule``; see rules.py).

    python -m sae_lightning.evaluate outputs/runs/<run> [--contexts 128]
    python -m sae_lightning.evaluate outputs/runs/<run> --core [--tokens N] [--tolerance 0.01]
    python -m sae_lightning.evaluate outputs/runs/<run> --dark-matter [--tokens N]
    python -m sae_lightning.evaluate outputs/runs/<run> --rule {own,all,topk,global_threshold,latent_thresholds}
        [--split test|validation]

``--core`` and ``--dark-matter`` score the test split (the validation split for a run made
before there was one); ``--rule`` the split ``--split`` names, with each rule scaled to L0 = k
on the calibration tokens, and writes ``rules_<split>.json``.

Loads ``checkpoints/final.ckpt`` and ``config.yaml`` of the run, opens its activation cache,
and measures CE clean / zero-ablated / spliced, ΔCE and loss recovered (both inference modes)
on the cache's last ``--contexts`` contexts, as the DownstreamLoss callback does at every
validation. Writes ``downstream_<contexts>.json`` into the run folder (``core.json`` with
``--core``, ``dark_matter.json`` with ``--dark-matter``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import tb
from .allocators import Mode
from .atomic import atomic_write_json
from .callbacks.downstream import DownstreamLoss
from .cli import user_errors
from .data import DataSpec
from .data.activations import ActivationsData
from .data.shards import read_manifest
from .description_length import description_length
from .errors import ConfigError, DataError, require_choice
from .rules import RULES, evaluate_rules, own_rule, rules_of
from .runs import load_run


def downstream(run_dir: Path, contexts: int, device: str = "cpu", loaded=None) -> dict[str, float]:
    module, data = loaded or load_run(run_dir, device)
    if not isinstance(data, ActivationsData):
        raise DataError(f"{run_dir} was trained on {data.kind} data: no language model to splice into")
    folder = Path(data.path)
    manifest = read_manifest(folder)
    if manifest is None or not manifest["harvest"]["lm"]["causal"]:
        raise DataError(f"{folder}: no cache of a causal language model (ΔCE needs next-token logits)")
    callback = DownstreamLoss(folder, manifest, contexts, data.batch_size)
    figures = callback.measure(module, at_k=True)
    figures["contexts"] = contexts
    figures["tokens_spliced"] = int(callback.keep.sum())
    return figures


def is_causal_cache(data: DataSpec) -> bool:
    if not isinstance(data, ActivationsData):
        return False
    manifest = read_manifest(Path(data.path))
    return manifest is not None and bool(manifest["harvest"]["lm"]["causal"])


def core(
    run_dir: Path, tokens: int | None, contexts: int, tolerance: float = 0.01, device: str = "cpu", loaded=None
) -> dict:
    """SAEBench's core figures and the description length of a run's SAE, for each inference
    mode, on held-out tokens; with a causal model's cache also the KL divergence and CE loss
    score of the SAE spliced in (``contexts`` contexts)."""
    module, data = loaded or load_run(run_dir, device)
    x = heldout_tokens(data, tokens)
    modes = [str(m) for m in module.active_modes() if m != Mode.THRESHOLD_EMA]
    figures: dict[str, Any] = {
        "variant": module.variant.name,
        "tokens": x.shape[0],
        "modes": modes,
        "k": module.k,
        "n_latents": module.sae.n_latents,
    }
    for mode in modes:
        figures.update({f"{mode}/{key}": value for key, value in module.measure(x, mode).items()})
        dl = description_length(module, x, mode, tolerance)
        figures.update({f"{mode}/{key}": value for key, value in dl.items()})
    if is_causal_cache(data):
        down = downstream(run_dir, contexts, device, loaded=(module, data))
        figures.update({key.removeprefix("val/"): value for key, value in down.items()})
    return figures


CORE_ROWS = [  # (key, label, format) of the table evaluate --core prints
    ("fvu", "FVU", ".4f"),
    ("explained_variance", "explained variance", ".4f"),
    ("cossim", "cosine sim.", ".4f"),
    ("l2_ratio", "L2 ratio", ".4f"),
    ("relative_reconstruction_bias", "relative reconstruction bias", ".4f"),
    ("l0_mean", "L0", ".2f"),
    ("alive_fraction", "alive (fired on these tokens)", ".2%"),
    ("density_mean", "firing density: mean", ".2e"),
    ("density_median", "firing density: median", ".2e"),
    ("description_length", "description length (bits/token)", ".1f"),
    ("dl_firing_bits", "  which fire", ".1f"),
    ("dl_value_bits", "  their values", ".1f"),
    ("dl_precision", "  at the precision", ".3g"),
    ("dl_naive_bits", "  naive L0·(log2 F + b)", ".1f"),
    ("dl_raw_bits", "  raw activation at the precision", ".1f"),
    ("kl_div", "KL divergence (nats/token)", ".4f"),
    ("kl_div_score", "KL divergence score", ".4f"),
    ("ce_spliced", "CE with the SAE spliced in", ".4f"),
    ("loss_recovered", "CE loss score", ".4f"),
]


def core_table(figures: dict) -> str:
    modes = figures["modes"]
    rows = [("", *modes)]
    for key, label, fmt in CORE_ROWS:
        if any(f"{mode}/{key}" in figures for mode in modes):
            rows.append(
                (label, *(format(figures[f"{m}/{key}"], fmt) if f"{m}/{key}" in figures else "-" for m in modes))
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def ridge(x: Tensor, y: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Least squares y ≈ x W + b with a ridge penalty λ·mean(eig(XᵀX))·‖W‖² (float64)."""
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = x - xm, y - ym
    gram = xc.T @ xc
    reg = lam * torch.trace(gram) / gram.shape[0]
    W = torch.linalg.solve(gram + reg * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    return W, ym - xm @ W


def r2(y: Tensor, pred: Tensor) -> float:
    """Share of the variance of y (summed over its columns) that ``pred`` explains."""
    return float(1 - (y - pred).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-30))


@torch.no_grad()
def dark_matter(module, x: Tensor, mode: str = "threshold", lam: float = 1e-3) -> dict[str, Any]:
    """Engels et al. (2024), "Decomposing the dark matter of sparse autoencoders", on held-out
    tokens x (model units): the SAE error e = x − x̂ is regressed on x (ridge, fitted on the
    first half of the tokens, scored on the second). Reports the share of the error's variance
    that is linearly predictable from x, the share of the variance of its per-token norm ‖e‖
    that is, and the FVU split into its nonlinear part (what the prediction leaves) and its linear
    part (what it removes)."""
    x = x.to(module.device)
    x_hat = torch.cat([module.reconstruct(chunk, mode) for chunk in x.split(4096)])
    x, e = x.double().cpu(), (x - x_hat).double().cpu()
    n = x.shape[0] // 2
    if n < 2 * x.shape[1]:
        raise DataError(
            f"{x.shape[0]} held-out tokens are too few for a {x.shape[1]}-dimensional fit (need "
            f"{4 * x.shape[1]}); pass more with --tokens"
        )
    W, b = ridge(x[:n], e[:n], lam)
    test_x, test_e = x[n:], e[n:]
    e_lin = test_x @ W + b
    norm = e.norm(dim=1, keepdim=True)
    Wn, bn = ridge(x[:n], norm[:n], lam)
    total = (test_x - test_x.mean(0)).pow(2).sum()
    return {
        "tokens_fit": n,
        "tokens_scored": x.shape[0] - n,
        "ridge": lam,
        "mode": mode,
        "fvu": float(test_e.pow(2).sum() / total),
        "error_variance_linearly_predictable": r2(test_e, e_lin),
        "error_norm_predictable": r2(norm[n:], test_x @ Wn + bn),
        # the nonlinear error is what the linear map leaves; the linear error, what it removes (the
        # two add up to the FVU; ‖ê_lin‖² would not, out of sample)
        "fvu_linear_error": float((test_e.pow(2).sum() - (test_e - e_lin).pow(2).sum()) / total),
        "fvu_nonlinear_error": float((test_e - e_lin).pow(2).sum() / total),
    }


def heldout_tokens(data: DataSpec, n: int | None) -> Tensor:
    """Tokens no choice was made on: the test split (the validation split of a run from before
    there was one), or a cache's last n (the test split first)."""
    dm = data.build()
    dm.open()
    if n is not None and isinstance(data, ActivationsData):
        reader = dm.reader  # type: ignore[attr-defined]
        return reader.range(max(0, reader.n_tokens - n), reader.n_tokens)
    return dm.test_tensor() if data.n_test > 0 else dm.val_tensor()


def rules_figures(run_dir: Path, asked: str, split: str, dl: bool, device: str = "cpu", curve: bool = False) -> dict:
    """The run's SAE read by the rules ``asked`` names (rules.py) on ``split``: rules.evaluate_rules's
    figures and per-context sums, with the run's own rule and k."""
    require_choice("--rule", asked, ["own", "all", *RULES])
    module, data = load_run(run_dir, device)
    if split == "test" and data.n_test == 0:
        raise DataError(
            f"{run_dir} has no test split (it was trained before data.test_tokens existed, or with 0): "
            "pass --split validation"
        )
    dm = data.build()
    dm.open()
    x = dm.test_tensor() if split == "test" else dm.val_tensor()
    names = rules_of(module, asked)
    found = evaluate_rules(
        module,
        dm.calibration_tokens(),
        x,
        dm.contexts(split),
        names,
        tuple(names) if dl else (),
        tuple(names) if curve else (),
    )
    return {"own_rule": own_rule(module), "k": module.k, "variant": module.variant.name, "split": split, "rules": found}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="a run folder (with config.yaml and checkpoints/final.ckpt)")
    p.add_argument("--contexts", type=int, default=128, help="ΔCE: held-out contexts of the cache")
    p.add_argument(
        "--dark-matter",
        action="store_true",
        help="instead of ΔCE: how much of the SAE's error is linearly predictable (Engels et al.)",
    )
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="dark matter: the cache's last N tokens (default: the validation and calibration splits)",
    )
    p.add_argument("--mode", choices=["threshold", "batch"], default="threshold", help="dark matter: the code's mode")
    p.add_argument(
        "--ridge", type=float, default=1e-3, help="dark matter: ridge penalty, relative to the mean eigenvalue"
    )
    p.add_argument(
        "--core",
        action="store_true",
        help="instead of ΔCE alone: SAEBench's core figures and the description length, each mode (core.json)",
    )
    p.add_argument("--tolerance", type=float, default=0.01, help="--core: the description length's FVU tolerance")
    p.add_argument(
        "--rule",
        default=None,
        help="instead of ΔCE: read the SAE by an inference rule (own, all, " + ", ".join(RULES) + "), each scaled "
        "to L0 = k on the calibration tokens; FVU at L0 = k and the description length (rules_<split>.json)",
    )
    p.add_argument("--split", choices=["test", "validation"], default="test", help="--rule: the tokens scored")
    p.add_argument("--no-dl", action="store_true", help="--rule: skip the description length (the slow part)")
    p.add_argument(
        "--dl-curve",
        action="store_true",
        help="--rule: also each rule's DL against FVU along its sweep (to read DL at a common FVU)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    with user_errors():
        if a.tolerance <= 0:
            raise ConfigError("--tolerance", a.tolerance, "a number > 0 (relative FVU tolerance, e.g. 0.01)")
        if a.rule is not None:
            return _rules_main(a)
        if a.core:
            return _core_main(a)
        if a.dark_matter:
            return _dark_matter_main(a)
        loaded = load_run(a.run, a.device)
        if not is_causal_cache(loaded[1]):  # what applies to it, rather than a refusal
            print(
                f"{a.run.name}: no ΔCE (it splices the SAE into a causal language model, and this run was trained on "
                f"{describe_data(loaded[1])}); its core figures instead (--core). --dark-matter: how much of its "
                "error is linear in the input"
            )
            return _core_main(a, loaded)
        figures = downstream(a.run, a.contexts, a.device, loaded=loaded)
    out = a.run / f"downstream_{a.contexts}.json"
    atomic_write_json(out, figures, sort_keys=True)
    print(
        f"{a.run.name}: CE clean {figures['val/ce_clean']:.4f}, zero-ablated {figures['val/ce_zero_ablation']:.4f}, "
        f"{figures['tokens_spliced']} tokens spliced"
    )
    for mode in ("batch", "threshold"):
        print(
            f"  {mode}: CE {figures[f'val/{mode}/ce_spliced']:.4f}, ΔCE {figures[f'val/{mode}/delta_ce']:+.4f}, "
            f"loss recovered {100 * figures[f'val/{mode}/loss_recovered']:.2f}%"
        )
    print(f"written {out}")
    return figures


def describe_data(data: DataSpec) -> str:
    """What a run's data are, in a few words (for the message of a figure that does not apply)."""
    if not isinstance(data, ActivationsData):
        return f"{data.kind} data"
    manifest = read_manifest(Path(data.path))
    name = (manifest or {}).get("harvest", {}).get("lm", {}).get("name")
    return f"the activations of {name or 'a model'}, which predicts no next token"


def _core_main(a, loaded=None) -> dict:
    figures = core(a.run, a.tokens, a.contexts, a.tolerance, a.device, loaded)
    out = a.run / "core.json"
    atomic_write_json(out, figures, sort_keys=True)
    tb.write_scalars(a.run, "core", {k: v for k, v in figures.items() if "/" in k})
    print(f"{a.run.name} ({figures['variant']}), {figures['tokens']} held-out tokens:")
    print(core_table(figures))
    print(f"written {out} and core/* in {a.run / 'tb'}")
    return figures


def _rules_main(a) -> dict:
    figures = rules_figures(a.run, a.rule, a.split, not a.no_dl, a.device, a.dl_curve)
    out = a.run / f"rules_{a.split}.json"
    atomic_write_json(out, figures, sort_keys=True)
    print(
        f"{a.run.name} ({figures['variant']}, k = {figures['k']}, its own rule {figures['own_rule']}), {a.split} split:"
    )
    rows = [("rule", "FVU at L0 = k", "L0 calibrated", "FVU calibrated", "DL at L0 = k", "contexts")]
    for rule, got in figures["rules"].items():
        f = got["figures"]
        dl = f"{f['dl_at_k']:.1f}" if "dl_at_k" in f else "-"
        rows.append(
            (
                rule,
                f"{f['fvu_at_k']:.4f}",
                f"{f['l0_calibrated']:.2f}",
                f"{f['fvu_calibrated']:.4f}",
                dl,
                str(f["contexts"]),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    print(f"written {out}")
    return figures


def _dark_matter_main(a) -> dict:
    module, data = load_run(a.run, a.device)
    figures = dark_matter(module, heldout_tokens(data, a.tokens), a.mode, a.ridge)
    out = a.run / "dark_matter.json"
    atomic_write_json(out, figures, sort_keys=True)
    tb.write_scalars(a.run, "dark_matter", figures, skip=("ridge",))
    print(f"{a.run.name} ({module.variant.name}, {a.mode} mode), {figures['tokens_scored']} held-out tokens scored:")
    print(
        f"  FVU {figures['fvu']:.4f} = linear error {figures['fvu_linear_error']:.4f} + nonlinear "
        f"{figures['fvu_nonlinear_error']:.4f}"
    )
    print(
        f"  error variance linearly predictable from x: {100 * figures['error_variance_linearly_predictable']:.1f}%;"
        f" per-token error norm predictable: {100 * figures['error_norm_predictable']:.1f}%"
    )
    print(f"written {out} and dark_matter/* in {a.run / 'tb'}")
    return figures


if __name__ == "__main__":
    main()
