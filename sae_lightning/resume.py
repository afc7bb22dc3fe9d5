"""What a resumed run continues from: the checkpoint, its run folder, and its config.

``resume=`` names a checkpoint file or a run folder (then its ``checkpoints/last.ckpt``). A
run resumes *in place*: the same folder, TensorBoard run, checkpoints and best-score
tracking. Its config is the checkpoint's own; keys given on the command line replace the
saved ones only where given, and only keys that do not change what is being trained may
differ (the training length, validation and logging cadence, devices, loader workers,
calibration, downstream figures). Anything else is refused before anything is written.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint_file
from .errors import ConfigError
from .spec import flatten

# keys a resumed run may change (a key, or a whole section ending in ".")
RESUMABLE = (
    "resume",
    "out_dir",
    "progress",
    "trainer.max_steps",
    "trainer.val_check_interval",
    "trainer.log_every_n_steps",
    "trainer.limit_val_batches",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "data.num_workers",
    "data.verify",
    "data.downstream.",
    "calibration.",
    "logging.",
    "sweep_trial",
    "sweep_trial.",
)


@dataclass
class ResumePoint:
    checkpoint: Path  # the file to restore
    run_dir: Path | None  # the run folder it belongs to (None: a checkpoint outside a run folder)
    state: dict[str, Any]  # the loaded checkpoint (tensors memory-mapped)
    config: dict[str, Any]  # the training config it was made with
    step: int


def locate(resume: str) -> tuple[Path, Path | None]:
    """(checkpoint file, its run folder or None) for ``resume=`` a file or a run folder."""
    path = Path(resume).expanduser()
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.is_file():
            raise ConfigError(
                "resume",
                resume,
                f"a checkpoint file or a run folder holding checkpoints/last.ckpt ({ckpt} does not exist)",
            )
        return ckpt, path if (path / "config.yaml").is_file() else None
    if not path.is_file():
        raise ConfigError("resume", resume, "null, a checkpoint file (.ckpt) or a run folder (outputs/runs/<run>)")
    run_dir = path.parent.parent
    in_run = path.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file()
    return path, run_dir if in_run else None


def read(resume: str) -> ResumePoint:
    """Load and check a checkpoint: readable, made by this package, with its config."""
    ckpt, run_dir = locate(resume)
    state = checkpoint_file.load(
        ckpt, f"resume={resume}", mmap=True, instead="resume from another checkpoint of the run (checkpoints/*.ckpt)"
    )
    config = upgraded(state["hyper_parameters"]["config"])
    return ResumePoint(ckpt, run_dir, state, config, int(state.get("global_step", 0)))


def upgraded(config: dict) -> dict:
    """A saved config in today's keys: ``trainer.gradient_clip_val`` (from before the module
    clipped its own gradients) becomes ``optim.clip_grad_norm`` (0 or null: none); a config
    from before seeds drew the training order gets ``data.order_seed: 0``, the order it had, and
    one from before the test split ``data.test_tokens: 0`` (its splits stay where they were)."""
    config = copy.deepcopy(config)
    trainer = config.get("trainer")
    if isinstance(trainer, dict) and {"gradient_clip_val", "gradient_clip_algorithm"} & set(trainer):
        value = trainer.pop("gradient_clip_val", None)
        trainer.pop("gradient_clip_algorithm", None)
        config.setdefault("optim", {}).setdefault("clip_grad_norm", value or None)
    if isinstance(config.get("data"), dict):
        config["data"].setdefault("order_seed", 0)
        config["data"].setdefault("test_tokens", 0)
    return config


def _get(tree: dict, path: str, missing=KeyError):
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _set(tree: dict, path: str, value, missing=KeyError) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is missing:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def explicit_keys(overrides: list[str]) -> list[str]:
    """The config paths the command line set: a key override sets its key; a group override
    (``variant=topk``) its whole section."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for ov in OverridesParser.create().parse_overrides(list(overrides)):
        key = ov.key_or_group
        if key.startswith("hydra.") or key == "hydra" or ov.is_sweep_override():
            continue
        keys.append(key)
    return keys


def resumed_config(
    saved: dict, composed: dict, overrides: list[str] | None, normalise=lambda d: d
) -> tuple[dict, list[str]]:
    """The config to resume with: ``saved``, with the keys the command line set taken from
    ``composed``. Returns it and the list of changed keys (``key: old -> new``); raises
    ConfigError if a key outside :data:`RESUMABLE` changed. Both sides are compared after
    ``normalise`` (defaults filled in), so a default that was only implicit is no change."""
    if overrides is None:  # a caller that composed the whole config on purpose
        merged = copy.deepcopy(composed)
    else:
        merged = copy.deepcopy(saved)
        for key in explicit_keys(overrides):
            _set(merged, key, _get(composed, key))
    merged["resume"] = composed.get("resume")
    old, new = flatten(normalise(saved)), flatten(normalise(merged))
    changed = sorted(k for k in set(old) | set(new) if old.get(k, KeyError) != new.get(k, KeyError))
    changed = [k for k in changed if k != "resume"]
    refused = [k for k in changed if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE)]
    if refused:
        shown = "; ".join(f"{k}: run {old.get(k, '(absent)')!r} vs now {new.get(k, '(absent)')!r}" for k in refused[:4])
        raise ConfigError(
            "resume",
            composed.get("resume"),
            f"the run's own settings ({shown}). A resumed run keeps its config except "
            f"{', '.join(dict.fromkeys(r.rstrip('.') for r in RESUMABLE[2:]))}; start a new run to "
            "change the rest",
        )
    return merged, [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in changed]
