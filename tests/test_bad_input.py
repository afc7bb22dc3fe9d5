"""The bad-input battery: every malformed input ends in exit status 2, one ``error:`` line on
stderr that names the problem, no traceback, and nothing written or left behind.

Inputs: configs (incl. trainer keys and Hydra's own errors), activation caches and their
manifests, checkpoints to resume from, sweep spaces, paths, harvest settings. Each case runs
the real entry point (``train.py`` / ``harvest.py`` with its command line) in a fresh
workspace holding whatever the case needs (a cache, a run folder), started in that workspace
(so that a relative path lands there too), and compares the workspace before and after; it never
looks at the repository's own ``outputs/``, where the user may be training meanwhile.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning.data import shards
from sae_lightning.data.harvest import harvest

from .helpers.harvest import spec_for

# make test-all: the bad-input battery, one entry-point process per case
pytestmark = pytest.mark.slow

SMALL = ["model.n_latents=128", "model.init_sample_tokens=256", "variant.k=4", "optim.warmup_steps=2", "progress=none"]
ON_CACHE = [
    "data=cache",
    "data.path={ws}/cache",
    "data.batch_size=64",
    "data.val_tokens=100",
    "data.calibration_tokens=90",
    *SMALL,
]
SYNTH = [
    "data.d_model=16",
    "data.n_features=32",
    "data.active_median=2",
    "data.active_max=8",
    "data.batch_size=64",
    "data.val_tokens=64",
    "data.calibration_tokens=64",
    *SMALL,
]
HARVEST = [
    "data=smollm2",
    "data.path={ws}/newcache",
    "data.harvest.lm.name={lm}",
    "data.harvest.corpus.path={corpus}",
    "data.harvest.layer=1",
    "data.harvest.context_length=16",
    "data.harvest.token_budget=300",
    "progress=false",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_lm, corpus_file, cli):
    """A small cache and a short finished run (topk on synthetic data) to copy into workspaces."""
    root = tmp_path_factory.mktemp("assets")
    harvest(
        root / "cache",
        spec_for(tiny_lm, corpus_file, token_budget=1500, shard_tokens=256, dtype="float16"),
        progress=False,
        log=lambda *a: None,
    )
    r = cli(
        "train.py",
        f"out_dir={root / 'out'}",
        "variant=topk",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        *SYNTH,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (run,) = (root / "out" / "runs").iterdir()
    shutil.move(str(run), root / "run")
    return {"root": root, "lm": tiny_lm, "corpus": corpus_file}


# ---- workspace set-ups: each makes what a case needs inside the workspace ---------------------
def with_cache(ws: Path, a: dict) -> None:
    shutil.copytree(a["root"] / "cache", ws / "cache")


def with_run(ws: Path, a: dict) -> None:
    shutil.copytree(a["root"] / "run", ws / "run")


def edit_manifest(fn):
    def setup(ws: Path, a: dict) -> None:
        with_cache(ws, a)
        m = json.loads((ws / "cache" / "manifest.json").read_text())
        fn(m)
        (ws / "cache" / "manifest.json").write_text(json.dumps(m))

    return setup


def edit_shard(fn):
    def setup(ws: Path, a: dict) -> None:
        with_cache(ws, a)
        fn(ws / "cache" / "shard_00001.npy")

    return setup


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def write(name: str, content: bytes | str):
    def setup(ws: Path, a: dict) -> None:
        (ws / name).parent.mkdir(parents=True, exist_ok=True)
        (ws / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def truncated_checkpoint(ws: Path, a: dict) -> None:
    with_run(ws, a)
    truncate(ws / "run" / "checkpoints" / "last.ckpt")


def foreign_torch_file(ws: Path, a: dict) -> None:
    torch.save({"weights": torch.zeros(3)}, ws / "other.ckpt")


def run_without_checkpoints(ws: Path, a: dict) -> None:
    with_run(ws, a)
    shutil.rmtree(ws / "run" / "checkpoints")


def a_file_as_out_dir_parent(ws: Path, a: dict) -> None:
    (ws / "afile").write_text("not a folder")


def nan_in_a_checksummed_shard(ws: Path, a: dict) -> None:
    """A NaN that passes the checksum (written with a matching manifest): found when the cache is opened."""
    with_cache(ws, a)
    path = ws / "cache" / "shard_00000.npy"
    arr = np.load(path)
    arr[3, 5] = np.nan
    np.save(path, arr)
    m = json.loads((ws / "cache" / "manifest.json").read_text())
    m["shards"][0]["activations"].update(bytes=path.stat().st_size, sha256=shards.sha256_file(path))
    (ws / "cache" / "manifest.json").write_text(json.dumps(m))


# the environment of a case's process, where it needs its own (the tests run with the hub off)
ENV = {"hub_unreachable": {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}}


# (id, script, arguments, set-up, the whole error line: {ws}, {lm} and {corpus} stand for the
# workspace, the tiny model and the corpus; <*> for what depends on the machine or a library
# (token counts of the tiny model's cache, hashes, Lightning's and transformers' own words))
CASES = [
    # ---- config values ---------------------------------------------------------------------
    (
        "k_above_F",
        "train.py",
        ["model.n_latents=16", "variant.k=32"],
        None,
        "error: config error: variant.k=32 is not allowed; expected at most model.n_latents = 16",
    ),
    (
        "k_zero",
        "train.py",
        ["variant.k=0"],
        None,
        "error: config error: variant.k=0 is not allowed; expected an integer > 0",
    ),
    (
        "k_string",
        "train.py",
        ["variant.k=many"],
        None,
        "error: config error: variant.k='many' is not allowed; expected an integer > 0",
    ),
    (
        "lr_inf",
        "train.py",
        ["optim.lr=inf"],
        None,
        "error: config error: optim.lr=inf is not allowed; expected a finite number",
    ),
    (
        "lr_negative",
        "train.py",
        ["optim.lr=-1"],
        None,
        "error: config error: optim.lr=-1 is not allowed; expected null (2e-4 / sqrt(n_latents / 2^14)) or a number > 0",
    ),
    (
        "betas",
        "train.py",
        ["optim.betas=[0.9,1.5]"],
        None,
        "error: config error: optim.betas=[0.9, 1.5] is not allowed; expected two numbers in [0, 1)",
    ),
    (
        "eps_nan",
        "train.py",
        ["optim.eps=nan"],
        None,
        "error: config error: optim.eps=nan is not allowed; expected a finite number",
    ),
    ("seed_float", "train.py", ["seed=1.5"], None, "error: config error: seed=1.5 is not allowed; expected an integer"),
    (
        "normalisation",
        "train.py",
        ["model.normalisation=batchnorm"],
        None,
        "error: config error: model.normalisation='batchnorm' is not allowed; expected one of 'none', 'dataset_scale', 'layernorm'",
    ),
    (
        "n_latents_string",
        "train.py",
        ["model.n_latents=abc"],
        None,
        "error: config error: model.n_latents='abc' is not allowed; expected an integer >= 1",
    ),
    (
        "allocator",
        "train.py",
        ["variant.allocator=switch"],
        None,
        "error: config error: variant.allocator='switch' is not allowed; expected one of 'feature_choice', 'jumprelu', 'mutual_choice', 'topk'",
    ),
    (
        "jumprelu without its sparsity term",
        "train.py",
        ["variant=jumprelu", "~variant.losses.sparsity"],
        None,
        "error: config error: variant.losses=['recon'] is not allowed; expected a sparsity term (losses.sparsity) for jumprelu: without it nothing holds its thresholds up and L0 grows without bound",
    ),
    (
        "a sparsity term without learned thresholds",
        "train.py",
        ["variant=topk", "+variant.losses.sparsity.mode=target"],
        None,
        "error: config error: variant.losses.sparsity={'coef': 1.0, 'mode': 'target'} is not allowed; expected no sparsity term for topk: it acts on learned thresholds (variant.allocator=jumprelu)",
    ),
    (
        "capacity",
        "train.py",
        ["variant=feature_choice", "variant.capacity=pareto"],
        None,
        "error: config error: variant.capacity='pareto' is not allowed; expected one of 'uniform', 'zipf', 'demand'",
    ),
    (
        "allocator_key_typo",
        "train.py",
        ["variant=feature_choice", "+variant.capacty=zipf"],
        None,
        "error: config error: variant.capacty='zipf' is not allowed; expected a key of allocator 'feature_choice' (or name, allocator, losses) (<*>); did you mean variant.capacity?",
    ),
    (
        "unknown_loss",
        "train.py",
        ["+variant.losses.aux_q.coef=1"],
        None,
        "error: config error: variant.losses.aux_q={'coef': 1} is not allowed; expected a key of the losses (aux_k, aux_zipf, matryoshka, recon, sparsity); did you mean variant.losses.aux_k?",
    ),
    (
        "loss_tau",
        "train.py",
        ["variant.losses.aux_zipf.tau=-1"],
        None,
        "error: config error: variant.losses.aux_zipf.tau=-1 is not allowed; expected a finite number >= 0",
    ),
    (
        "dead_window",
        "train.py",
        ["stats.dead_window_tokens=0"],
        None,
        "error: config error: stats.dead_window_tokens=0 is not allowed; expected an integer >= 1 (tokens)",
    ),
    (
        "batch_size",
        "train.py",
        ["data.batch_size=0"],
        None,
        "error: config error: data.batch_size=0 is not allowed; expected an integer >= 1",
    ),
    (
        "data_kind",
        "train.py",
        ["data.kind=parquet"],
        None,
        "error: config error: data.kind='parquet' is not allowed; expected one of 'activations', 'synthetic'",
    ),
    (
        "progress",
        "train.py",
        ["progress=sometimes"],
        None,
        "error: config error: progress='sometimes' is not allowed; expected one of 'auto', 'bar', 'lines', 'none'",
    ),
    (
        "cache_path_missing",
        "train.py",
        ["data=cache"],
        None,
        "error: config error: data.path='???' is not allowed; expected a value: this key has no default (set it on the command line)",
    ),
    # ---- trainer keys ------------------------------------------------------------------------
    (
        "max_steps_zero",
        "train.py",
        ["trainer.max_steps=0"],
        None,
        "error: config error: trainer.max_steps=0 is not allowed; expected an integer >= 1",
    ),
    (
        "val_interval_zero",
        "train.py",
        ["trainer.val_check_interval=0"],
        None,
        "error: config error: trainer.val_check_interval=0 is not allowed; expected null, an integer >= 1 (training steps between validations) or a fraction in (0, 1]",
    ),
    (
        "precision",
        "train.py",
        ["trainer.precision=17"],
        None,
        "error: config error: trainer.precision=17 is not allowed; expected one of <*>'32-true', '64-true' (or the short forms 64, 32, 16, 'bf16')",
    ),
    (
        "clip_nan",
        "train.py",
        ["optim.clip_grad_norm=nan"],
        None,
        "error: config error: optim.clip_grad_norm=nan is not allowed; expected a finite number",
    ),
    (
        "trainer_clip",
        "train.py",
        ["+trainer.gradient_clip_val=0.5"],
        None,
        "error: config error: trainer.gradient_clip_val=0.5 is not allowed; expected null: the SAE module clips its own gradients, so that the recipe travels with it; set optim.clip_grad_norm (a number > 0, or null for none) instead",
    ),
    (
        "added_typo",
        "train.py",
        ["+trainer.max_step=10"],
        None,
        "error: config error: trainer.max_step=10 is not allowed; expected a key of lightning.Trainer's arguments (see its documentation); did you mean trainer.max_steps?",
    ),
    (
        "typo",
        "train.py",
        ["trainer.max_step=10"],
        None,
        "error: config error: trainer.max_step=10: the config has no key trainer.max_step; did you mean trainer.max_steps? (to add a new key on purpose, write +trainer.max_step=10)",
    ),
    (
        "accelerator",
        "train.py",
        ["trainer.accelerator=gpu"],
        None,
        "error: config error: trainer.accelerator='gpu' is not allowed; expected a setting Lightning accepts on this machine (<*>)",
    ),
    (
        "devices",
        "train.py",
        ["trainer.devices=0"],
        None,
        "error: config error: trainer.devices=0 is not allowed; expected auto, an integer >= 1 (-1: all), or a list of device indices",
    ),
    (
        "strategy",
        "train.py",
        ["trainer.strategy=ddpp"],
        None,
        "error: config error: trainer.strategy='ddpp' is not allowed; expected a Lightning strategy: auto, ddp, ddp_spawn, ddp_fork, fsdp, deepspeed, ... (lightning.pytorch.strategies.StrategyRegistry); did you mean ddp?",
    ),
    (
        "progress_bar_key",
        "train.py",
        ["+trainer.enable_progress_bar=false"],
        None,
        "error: config error: trainer.enable_progress_bar=False is not allowed; expected no value here: the top-level key progress=auto|bar|lines|none chooses how training progress is shown",
    ),
    # ---- Hydra's own errors ------------------------------------------------------------------
    (
        "group_option",
        "train.py",
        ["variant=switch"],
        None,
        "error: config error: variant=switch: Could not find 'variant/switch'; available options in 'variant': feature_choice, jumprelu, matryoshka_mutual_choice, matryoshka_topk, mutual_choice, topk",
    ),
    (
        "parse",
        "train.py",
        ["variant.k=("],
        None,
        "error: config error: cannot parse a command-line override: Error parsing override 'variant.k=('",
    ),
    (
        "config_file_yaml_syntax",
        "train.py",
        ["--config-dir", "{ws}/cfg", "--config-name", "bad"],
        write("cfg/bad.yaml", "defaults:\n  - train\nseed: [1, 2\n"),
        "error: config error: {ws}/cfg/bad.yaml, line 4, column 1 is not valid YAML: while parsing a flow sequence expected ',' or ']', but got '<stream end>'",
    ),
    # ---- paths ---------------------------------------------------------------------------------
    (
        "out_dir_unwritable",
        "train.py",
        ["out_dir=/proc/sae_lightning_out"],
        None,
        "error: config error: out_dir='/proc/sae_lightning_out' is not allowed; expected a folder this user can write (cannot write in /proc: No such file or directory)",
    ),
    (
        "out_dir_under_a_file",
        "train.py",
        ["out_dir={ws}/afile/out"],
        a_file_as_out_dir_parent,
        "error: config error: out_dir='{ws}/afile/out' is not allowed; expected a folder ({ws}/afile is a file)",
    ),
    (
        "cache_folder_missing",
        "train.py",
        [*ON_CACHE[:1], "data.path={ws}/nowhere", *ON_CACHE[2:]],
        None,
        "error: no activation cache at {ws}/nowhere (no manifest.json) and no data.harvest section to make one: harvest it first (python harvest.py data=...) or point data.path at a cache",
    ),
    # ---- activation caches and manifests -----------------------------------------------------
    (
        "manifest_d_model",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(d_model=m["d_model"] + 1)),
        "error: activation cache {ws}/cache: {ws}/cache/shard_00000.npy holds float16 (<*>, 32) but the manifest describes float16 (<*>, 33) (tokens <*>, d_model 33, dtype float16). Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "manifest_tokens",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(tokens=m["tokens"] + 5)),
        "error: {ws}/cache/manifest.json is damaged: its shards hold <*> tokens but 'tokens' says <*>; delete the cache folder and harvest it again",
    ),
    (
        "manifest_shard_tokens",
        "train.py",
        ON_CACHE,
        edit_manifest(
            lambda m: (m["shards"][1].update(tokens=m["shards"][1]["tokens"] + 3), m.update(tokens=m["tokens"] + 3))
        ),
        "error: activation cache {ws}/cache: {ws}/cache/shard_00001.npy holds float16 (<*>, 32) but the manifest describes float16 (<*>, 32) (tokens <*>, d_model 32, dtype float16). Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "manifest_dtype",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(dtype="float32")),
        "error: activation cache {ws}/cache: {ws}/cache/shard_00000.npy holds float16 (<*>, 32) but the manifest describes float32 (<*>, 32) (tokens <*>, d_model 32, dtype float32). Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "manifest_dtype_unknown",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(dtype="int8")),
        "error: {ws}/cache/manifest.json is damaged: dtype 'int8' is not one of float32, float16, bfloat16; delete the cache folder and harvest it again",
    ),
    (
        "manifest_missing_field",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.pop("shards")),
        "error: {ws}/cache/manifest.json is damaged: 'shards' is None, expected a list; delete the cache folder and harvest it again",
    ),
    (
        "manifest_format",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(format="other/9")),
        "error: {ws}/cache/manifest.json has format 'other/9', this version reads 'sae_lightning.activations/1'",
    ),
    (
        "manifest_not_json",
        "train.py",
        ON_CACHE,
        lambda ws, a: (with_cache(ws, a), (ws / "cache" / "manifest.json").write_text("{")),
        "error: {ws}/cache/manifest.json is not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); the cache is damaged: delete the folder and harvest again",
    ),
    (
        "shard_truncated",
        "train.py",
        ON_CACHE,
        edit_shard(truncate),
        "error: activation cache {ws}/cache: {ws}/cache/shard_00001.npy has <*> bytes, the manifest says <*> (truncated or overwritten). Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "shard_missing",
        "train.py",
        ON_CACHE,
        edit_shard(lambda p: p.unlink()),
        "error: activation cache {ws}/cache: {ws}/cache/shard_00001.npy is missing. Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "shard_corrupt",
        "train.py",
        ON_CACHE,
        edit_shard(flip_byte),
        "error: activation cache {ws}/cache: {ws}/cache/shard_00001.npy is corrupt: sha256 <*>… differs from the manifest's <*>…. Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "shard_nan_checksummed",
        "train.py",
        ON_CACHE,
        nan_in_a_checksummed_shard,
        "error: activation cache {ws}/cache: {ws}/cache/shard_00000.npy holds a NaN or inf at row 3. Re-run the harvest (python harvest.py with the same data config): it checks every shard and re-creates the cache from the first bad one",
    ),
    (
        "cache_too_small",
        "train.py",
        [*ON_CACHE, "data.val_tokens=100000"],
        with_cache,
        "error: activation cache {ws}/cache holds <*> tokens: too few for data.test_tokens=100000 + data.val_tokens=100000 + data.calibration_tokens=90 + one training batch of 64; harvest more (data.harvest.token_budget) or lower those",
    ),
    (
        "cache_d_model",
        "train.py",
        [*ON_CACHE, "data.d_model=48"],
        with_cache,
        "error: config error: data.d_model=48 is not allowed; expected null or 32: the cache {ws}/cache holds d_model 32",
    ),
    (
        "gradient_ranking_without_gradients",
        "train.py",
        [*ON_CACHE, "variant.gradient_ranking.beta=0.5"],
        with_cache,
        "error: config error: variant.gradient_ranking.beta=0.5 is not allowed; expected 0 for data 'activations' without gradients ∇ₓL; gradient ranking needs an activation cache harvested with data.harvest.gradients=true (a causal model, e.g. data=smollm2_grad)",
    ),
    (
        "gradient_ranking_on_synthetic",
        "train.py",
        ["variant.gradient_ranking.beta=1"],
        None,
        "error: config error: variant.gradient_ranking.beta=1.0 is not allowed; expected 0 for data 'synthetic' without gradients ∇ₓL; gradient ranking needs an activation cache harvested with data.harvest.gradients=true (a causal model, e.g. data=smollm2_grad)",
    ),
    (
        "gradient_ranking_negative",
        "train.py",
        ["variant.gradient_ranking.beta=-1"],
        None,
        "error: config error: variant.gradient_ranking.beta=-1 is not allowed; expected a finite number >= 0",
    ),
    (
        "harvest_gradients_of_an_encoder",
        "harvest.py",
        ["data=minilm", "data.path={ws}/c", "data.harvest.gradients=true", "data.harvest.corpus.path={corpus}"],
        None,
        "error: config error: data.harvest.gradients=True is not allowed; expected false for builtin:minilm (BertModel): gradients of the next-token loss need a causal language model (e.g. builtin:smollm2)",
    ),
    # ---- checkpoints to resume from ----------------------------------------------------------
    (
        "resume_missing",
        "train.py",
        ["resume={ws}/nothing.ckpt"],
        None,
        "error: config error: resume='{ws}/nothing.ckpt' is not allowed; expected null, a checkpoint file (.ckpt) or a run folder (outputs/runs/<run>)",
    ),
    (
        "resume_truncated",
        "train.py",
        ["resume={ws}/run"],
        truncated_checkpoint,
        "error: resume={ws}/run: {ws}/run/checkpoints/last.ckpt is not a readable checkpoint (truncated, damaged or not a torch file: OSError); resume from another checkpoint of the run (checkpoints/*.ckpt)",
    ),
    (
        "resume_text_file",
        "train.py",
        ["resume={ws}/notes.ckpt"],
        write("notes.ckpt", "hello"),
        "error: resume={ws}/notes.ckpt: {ws}/notes.ckpt is not a readable checkpoint (truncated, damaged or not a torch file: RuntimeError); resume from another checkpoint of the run (checkpoints/*.ckpt)",
    ),
    (
        "resume_foreign",
        "train.py",
        ["resume={ws}/other.ckpt"],
        foreign_torch_file,
        "error: resume={ws}/other.ckpt: {ws}/other.ckpt is a torch file but not a checkpoint of an sae_lightning run (no hyper_parameters.config / state_dict)",
    ),
    (
        "resume_other_variant",
        "train.py",
        ["resume={ws}/run", "variant=mutual_choice"],
        with_run,
        "error: config error: resume='{ws}/run' is not allowed; expected the run's own settings (variant.allocator: run 'topk' vs now 'mutual_choice'; <*>",
    ),
    (
        "resume_other_width",
        "train.py",
        ["resume={ws}/run", "model.n_latents=256"],
        with_run,
        "error: config error: resume='{ws}/run' is not allowed; expected the run's own settings (model.n_latents: run 128 vs now 256). A resumed run keeps its config except <*>",
    ),
    (
        "resume_no_checkpoints",
        "train.py",
        ["resume={ws}/run"],
        run_without_checkpoints,
        "error: config error: resume='{ws}/run' is not allowed; expected a checkpoint file or a run folder holding checkpoints/last.ckpt ({ws}/run/checkpoints/last.ckpt does not exist)",
    ),
    # ---- sweep spaces and settings -----------------------------------------------------------
    (
        "sweep_interval",
        "train.py",
        ["-m", "sweeps=pareto", "variant.k=interval(64,4)"],
        None,
        "error: config error: variant.k='interval(64,4)' is not allowed; expected interval(low, high) with low <= high (low 64.0 > high 4.0)",
    ),
    (
        "sweep_log_zero",
        "train.py",
        ["-m", "sweeps=pareto", "optim.lr=tag(log,interval(0,1))"],
        None,
        "error: config error: optim.lr='tag(log,interval(0,1))' is not allowed; expected a log interval with low > 0",
    ),
    (
        "sweep_range_empty",
        "train.py",
        ["-m", "sweeps=pareto", "variant.k=range(8,2)"],
        None,
        "error: config error: variant.k='range(8,2)' is not allowed; expected range(start, stop[, step]) that holds at least one value (start < stop for a positive step)",
    ),
    (
        "sweep_unknown_key",
        "train.py",
        ["-m", "sweeps=pareto", "variant.kk=choice(1,2)"],
        None,
        "error: config error: variant.kk='choice(1,2)' is not allowed; expected a key of the config to sweep; did you mean variant.k=choice(1,2)? (to sweep a new key on purpose: +variant.kk=choice(1,2))",  # in the sweep's syntax
    ),
    (
        "sweep_sampler",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.sampler=cmaes"],
        None,
        "error: config error: hydra.sweeper.sampler='cmaes' is not allowed; expected one of 'tpe', 'nsga2', 'random'",
    ),
    (
        "sweep_n_trials",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.n_trials=0"],
        None,
        "error: config error: hydra.sweeper.n_trials=0 is not allowed; expected an integer >= 1",
    ),
    (
        "sweep_directions",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.directions=[minimize]"],
        None,
        "error: config error: hydra.sweeper.directions=['minimize'] is not allowed; expected one of 'minimize'/'maximize' per objective (2)",
    ),
    (
        "sweep_storage",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.storage=nodb://x"],
        None,
        "error: hydra.sweeper.storage=nodb://x: cannot open the study storage (NoSuchModuleError: Can't load plugin: sqlalchemy.dialects:nodb)",
    ),
    (
        "sweep_storage_folder",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.storage=sqlite:////proc/nope/s.db"],
        None,
        "error: hydra.sweeper.storage=sqlite:////proc/nope/s.db: cannot make the folder /proc/nope for the SQLite file (No such file or directory); give a path this user can write, or another SQLAlchemy URL",
    ),
    # ---- harvest settings --------------------------------------------------------------------
    (
        "harvest_unwritable",
        "harvest.py",
        [*HARVEST, "data.path=/proc/sae_x"],
        None,
        "error: config error: data.path='/proc/sae_x' is not allowed; expected a folder this user can write (cannot write in /proc: No such file or directory)",
    ),
    (
        "harvest_layer_builtin_corpus",  # checked before the built-in corpus is written beside the cache
        "harvest.py",
        [*HARVEST, "data.harvest.corpus.path=builtin:python_docstrings", "data.harvest.layer=99"],
        None,
        "error: config error: data.harvest.layer=99 is not allowed; expected an integer in [0, 1] (or -2..-1 from the end): the model has 2 blocks",
    ),
    (
        "hub_unreachable",  # one line at once, not the hub client's retries
        "harvest.py",
        [*HARVEST, "data.harvest.lm.name=nosuchorg/nosuchmodel"],
        None,
        "error: cannot load model 'nosuchorg/nosuchmodel' (OSError: <*>). It is not a local path nor in the Hugging Face cache, and the hub (http://127.0.0.1:9) cannot be reached. Point data.harvest.lm.name at a local folder (save_pretrained layout) or a .gguf file, or use builtin:<*>",
    ),
    (
        "harvest_model_missing",
        "harvest.py",
        [*HARVEST, "data.harvest.lm.name={ws}/no_model"],
        None,
        "error: model folder {ws}/no_model does not exist",
    ),
    (
        "harvest_corpus_missing",
        "harvest.py",
        [*HARVEST, "data.harvest.corpus.path={ws}/none.txt"],
        None,
        "error: corpus '{ws}/none.txt': no such file, or no .txt/.json/.jsonl/.parquet file there",
    ),
    (
        "harvest_layer",
        "harvest.py",
        [*HARVEST, "data.harvest.layer=99"],
        None,
        "error: config error: data.harvest.layer=99 is not allowed; expected an integer in [0, 1] (or -2..-1 from the end): the model has 2 blocks",
    ),
    (
        "harvest_site",
        "harvest.py",
        [*HARVEST, "data.harvest.site=mlp_out"],
        None,
        "error: config error: data.harvest.site='mlp_out' is not allowed; expected one of 'resid_post', 'resid_pre'",
    ),
    (
        "harvest_context",
        "harvest.py",
        [*HARVEST, "data.harvest.context_length=1"],
        None,
        "error: config error: data.harvest.context_length=1 is not allowed; expected an integer >= 2",
    ),
    (
        "harvest_not_a_harvest",
        "harvest.py",
        ["data=synthetic"],
        None,
        "error: config error: data='synthetic' is not allowed; expected a data config of kind 'activations' with a harvest section",
    ),
]


def line_pattern(template: str, fill: dict[str, str]) -> str:
    """A regex for the whole line ``template`` describes (see CASES)."""
    parts = re.split(r"(\{ws\}|\{lm\}|\{corpus\}|<\*>)", template)
    out = []
    for part in parts:
        if part == "<*>":
            out.append(".*?")
        elif part in ("{ws}", "{lm}", "{corpus}"):
            out.append(re.escape(fill[part[1:-1]]))
        else:
            out.append(re.escape(part))
    return "".join(out)


def test_line_patterns_match_the_whole_line_only():
    fill = {"ws": "/w", "lm": "/m", "corpus": "/c"}
    assert re.fullmatch(line_pattern("error: {ws}/a holds <*> tokens (x)", fill), "error: /w/a holds 12 tokens (x)")
    assert not re.fullmatch(line_pattern("error: {ws}/a holds <*> tokens", fill), "error: /w/a holds 12 tokens; more")
    assert not re.fullmatch(line_pattern("error: a.b (c)", fill), "error: aXb (c)")


def tree(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots with its kind, size and modification time."""
    out: dict[str, tuple] = {}
    for root in roots:
        out[str(root)] = (root.exists(),)
        for p in sorted(root.rglob("*")) if root.exists() else []:
            st = p.lstat()
            out[str(p)] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
    return out


def test_the_battery_is_large_enough():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,script,args,setup,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_leaves_nothing(
    name, script, args, setup, message, cli, assets, tmp_path
):
    ws = tmp_path / "ws"
    ws.mkdir()
    if setup is not None:
        setup(ws, assets)
    fill = {"ws": str(ws), "lm": str(assets["lm"]), "corpus": str(assets["corpus"])}
    argv = [a.format(**fill) for a in args]
    if not any(a.startswith("out_dir=") for a in argv):
        argv.append(f"out_dir={ws}/out")
    before = tree(ws)
    r = cli(script, *argv, env=ENV.get(name), cwd=ws)  # anything written to a relative path lands in ws
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:], r.stdout[-1000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    assert re.fullmatch(line_pattern(message, fill), lines[0]), (message, lines[0])
    assert tree(ws) == before, "the workspace changed"


def test_a_nan_found_during_training_names_the_run_folder(cli, assets, tmp_path):
    """With data.verify=size the shards are not read when opened: a NaN is found by the loader
    mid-training, and the one line names the run folder that stays (docs/errors.md)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    nan_in_a_checksummed_shard(ws, assets)
    argv = [a.format(ws=ws) for a in ON_CACHE]
    r = cli("train.py", *argv, "data.verify=size", "trainer.max_steps=50", f"out_dir={ws}/out", "data.seed=3")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert re.search(r"shard_00000\.npy holds a NaN or inf at row 3", lines[0]), lines[0]
    (run,) = (ws / "out" / "runs").iterdir()
    assert f"the run folder {run} keeps what was written" in lines[0]
