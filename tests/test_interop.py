"""Weights in and out (sae_lightning/interop.py): the native safetensors file, SAELens export
and import, checked against our own reconstruction and, where its environment is installed
(``make install-saelens``), against the real sae-lens package."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_lightning.interop import export_saelens, import_saelens
from sae_lightning.interop import main as interop
from sae_lightning.runs import NATIVE, load_run

from .conftest import ROOT, TINY
from .helpers.cli import hang_guard
from .helpers.requires import require

SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"
VARIANTS = {
    "topk": ["variant=topk", "variant.k=8"],
    "topk_free": ["variant=topk", "variant.k=8", "model.decoder_norm=free", "model.decoder_init_norm=0.1"],
    "mutual_choice": ["variant=mutual_choice", "variant.k=8"],
    "feature_choice": ["variant=feature_choice", "variant.k=8"],
    "jumprelu": ["variant=jumprelu", "variant.k=8"],
}


@pytest.fixture(scope="module")
def runs(cli, tmp_path_factory):
    """One tiny trained run per allocator."""
    out = {}
    for name, args in VARIANTS.items():
        folder = tmp_path_factory.mktemp(name)
        r = cli("train.py", f"out_dir={folder}", *TINY, *args, "trainer.max_steps=30", "progress=none")
        assert r.returncode == 0, r.stderr[-2000:]
        (out[name],) = (folder / "runs").iterdir()
    return out


def tokens(run: Path, n: int = 1000) -> torch.Tensor:
    """n fresh tokens of the run's data. Not its calibration tokens: a calibrated θ_j is one of
    their affinities, and a value exactly at a threshold may fall either side after the
    export's rescaling (a difference in the last bit)."""
    _, data = load_run(run)
    source = data.build()
    source.open()
    return source.sample(n)


def ours(run: Path, x: torch.Tensor) -> torch.Tensor:
    module, _ = load_run(run)
    return module.reconstruct(x, "threshold")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_native_file_alone_reproduces_the_reconstruction(runs, variant):
    run = runs[variant]
    w = load_file(str(run / NATIVE))
    x = tokens(run, 500)
    c = float(w["scale"])
    z = (x * c - w["b_pre"]) @ w["W_enc"].t() + w["b_enc"]
    if variant.startswith("topk"):
        top = torch.topk(z, 8, dim=1)
        z = torch.zeros_like(z).scatter_(1, top.indices, top.values.clamp_min(0))
    else:  # the threshold mode: z' > θ_j and z' > 0
        assert "theta" in w and w["theta"].shape == (256,)
        z = torch.where((z > w["theta"]) & (z > 0), z, torch.zeros_like(z))
    x_hat = (z @ w["W_dec"] + w["b_pre"]) / c
    assert torch.allclose(x_hat, ours(run, x), atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_then_import_gives_the_same_sae(runs, variant, tmp_path):
    run = runs[variant]
    exported = export_saelens(run, tmp_path / "export")
    cfg = json.loads((exported / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk" if variant.startswith("topk") else "jumprelu")
    assert cfg["d_in"] == 32 and cfg["d_sae"] == 256 and cfg["normalize_activations"] == "none"
    w = load_file(str(exported / "sae_weights.safetensors"))
    assert w["W_enc"].shape == (32, 256) and w["W_dec"].shape == (256, 32)
    back = import_saelens(exported, TINY, out=tmp_path / "imported")
    assert {p.name for p in back.iterdir()} >= {"config.yaml", "checkpoints", NATIVE, "imported.json"}
    x = tokens(run)
    # the dataset scale is folded into the weights: same SAE, different units inside
    assert (ours(back, x) - ours(run, x)).abs().max() < 1e-4


def test_an_imported_sae_is_evaluated_like_our_own(runs, tmp_path):
    from sae_lightning.evaluate import main as evaluate

    back = import_saelens(export_saelens(runs["mutual_choice"], tmp_path / "e"), TINY, out=tmp_path / "run")
    figures = evaluate([str(back), "--dark-matter", "--device", "cpu"])
    assert 0 < figures["fvu"] < 1 and (back / "dark_matter.json").is_file()


@pytest.mark.parametrize("variant", ["topk_free", "mutual_choice"])
def test_an_imported_sae_gets_the_core_figures_and_description_length_of_the_original(runs, variant, tmp_path):
    """evaluate --core on an SAELens import: the same SAE in other units (the dataset scale
    folded into its weights) has the same figures, its description length included (values are
    quantised as contributions in the model's units)."""
    from sae_lightning.evaluate import main as evaluate

    run = runs[variant]
    back = import_saelens(export_saelens(run, tmp_path / "e"), TINY, out=tmp_path / "run")
    theirs = evaluate([str(back), "--core", "--device", "cpu"])
    mine = evaluate([str(run), "--core", "--device", "cpu"])
    assert (back / "core.json").is_file() and json.loads((back / "core.json").read_text())["tokens"] == mine["tokens"]
    for key in ("fvu", "explained_variance", "cossim", "l2_ratio", "relative_reconstruction_bias", "l0_mean",
                "alive_fraction", "description_length", "dl_precision", "dl_raw_bits"):  # fmt: skip
        assert theirs[f"threshold/{key}"] == pytest.approx(mine[f"threshold/{key}"], rel=2e-3), key


@pytest.mark.parametrize(
    "setup, expected",
    [
        ("no_cfg", "cfg.json does not exist"),
        ("gated", "architecture='gated' is not allowed; expected one of 'topk', 'jumprelu', 'standard'"),
        ("layer_norm", "normalize_activations='layer_norm' is not allowed"),
    ],
)
def test_a_bad_saelens_folder_is_one_error_line_and_leaves_nothing(tmp_path, capsys, setup, expected):
    folder = tmp_path / "sae"
    folder.mkdir()
    d, F = 32, 64
    save_file({"W_enc": torch.zeros(d, F), "W_dec": torch.zeros(F, d), "b_enc": torch.zeros(F), "b_dec": torch.zeros(d)},
              str(folder / "sae_weights.safetensors"))  # fmt: skip
    if setup != "no_cfg":
        cfg = {"architecture": "topk", "d_in": d, "d_sae": F, "k": 4, "normalize_activations": "none"}
        if setup == "gated":
            cfg["architecture"] = "gated"
        else:
            cfg["normalize_activations"] = setup
        (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit) as e:
        interop(["import", str(folder), *TINY, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and expected in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_export_refuses_an_existing_folder_and_a_mismatched_data(runs, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    with pytest.raises(SystemExit) as e:
        interop(["export", str(runs["topk"]), str(tmp_path / "taken")])
    assert e.value.code == 2 and "already exists" in capsys.readouterr().err
    exported = export_saelens(runs["topk"], tmp_path / "e")
    with pytest.raises(SystemExit) as e:  # the SAE has d_in 32; the default synthetic data has another d_model
        interop(["import", str(exported), "data.d_model=48", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "d_model 32" in err and not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sae_lens_loads_the_export_and_reconstructs_the_same(runs, variant, tmp_path):
    require(SAELENS_PY.exists(), "sae-lens in .venv-saelens", "make install-saelens")
    run = runs[variant]
    exported = export_saelens(run, tmp_path / "export")
    x = tokens(run)
    save_file({"x": x.contiguous()}, str(tmp_path / "x.safetensors"))
    r = subprocess.run(
        [str(SAELENS_PY), str(ROOT / "tests" / "saelens_reconstruct.py"), str(exported),
         str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors")],
        capture_output=True, text=True, timeout=hang_guard(300),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out.safetensors"))
    diff = float((theirs["x_hat"] - ours(run, x)).abs().max())
    print(f"{variant}: max |x_hat_ours - x_hat_saelens| on {x.shape[0]} tokens = {diff:.3g}")
    assert diff < 1e-5
    module, _ = load_run(run)
    assert torch.equal(theirs["l0"], module.encode(x, "threshold").l0_per_token().float())


def test_the_export_names_the_hook_and_every_written_file_gets_the_umask_mode(cache_run, tmp_path):
    """SAELens's metadata names the site the cache was harvested at; every file of a run, its
    cache, its export and its feature browser has the mode the umask gives (0644 under 022),
    not the private 0600 that some writers (safetensors) give their own temporaries."""
    import os

    from sae_lightning.atomic import umask_mode
    from sae_lightning.browser import main as browser_main

    exported = export_saelens(cache_run, tmp_path / "export")
    meta = json.loads((exported / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.0.hook_resid_post" and meta["hook_site"] == "resid_post"
    browser_main([str(cache_run), "--examples", "2", "--device", "cpu", "--out", str(tmp_path / "page.html")])
    files = [p for root in (cache_run, cache_run.parents[2] / "cache", exported, tmp_path) for p in root.rglob("*")]
    files = [p for p in files if p.is_file()]
    assert any(p.name == NATIVE for p in files) and any(p.suffix == ".ckpt" for p in files)
    assert any(p.name == "shard_00000.npy" for p in files) and len(files) > 15
    wrong = {str(p): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != umask_mode()}
    assert not wrong, wrong
    old = os.umask(0o027)
    try:
        assert umask_mode() == 0o640
        export_saelens(cache_run, tmp_path / "export_027")
        assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "export_027").iterdir()} == {"0o640"}
    finally:
        os.umask(old)
