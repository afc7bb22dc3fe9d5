"""The benchmark runs at a tiny size and reports every figure (no timing assertions)."""

import json

import pytest
import torch

from benchmarks import step as bench

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


def test_bench_reports_all_variants_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    report = bench.main(
        [
            "--d",
            "16",
            "--latents",
            "128",
            "--k",
            "4",
            "--batch",
            "64",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--same-process",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["sizes"][0]["n_latents"] == 128
    rows = {(r["variant"], r.get("dtype")): r for r in report["sizes"][0]["rows"]}
    variants = ("topk", "mutual_choice", "feature_choice", "jumprelu", "matryoshka_mutual_choice")
    assert set(rows) == {("naive_dense_topk", None)} | {(v, d) for v in variants for d in ("float32", "bfloat16")}
    for (name, dtype), r in rows.items():
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["peak_share"] > 0
        assert r["speedup_vs_naive"] > 0 and r["time_vs_topk"] > 0
        if name != "naive_dense_topk":
            assert 0 < r["alloc_s"] < r["step_s"]
            assert r["speedup_vs_fp32"] > 0 and (dtype == "bfloat16" or r["speedup_vs_fp32"] == 1.0)
    assert rows[("topk", "float32")]["time_vs_topk"] == 1.0 and rows[("topk", "bfloat16")]["time_vs_topk"] == 1.0
    size = saved["sizes"][0]
    assert size["matmul_peak_flops_bf16"] > 0
    # issue 42's measure: the step over its own dtype's encoder product, timed back to back
    for dtype, peak in (("float32", size["matmul_peak_flops"]), ("bfloat16", size["matmul_peak_flops_bf16"])):
        r = rows[("topk", dtype)]
        assert r["time_vs_product"] == pytest.approx(r["step_s"] * peak / (2 * 64 * 16 * 128))


def test_bench_interleaves_fresh_processes(tmp_path, monkeypatch):
    """The default: each variant in a spawned process of its own, one step of each in turn (the
    parent's own timing function is never called); a process that fails names its variant."""

    def not_here(**kwargs):
        raise AssertionError("timed in the parent process")

    monkeypatch.setattr(bench, "time_variant", not_here)
    args = ["--d", "16", "--latents", "128", "--k", "4", "--batch", "64", "--steps", "2", "--warmup", "1"]
    args += ["--dtype", "float32", "--no-reference", "--out", str(tmp_path / "b.json")]
    report = bench.main([*args, "--variants", "topk", "feature_choice"])
    rows = report["sizes"][0]["rows"]
    assert [r["variant"] for r in rows] == ["topk", "feature_choice"]
    assert all(r["step_s"] > 0 and 0 < r["alloc_s"] < r["step_s"] for r in rows)
    # "peak %" against the fp32 product timed between the rounds of steps
    here = report["sizes"][0]["matmul_peak_flops_interleaved"]
    size = report["sizes"][0]
    assert here > 0 and rows[0]["peak_share"] == size["step_flops"] / rows[0]["step_s"] / here
    assert rows[0]["peak_share_warm"] == size["step_flops"] / rows[0]["step_s"] / size["matmul_peak_flops"]
    with pytest.raises(RuntimeError, match="timing topk: .*variant.k"):
        bench.main([*args, "variant.k=-1", "--variants", "topk"])


def test_fresh_batches_are_new_every_step_and_the_same_for_every_row():
    """--fresh: each step a batch never seen before in that run (many warm-up steps then settle
    the densities on a stream, not on 4 batches), and every timed row the same sequence."""
    module, dm = bench.build_module("topk", 16, 64, 4, 32, "float32", [])
    first = list(bench.FreshBatches(dm.source, 32, 5))
    again = list(bench.FreshBatches(dm.source, 32, 5))
    assert len(first) == 5 and all(b.shape == (32, 16) for b in first)
    assert all(not torch.equal(first[i], first[j]) for i in range(5) for j in range(i))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_bench_fresh_runs_and_says_so(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--d", "16", "--latents", "128", "--k", "4", "--batch", "64", "--steps", "2", "--warmup", "3"]
    report = bench.main(argv + ["--fresh", "--same-process", "--variants", "topk", "--dtype", "float32",
                                "--no-reference", "--out", str(out)])  # fmt: skip
    assert report["fresh"] is True and report["warmup"] == 3
    assert json.loads(out.read_text())["sizes"][0]["rows"][0]["step_s"] > 0


def test_interleaved_steps_never_run_beside_another_process_fetching_its_batch(tmp_path):
    """Each process draws its next fresh batch after its timed step; the next process's step waits
    until that is done (it used to start at once: a step of TopK bf16 measured 2× its time beside
    the batch generation of the process before it)."""
    argv = ["--d", "16", "--latents", "128", "--k", "4", "--batch", "64", "--steps", "3", "--warmup", "2"]
    report = bench.main(argv + ["--fresh", "--variants", "topk", "topk", "mutual_choice", "--dtype", "float32",
                                "--profile", "--no-reference", "--out", str(tmp_path / "b.json")])  # fmt: skip
    rows = report["sizes"][0]["rows"]
    assert len(rows) == 3 and all(r["overlap_s"] == 0.0 and "profile" in r for r in rows)
    assert bench._overlap((0.0, 2.0), (1.0, 5.0)) == 1.0 and bench._overlap((0.0, 1.0), (1.0, 2.0)) == 0.0
