"""The feature browser: figures that match the SAE's codes, and a page a real browser renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sae_lightning.browser import main as browser_main
from sae_lightning.data.shards import ShardReader, read_manifest
from sae_lightning.runs import load_run

from .helpers.cli import ROOT, hang_guard
from .helpers.requires import require


@pytest.fixture(scope="module")
def run(cache_run):
    return cache_run


@pytest.fixture(scope="module", params=["jumprelu", "matryoshka_topk"])
def new_variant_run(request, cache_run, cli, tmp_path_factory):
    """A short run of each allocator issue 41 added, on cache_run's cache."""
    out = tmp_path_factory.mktemp(request.param)
    r = cli("train.py", f"out_dir={out}", "data=cache", f"data.path={cache_run.parents[2] / 'cache'}",
            "data.batch_size=64", "data.val_tokens=256", "data.calibration_tokens=256", "model.n_latents=64",
            "model.init_sample_tokens=256", f"variant={request.param}", "variant.k=4", "trainer.max_steps=20",
            "progress=none")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (out / "runs").iterdir()
    return run_dir


def page_data(path):
    text = path.read_text()
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1))


def test_the_page_holds_every_latent_with_figures_that_match_the_codes(run):
    check_page(run)


def test_jumprelu_and_matryoshka_runs_get_the_same_page(new_variant_run):
    check_page(new_variant_run)


def check_page(run):
    out = browser_main([str(run), "--examples", "5", "--device", "cpu"])
    data = page_data(out)
    assert data["tokens"] == 512 and len(data["latents"]) == 64
    module, spec = load_run(run)
    manifest = read_manifest(spec.path)
    reader = ShardReader(spec.path, manifest)
    x = reader.range(reader.n_tokens - 512, reader.n_tokens)
    dense = module.encode(x, "threshold").to_dense().numpy()
    for item in data["latents"]:
        col = dense[:, item["id"]]
        assert item["density"] == pytest.approx(float((col > 0).mean()))
        if item["density"] > 0:
            assert item["max"] == pytest.approx(float(col.max()), rel=1e-5)
            assert item["mean"] == pytest.approx(float(col[col > 0].mean()), rel=1e-5)
            assert sum(item["hist"]) == int((col > 0).sum())
            values = [e["value"] for e in item["examples"]]
            assert values == sorted(values, reverse=True) and values[0] == pytest.approx(col.max(), abs=1e-3)
            for e in item["examples"]:  # the top token is tinted with its own activation
                assert e["acts"][e["center"]] == pytest.approx(e["value"], abs=1e-3)
    assert abs(sum(item["density"] for item in data["latents"]) - data["active_per_token"]) < 1e-6
    assert np.isfinite([item["mean"] for item in data["latents"]]).all()


@pytest.mark.slow
def test_a_headless_browser_renders_the_page_and_lists_the_latents(run, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    require(browser is not None, "Debian's chromium", "apt-get install chromium")
    out = browser_main([str(run), "--out", str(tmp_path / "page.html"), "--device", "cpu"])
    fired = sum(item["density"] > 0 for item in page_data(out)["latents"])
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=hang_guard(120),
    )  # fmt: skip
    dom = proc.stdout
    assert proc.returncode == 0 and dom, proc.stderr[-2000:]
    rendered = re.findall(r'<tr class="latent[^"]*" data-id="\d+"', dom)
    assert len(rendered) == fired > 0  # the script ran and listed every latent that fired
    assert re.search(r'<h2 id="title">latent \d+</h2>', dom)  # and showed the first one
    assert dom.count('class="ex"') >= 1 and "top contexts" in dom


def test_a_run_on_synthetic_data_is_refused_in_one_line(tmp_path, cli):
    r = cli("train.py", f"out_dir={tmp_path}", "model.n_latents=64", "data.d_model=16", "data.n_features=32",
            "data.active_max=8", "data.batch_size=64", "data.val_tokens=64", "data.calibration_tokens=64",
            "variant.k=4", "trainer.max_steps=2", "progress=none")  # fmt: skip
    assert r.returncode == 0, r.stderr[-1000:]
    (run,) = (tmp_path / "runs").iterdir()
    p = subprocess.run([sys.executable, "-m", "sae_lightning.browser", str(run)], capture_output=True, text=True,
                       cwd=ROOT, timeout=hang_guard(120))  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "synthetic data" in p.stderr
