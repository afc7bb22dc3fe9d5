"""The claims page: its targets are judged on the headline figure, FVU at L0 = k in threshold
mode, with the seeds' spread; a finished run is never trained again."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks import claims
from sae_lightning.paired import ContextSums

# make test-all: the benchmarks at toy size
pytestmark = pytest.mark.slow


def stand_in_sums(fvu: float, noise_seed: int, contexts: int = 64) -> dict:
    """Per-context sums (paired.py) of a reading whose FVU at L0 = k is ``fvu`` up to a 5 %
    context-to-context noise drawn by ``noise_seed``; L0 brackets k = 32."""
    g = torch.Generator().manual_seed(noise_seed)
    total = torch.full((contexts,), 100.0, dtype=torch.float64)
    sse = fvu * total * (1 + 0.05 * torch.randn(contexts, generator=g, dtype=torch.float64))
    l0 = torch.tensor([36.0, 32.0, 28.0], dtype=torch.float64)
    sums = ContextSums([0.9, 1.0, 1.1], sse.unsqueeze(1) * (32.0 / l0), 100 * l0.repeat(contexts, 1),
                       torch.full((contexts,), 100.0, dtype=torch.float64), total)  # fmt: skip
    return sums.as_dict()


def metrics(fvu_at_k: float, dead: float = 0.0, batch: float | None = None, folder=None, noise_seed: int = 0) -> dict:
    """A run's metrics.json; with ``folder``, its rules_test.json too (every rule at ``fvu_at_k``)."""
    m = {
        "val/threshold/fvu_at_k": fvu_at_k,
        "test/fvu_at_k": fvu_at_k,
        "test/own_rule": "topk",
        "test/l0_calibrated": 32.0,
        "test/dl_at_k": 100.0,
        **{f"test/{rule}/fvu_at_k": fvu_at_k for rule in claims.RULES},
        "val/batch/fvu": fvu_at_k if batch is None else batch,
        "val/threshold/l0_mean": 32.0,
        "val/dead_fraction": dead,
        "val/underused_fraction": dead,
        "val/threshold/description_length": 100.0,
        "val/threshold/l0_sweep": [
            {"factor": 1.0, "l0": 31.0, "fvu": fvu_at_k},
            {"factor": 0.9, "l0": 33.0, "fvu": fvu_at_k * 0.95},
        ],
    }
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        rules = {rule: {"figures": {}, "sums": stand_in_sums(fvu_at_k, noise_seed)} for rule in claims.RULES}
        rules["topk"]["figures"]["dl_curve"] = [
            {"fvu": fvu_at_k * 0.9, "dl": 110.0},
            {"fvu": fvu_at_k * 1.1, "dl": 90.0},
        ]
        (folder / "rules_test.json").write_text(json.dumps({"own_rule": "topk", "k": 32, "rules": rules}))
        m["run_dir"] = str(folder)
    return m


def grid(tmp_path, topk, mc_k, mc_z, fc_z, fc_d, dead_k=0.01, dead_z=0.0):
    results = {}
    for seed in range(3):
        for i, (config, fvu, dead, batch) in enumerate((("topk+aux_k", topk, 0.0, None), ("mc+aux_k", mc_k, dead_k, None),
                                                        ("mc+aux_zipf", mc_z, dead_z, None), ("fc_zipf", fc_z, 0.0, 0.1),
                                                        ("fc_demand", fc_d, 0.0, 0.1))):  # fmt: skip
            folder = tmp_path / config / str(seed)
            results[("synthetic", config, 32, seed)] = metrics(fvu, dead, batch, folder, noise_seed=10 * seed + i)
    return results


def verdicts(results) -> dict[str, bool]:
    return {claim: ok for _, claim, ok, _ in claims.check_claims(claims.aggregate(results), results)}


def test_targets_are_judged_by_the_paired_interval_on_the_test_split(tmp_path):
    v = verdicts(grid(tmp_path / "a", topk=0.30, mc_k=0.27, mc_z=0.299, fc_z=0.35, fc_d=0.30, dead_k=0.01))
    assert v["k=32: FVU(MC+aux_k) < FVU(TopK)"] is True  # 10 % better: the interval lies below 0
    assert v["k=32: FVU(MC+aux_zipf) < FVU(TopK)"] is False  # 0.3 % better, within the noise: a tie is no win
    assert v["k=32: FVU(FC demand) < FVU(TopK)"] is False  # equal
    worse = verdicts(grid(tmp_path / "b", topk=0.30, mc_k=0.33, mc_z=0.3, fc_z=0.3, fc_d=0.3001, dead_z=0.02))
    assert worse["k=32: FVU(MC+aux_k) < FVU(TopK)"] is False
    assert worse["k=32: dead(MC+aux_zipf) < dead(MC+aux_k) by more than the seeds' std"] is False


def test_the_page_counts_the_runs_and_plots_each_dataset(tmp_path):
    results = grid(tmp_path, topk=0.30, mc_k=0.27, mc_z=0.299, fc_z=0.35, fc_d=0.30)
    results[("synthetic", "fc_demand", 64, 0)] = None  # not run yet
    args = SimpleNamespace(steps=10, seeds=[0, 1, 2], overrides=[])
    text = claims.report(results, args, tmp_path / "results.md", tmp_path / "img")
    assert "15 of the grid's 16 runs are in" in text
    assert "| topk+aux_k | 32 | 0.3000 ± 0.0000 |" in text
    assert (tmp_path / "img" / "results_synthetic.png").stat().st_size > 10_000
    # the allocator × rule table, the own rule in bold, and the paired differences that separate them
    assert "| trained as | topk | global_threshold | latent_thresholds |" in text
    assert "| mc+aux_k | **0.2700 ± 0.0000** | 0.2700 ± 0.0000 | 0.2700 ± 0.0000 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| mc+aux_k vs topk+aux_k | the training (both"))
    assert row.endswith("| A better |")
    low, high = (float(v) for v in row.split("[")[1].split("]")[0].split(","))
    assert low < -10 < high < 0  # the interval holds the true difference, 0.27 / 0.30 − 1
    assert "fc_demand: largest dead share 0.00 % (Feature Choice's capacity floor" in text  # a fact, not a target
    # DL at TopK's FVU, read on each run's DL-against-FVU curve (log-log between 110 bits at 0.27 and 90 at 0.33)
    assert "| topk+aux_k | 32 | 0.3000 | 99.0 ± 0.0 | 3 |" in text
    assert "| mc+aux_k | 32 | 0.3000 | – | 3 |" in text  # its curve (0.243 to 0.297) does not reach 0.30


def test_a_finished_run_is_read_not_trained_again(tmp_path, monkeypatch):
    run = tmp_path / "synthetic" / "topk+aux_k" / "k32_s0" / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics(0.25)))
    monkeypatch.setattr(claims, "train_in_subprocess", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    m = claims.run_one(tmp_path, "synthetic", "topk+aux_k", 32, 0, [], tmp_path, threads=1)
    assert m["val/threshold/fvu_at_k"] == 0.25


def test_a_finished_run_is_recorded_and_the_record_stands_in_for_it(tmp_path, monkeypatch):
    """The grid runs across sessions: each finished run's metrics.json and rules_test.json are
    copied to the records, and where outputs/ no longer holds the run, its record is read (with
    its per-context sums for the paired statistics), not trained again."""
    import shutil
    from pathlib import Path

    out, records = tmp_path / "out", tmp_path / "records"
    run = out / "synthetic" / "topk+aux_k" / "k32_s0" / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics(0.25)))
    (run / "rules_test.json").write_text(json.dumps({"own_rule": "topk", "k": 32, "rules": {}}))
    monkeypatch.setattr(claims, "train_in_subprocess", lambda *a, **k: (_ for _ in ()).throw(AssertionError("trained")))
    assert (
        claims.run_one(out, "synthetic", "topk+aux_k", 32, 0, [], tmp_path, 1, records)["val/threshold/fvu_at_k"]
        == 0.25
    )
    kept = claims.record_folder(records, "synthetic", "topk+aux_k", 32, 0)
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.json", "rules_test.json"]
    shutil.rmtree(out)
    m = claims.run_one(out, "synthetic", "topk+aux_k", 32, 0, [], tmp_path, 1, records)
    assert m["val/threshold/fvu_at_k"] == 0.25 and Path(m["run_dir"]) == kept
    assert claims.rule_sums(m) == {}  # read from the record's rules_test.json (no rules in this stand-in)
    assert claims.recorded(records, "synthetic", "topk+aux_k", 32, 1) is None


def test_the_report_of_a_fresh_clone_reads_the_records_alone(tmp_path):
    """``--report`` where ``--out`` does not exist (a fresh clone: the records are committed,
    outputs/ is not): the page and results.json are written from the records."""
    records = tmp_path / "records"
    kept = claims.record_folder(records, "synthetic", "topk+aux_k", 32, 0)
    kept.mkdir(parents=True)
    (kept / "metrics.json").write_text(json.dumps(with_code(metrics(0.25), "a" * 40)))
    (kept / "rules_test.json").write_text(json.dumps({"own_rule": "topk", "k": 32, "rules": {}}))
    out, page = tmp_path / "never" / "made", tmp_path / "page.md"
    claims.main(
        ["--report", "--out", str(out), "--records", str(records), "--doc", str(page), "--img-dir", str(tmp_path)]
        + ["--datasets", "synthetic", "--configs", "topk+aux_k", "--k", "32", "--seeds", "0"]
    )
    assert "made by commit aaaaaaaa" in page.read_text()
    assert json.loads((out / "results.json").read_text())["synthetic|topk+aux_k|32|0"]["val/threshold/fvu_at_k"] == 0.25


def test_the_page_has_a_core_table_at_k_32_and_a_description_length_column(tmp_path):
    results = grid(tmp_path, topk=0.30, mc_k=0.29, mc_z=0.299, fc_z=0.35, fc_d=0.30)
    for (_, config, _, seed), m in results.items():
        m.update({key: 0.5 for key in claims.CORE.values()})
        m[claims.DL_KEY] = 100.0 + seed + (10 if config == "fc_zipf" else 0)
    args = SimpleNamespace(steps=10, seeds=[0, 1, 2], overrides=[])
    text = claims.report(results, args, tmp_path / "results.md", tmp_path / "img")
    assert any(line.startswith("| config | k |") and "| DL at L0 = k |" in line for line in text.splitlines())
    assert "Core figures at k = 32" in text
    row = next(line for line in text.splitlines() if line.startswith("| fc_zipf | 0.5000"))
    assert "111.0 ± 1.0" in row and row.endswith("| 3 |")


def test_a_run_without_a_description_length_gets_it_once(cache_run, tmp_path):
    """Runs trained before the final validation measured it: computed from the saved SAE on the
    validation tokens, as that validation does, and kept beside the run."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(cache_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    stripped = {k: v for k, v in metrics.items() if "/dl_" not in k and not k.endswith("description_length")}
    back = claims.with_description_length(run, stripped)
    assert (run / "description_length.json").is_file()
    assert back[claims.DL_KEY] == metrics[claims.DL_KEY]  # the same tokens, the same SAE: the same bits
    assert claims.with_description_length(run, metrics) is metrics


def with_code(m: dict, commit: str | None, dirty: bool = False, sessions: int = 1) -> dict:
    version = {"commit": commit, "dirty": dirty, "torch": "2.13.0", "lightning": "2.6.6", "sae_lightning": "0.1.0"}
    return {**m, "code": version, "code_versions": [version] * sessions}


def test_the_report_refuses_runs_of_different_commits_and_names_its_own(capsys, tmp_path):
    one = {key: with_code(m, "a" * 40) for key, m in grid(tmp_path, 0.3, 0.29, 0.29, 0.3, 0.3).items()}
    assert claims.one_code_version(one, mixed_ok=False) == "commit aaaaaaaa"
    mixed = dict(one)
    key = next(iter(mixed))
    mixed[key] = with_code(mixed[key], "b" * 40)
    with pytest.raises(SystemExit) as e:
        claims.one_code_version(mixed, mixed_ok=False)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error: the runs come from 2 code versions (commit aaaaaaaa: 14 run(s)")
    assert "commit bbbbbbbb: 1 run(s), e.g. synthetic topk+aux_k 32 0" in err and "--mixed-commits" in err
    assert claims.one_code_version(mixed, mixed_ok=True) == "commit aaaaaaaa and commit bbbbbbbb"
    dirty = {**one, key: with_code(one[key], "a" * 40, dirty=True)}  # uncommitted changes are another version
    with pytest.raises(SystemExit):
        claims.one_code_version(dirty, mixed_ok=False)
    unknown = {**one, key: {k: v for k, v in one[key].items() if k not in ("code", "code_versions")}}
    assert "an unknown commit" in claims.one_code_version(unknown, mixed_ok=True)


def test_the_page_sets_every_configuration_against_topk_in_one_table(tmp_path):
    results = grid(tmp_path, topk=0.30, mc_k=0.27, mc_z=0.299, fc_z=0.35, fc_d=0.30)
    text = claims.report(results, SimpleNamespace(steps=10, seeds=[0, 1, 2], overrides=[]),
                         tmp_path / "results.md", tmp_path / "img")  # fmt: skip
    header = next(line for line in text.splitlines() if line.startswith("| data | k | mc+aux_k"))
    assert header.split(" | ")[2:4] == ["mc+aux_k vs topk+aux_k", "mc+aux_zipf vs topk+aux_k"]
    row = next(line for line in text.splitlines() if line.startswith("| synthetic | 32 |")).split(" | ")
    assert row[2].endswith(" better")  # MC+aux_k: 0.27 against 0.30, and the interval holds −10 %
    low, high = (float(v) for v in row[2].split("[")[1].split("]")[0].split(","))
    assert low < -10 < high < 0
    assert row[5].endswith(" tie")  # FC demand: equal
    assert row[4].endswith(" worse")  # FC zipf: 0.35
    assert row[6] == "" and row[-1] == "3 |"  # JumpReLU not in this grid; 3 seeds paired
    assert "long_runs.md" not in text  # linked once the long runs' page exists
    (tmp_path / "long_runs.md").write_text("# Long runs\n")
    text = claims.report(results, SimpleNamespace(steps=10, seeds=[0, 1, 2], overrides=[]),
                         tmp_path / "results.md", tmp_path / "img")  # fmt: skip
    assert "[long_runs.md](long_runs.md)" in text


def test_the_new_variants_are_set_against_mutual_choice_and_feature_choice(tmp_path):
    results = grid(tmp_path, topk=0.30, mc_k=0.27, mc_z=0.30, fc_z=0.35, fc_d=0.33)
    for seed in range(3):  # a JumpReLU 10 % better than MC + aux_zipf
        folder = tmp_path / "jumprelu" / str(seed)
        results[("synthetic", "jumprelu", 32, seed)] = metrics(0.27, folder=folder, noise_seed=99 + seed)
    lines = claims.pairs_table(results, claims.VARIANT_PAIRS)
    assert lines[0].startswith("| data | k | jumprelu vs mc+aux_zipf | jumprelu vs fc_demand | matryoshka_topk vs")
    row = lines[2].split(" | ")
    assert row[:2] == ["| synthetic", "32"]
    assert row[2].endswith(" better") and row[3].endswith(" better")  # 0.27 against 0.30 and 0.33
    low, high = (float(v) for v in row[3].split("[")[1].split("]")[0].split(","))
    assert low < -100 * (1 - 0.27 / 0.33) < high < 0
    assert row[4] == "" and row[5] == ""  # no Matryoshka runs
    assert claims.pairs_table(grid(tmp_path / "b", 0.3, 0.3, 0.3, 0.3, 0.3), claims.VARIANT_PAIRS) == []
