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


# (id, script, arguments, set-up, what the error line must say)
CASES = [
    # ---- config values ---------------------------------------------------------------------
    (
        "k_above_F",
        "train.py",
        ["model.n_latents=16", "variant.k=32"],
        None,
        r"variant\.k=32 .*at most model\.n_latents = 16",
    ),
    ("k_zero", "train.py", ["variant.k=0"], None, r"variant\.k=0 .*integer > 0"),
    ("k_string", "train.py", ["variant.k=many"], None, r"variant\.k='many' .*integer"),
    ("lr_inf", "train.py", ["optim.lr=inf"], None, r"optim\.lr=inf .*finite number"),
    ("lr_negative", "train.py", ["optim.lr=-1"], None, r"optim\.lr=-1 .*> 0"),
    ("betas", "train.py", ["optim.betas=[0.9,1.5]"], None, r"optim\.betas=\[0\.9, 1\.5\] .*\[0, 1\)"),
    ("eps_nan", "train.py", ["optim.eps=nan"], None, r"optim\.eps=nan .*finite"),
    ("seed_float", "train.py", ["seed=1.5"], None, r"seed=1\.5 .*integer"),
    (
        "normalisation",
        "train.py",
        ["model.normalisation=batchnorm"],
        None,
        r"model\.normalisation='batchnorm'.*'layernorm'",
    ),
    ("n_latents_string", "train.py", ["model.n_latents=abc"], None, r"model\.n_latents='abc' .*integer"),
    ("allocator", "train.py", ["variant.allocator=switch"], None, r"variant\.allocator='switch'.*'topk'"),
    (
        "train an imported jumprelu",
        "train.py",
        ["variant=jumprelu"],
        None,
        r"variant=.jumprelu. is not allowed.*nothing to train",
    ),
    (
        "capacity",
        "train.py",
        ["variant=feature_choice", "variant.capacity=pareto"],
        None,
        r"variant\.capacity='pareto'.*'zipf'",
    ),
    (
        "allocator_key_typo",
        "train.py",
        ["variant=feature_choice", "+variant.capacty=zipf"],
        None,
        r"variant\.capacty.*a key of allocator 'feature_choice'",
    ),
    ("unknown_loss", "train.py", ["+variant.losses.aux_q.coef=1"], None, r"variant\.losses\.aux_q"),
    ("loss_tau", "train.py", ["variant.losses.aux_zipf.tau=-1"], None, r"variant\.losses\.aux_zipf\.tau=-1"),
    ("dead_window", "train.py", ["stats.dead_window_tokens=0"], None, r"stats\.dead_window_tokens=0"),
    ("batch_size", "train.py", ["data.batch_size=0"], None, r"data\.batch_size=0"),
    ("data_kind", "train.py", ["data.kind=parquet"], None, r"data\.kind='parquet'.*'synthetic'"),
    ("progress", "train.py", ["progress=sometimes"], None, r"progress='sometimes'.*'lines'"),
    ("cache_path_missing", "train.py", ["data=cache"], None, r"data\.path='\?\?\?' .*a value"),
    # ---- trainer keys ------------------------------------------------------------------------
    ("max_steps_zero", "train.py", ["trainer.max_steps=0"], None, r"trainer\.max_steps=0 .*integer >= 1"),
    ("val_interval_zero", "train.py", ["trainer.val_check_interval=0"], None, r"trainer\.val_check_interval=0"),
    ("precision", "train.py", ["trainer.precision=17"], None, r"trainer\.precision=17 .*'bf16-mixed'"),
    ("clip_nan", "train.py", ["optim.clip_grad_norm=nan"], None, r"optim\.clip_grad_norm=nan .*finite"),
    (
        "trainer_clip",
        "train.py",
        ["+trainer.gradient_clip_val=0.5"],
        None,
        r"trainer\.gradient_clip_val=0\.5 is not allowed; expected null: the SAE module clips its own gradients.*optim\.clip_grad_norm",
    ),
    (
        "added_typo",
        "train.py",
        ["+trainer.max_step=10"],
        None,
        r"trainer\.max_step=10 .*did you mean trainer\.max_steps\?",
    ),
    ("typo", "train.py", ["trainer.max_step=10"], None, r"no key trainer\.max_step; did you mean trainer\.max_steps\?"),
    ("accelerator", "train.py", ["trainer.accelerator=gpu"], None, r"trainer\.accelerator='gpu'"),
    ("devices", "train.py", ["trainer.devices=0"], None, r"trainer\.devices=0"),
    ("strategy", "train.py", ["trainer.strategy=ddpp"], None, r"trainer\.strategy='ddpp' .*did you mean ddp\?"),
    ("progress_bar_key", "train.py", ["+trainer.enable_progress_bar=false"], None, r"progress=auto\|bar\|lines\|none"),
    # ---- Hydra's own errors ------------------------------------------------------------------
    ("group_option", "train.py", ["variant=switch"], None, r"Could not find 'variant/switch'.*mutual_choice"),
    ("parse", "train.py", ["variant.k=("], None, r"cannot parse a command-line override"),
    (
        "config_file_yaml_syntax",
        "train.py",
        ["--config-dir", "{ws}/cfg", "--config-name", "bad"],
        write("cfg/bad.yaml", "defaults:\n  - train\nseed: [1, 2\n"),
        r"bad\.yaml, line 4, column 1 is not valid YAML: .*expected ',' or '\]'",
    ),
    # ---- paths ---------------------------------------------------------------------------------
    ("out_dir_unwritable", "train.py", ["out_dir=/proc/sae_lightning_out"], None, r"out_dir='/proc/sae_lightning_out'"),
    (
        "out_dir_under_a_file",
        "train.py",
        ["out_dir={ws}/afile/out"],
        a_file_as_out_dir_parent,
        r"out_dir=.*afile is a file",
    ),
    (
        "cache_folder_missing",
        "train.py",
        [*ON_CACHE[:1], "data.path={ws}/nowhere", *ON_CACHE[2:]],
        None,
        r"no activation cache at .*nowhere",
    ),
    # ---- activation caches and manifests -----------------------------------------------------
    (
        "manifest_d_model",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(d_model=m["d_model"] + 1)),
        r"shard_00000\.npy holds float16 \(\d+, 32\) but the manifest describes float16 \(\d+, 33\)",
    ),
    (
        "manifest_tokens",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(tokens=m["tokens"] + 5)),
        r"manifest\.json is damaged: its shards hold \d+ tokens but 'tokens' says",
    ),
    (
        "manifest_shard_tokens",
        "train.py",
        ON_CACHE,
        edit_manifest(
            lambda m: (m["shards"][1].update(tokens=m["shards"][1]["tokens"] + 3), m.update(tokens=m["tokens"] + 3))
        ),
        r"shard_00001\.npy holds float16 \(\d+, 32\) but the manifest describes",
    ),
    (
        "manifest_dtype",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(dtype="float32")),
        r"holds float16 .* but the manifest describes float32",
    ),
    (
        "manifest_dtype_unknown",
        "train.py",
        ON_CACHE,
        edit_manifest(lambda m: m.update(dtype="int8")),
        r"manifest\.json is damaged: dtype 'int8'",
    ),
    ("manifest_missing_field", "train.py", ON_CACHE, edit_manifest(lambda m: m.pop("shards")), r"damaged: 'shards'"),
    ("manifest_format", "train.py", ON_CACHE, edit_manifest(lambda m: m.update(format="other/9")), r"format 'other/9'"),
    (
        "manifest_not_json",
        "train.py",
        ON_CACHE,
        lambda ws, a: (with_cache(ws, a), (ws / "cache" / "manifest.json").write_text("{")),
        r"manifest\.json is not valid JSON",
    ),
    (
        "shard_truncated",
        "train.py",
        ON_CACHE,
        edit_shard(truncate),
        r"shard_00001\.npy has \d+ bytes, the manifest says",
    ),
    ("shard_missing", "train.py", ON_CACHE, edit_shard(lambda p: p.unlink()), r"shard_00001\.npy is missing"),
    ("shard_corrupt", "train.py", ON_CACHE, edit_shard(flip_byte), r"shard_00001\.npy is corrupt: sha256"),
    (
        "shard_nan_checksummed",
        "train.py",
        ON_CACHE,
        nan_in_a_checksummed_shard,
        r"shard_00000\.npy holds a NaN or inf at row 3",
    ),
    (
        "cache_too_small",
        "train.py",
        [*ON_CACHE, "data.val_tokens=100000"],
        with_cache,
        r"too few for data\.val_tokens=100000",
    ),
    ("cache_d_model", "train.py", [*ON_CACHE, "data.d_model=48"], with_cache, r"data\.d_model=48 .*holds d_model 32"),
    (
        "gradient_ranking_without_gradients",
        "train.py",
        [*ON_CACHE, "variant.gradient_ranking.beta=0.5"],
        with_cache,
        r"variant\.gradient_ranking\.beta=0\.5 .*0 for data 'activations' without gradients.*data\.harvest\.gradients=true",
    ),
    (
        "gradient_ranking_on_synthetic",
        "train.py",
        ["variant.gradient_ranking.beta=1"],
        None,
        r"variant\.gradient_ranking\.beta=1\.0 .*0 for data 'synthetic'",
    ),
    ("gradient_ranking_negative", "train.py", ["variant.gradient_ranking.beta=-1"], None, r"beta=-1 .*>= 0"),
    (
        "harvest_gradients_of_an_encoder",
        "harvest.py",
        ["data=minilm", "data.path={ws}/c", "data.harvest.gradients=true", "data.harvest.corpus.path={corpus}"],
        None,
        r"data\.harvest\.gradients=True .*causal language model",
    ),
    # ---- checkpoints to resume from ----------------------------------------------------------
    ("resume_missing", "train.py", ["resume={ws}/nothing.ckpt"], None, r"resume='.*nothing\.ckpt' .*a checkpoint file"),
    (
        "resume_truncated",
        "train.py",
        ["resume={ws}/run"],
        truncated_checkpoint,
        r"last\.ckpt is not a readable checkpoint",
    ),
    (
        "resume_text_file",
        "train.py",
        ["resume={ws}/notes.ckpt"],
        write("notes.ckpt", "hello"),
        r"not a readable checkpoint",
    ),
    (
        "resume_foreign",
        "train.py",
        ["resume={ws}/other.ckpt"],
        foreign_torch_file,
        r"not a checkpoint of an sae_lightning run",
    ),
    (
        "resume_other_variant",
        "train.py",
        ["resume={ws}/run", "variant=mutual_choice"],
        with_run,
        r"variant\.allocator: run 'topk' vs now 'mutual_choice'",
    ),
    (
        "resume_other_width",
        "train.py",
        ["resume={ws}/run", "model.n_latents=256"],
        with_run,
        r"model\.n_latents: run 128 vs now 256",
    ),
    (
        "resume_no_checkpoints",
        "train.py",
        ["resume={ws}/run"],
        run_without_checkpoints,
        r"holding checkpoints/last\.ckpt",
    ),
    # ---- sweep spaces and settings -----------------------------------------------------------
    ("sweep_interval", "train.py", ["-m", "sweeps=pareto", "variant.k=interval(64,4)"], None, r"low 64\.0 > high 4\.0"),
    (
        "sweep_log_zero",
        "train.py",
        ["-m", "sweeps=pareto", "optim.lr=tag(log,interval(0,1))"],
        None,
        r"log interval with low > 0",
    ),
    ("sweep_range_empty", "train.py", ["-m", "sweeps=pareto", "variant.k=range(8,2)"], None, r"range\(start, stop"),
    (
        "sweep_unknown_key",
        "train.py",
        ["-m", "sweeps=pareto", "variant.kk=choice(1,2)"],
        None,
        r"variant\.kk='choice\(1,2\)' .*did you mean variant\.k=choice\(1,2\)\?",  # in the sweep's syntax
    ),
    ("sweep_sampler", "train.py", ["-m", "sweeps=pareto", "hydra.sweeper.sampler=cmaes"], None, r"sampler='cmaes'"),
    ("sweep_n_trials", "train.py", ["-m", "sweeps=pareto", "hydra.sweeper.n_trials=0"], None, r"n_trials=0 .*>= 1"),
    (
        "sweep_directions",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.directions=[minimize]"],
        None,
        r"hydra\.sweeper\.directions=\['minimize'\]",
    ),
    (
        "sweep_storage",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.storage=nodb://x"],
        None,
        r"hydra\.sweeper\.storage=nodb://x: cannot open the study storage",
    ),
    (
        "sweep_storage_folder",
        "train.py",
        ["-m", "sweeps=pareto", "hydra.sweeper.storage=sqlite:////proc/nope/s.db"],
        None,
        r"storage=sqlite:////proc/nope/s\.db: cannot make the folder /proc/nope",
    ),
    # ---- harvest settings --------------------------------------------------------------------
    (
        "harvest_unwritable",
        "harvest.py",
        [*HARVEST, "data.path=/proc/sae_x"],
        None,
        r"data\.path='/proc/sae_x' .*write",
    ),
    (
        "harvest_layer_builtin_corpus",  # checked before the built-in corpus is written beside the cache
        "harvest.py",
        [*HARVEST, "data.harvest.corpus.path=builtin:python_docstrings", "data.harvest.layer=99"],
        None,
        r"data\.harvest\.layer=99 .*2 blocks",
    ),
    (
        "hub_unreachable",  # one line at once, not the hub client's retries
        "harvest.py",
        [*HARVEST, "data.harvest.lm.name=nosuchorg/nosuchmodel"],
        None,
        r"cannot load model 'nosuchorg/nosuchmodel'.*the hub \(http://127\.0\.0\.1:9\) cannot be reached",
    ),
    (
        "harvest_model_missing",
        "harvest.py",
        [*HARVEST, "data.harvest.lm.name={ws}/no_model"],
        None,
        r"model folder .*no_model does not exist",
    ),
    (
        "harvest_corpus_missing",
        "harvest.py",
        [*HARVEST, "data.harvest.corpus.path={ws}/none.txt"],
        None,
        r"corpus '.*none\.txt': no such file",
    ),
    ("harvest_layer", "harvest.py", [*HARVEST, "data.harvest.layer=99"], None, r"data\.harvest\.layer=99 .*2 blocks"),
    ("harvest_site", "harvest.py", [*HARVEST, "data.harvest.site=mlp_out"], None, r"data\.harvest\.site='mlp_out'"),
    ("harvest_context", "harvest.py", [*HARVEST, "data.harvest.context_length=1"], None, r"context_length=1"),
    ("harvest_not_a_harvest", "harvest.py", ["data=synthetic"], None, r"data='synthetic' .*harvest section"),
]


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
    assert re.search(message, lines[0]), lines[0]
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
