"""How each inference rule spreads the latents over the test tokens, for the claims grid's runs:
``python -m benchmarks.rule_spread`` (resumable; records committed; docs/results.md shows them).

A threshold rule scaled to mean L0 = k (rules.py) need not give each token about k latents: an
SAE trained to fire exactly k per token (TopK) read with thresholds gives most tokens few and
some very many, and those few carry most of the error. For each finished grid run (by default
seed 0 at k = 32) and each rule, :func:`sae_lightning.rules.token_spread` on the run's test split:
the FVU at the calibrated factor, the L0 quantiles, the share of tokens given more than 2k
latents, their share of the squared error, and the FVU of the other tokens alone. Each run's
figures are recorded in ``benchmarks/records/rule_spread/<dataset>/<config>/k<k>_s<seed>.json``;
a recorded run is not measured again, so the command runs in parts across sessions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.claims import CONFIGS, DATASETS, finished_run, record_folder
from sae_lightning.atomic import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records" / "rule_spread"


def record_path(records: Path, dataset: str, config: str, k: int, seed: int) -> Path:
    """``<records>/<dataset>/<config>/k<k>_s<seed>.json``, named as the claims grid's records."""
    return record_folder(records, dataset, config, k, seed).with_suffix(".json")


def measure_run(run: Path) -> dict:
    """Every rule's token spread on ``run``'s test split (calibrated on its calibration tokens)."""
    from sae_lightning.rules import RULES, own_rule, reader, token_spread
    from sae_lightning.runs import load_run

    module, data = load_run(run)
    dm = data.build()
    dm.open()
    cal, x = dm.calibration_tokens(), dm.test_tensor()
    metrics = json.loads((run / "metrics.json").read_text())
    return {
        "run": str(run),
        "commit": (metrics.get("code") or {}).get("commit"),
        "own_rule": own_rule(module),
        "k": module.k,
        "test_tokens": int(x.shape[0]),
        "rules": {rule: token_spread(module, reader(module, rule, cal), x) for rule in RULES},
    }


def table(records: Path, dataset: str) -> list[str]:
    """The page's lines for ``dataset``: one row per (recorded run, rule); [] when none."""
    found = sorted((records / dataset).glob("*/k*_s*.json")) if (records / dataset).is_dir() else []
    if not found:
        return []
    order = {c: i for i, c in enumerate(CONFIGS)}
    named = {c.replace("+", "_"): c for c in CONFIGS}
    rows = []
    for path in found:
        rec = json.loads(path.read_text())
        config, cell = named.get(path.parent.name, path.parent.name), path.stem
        rows.append((order.get(config, len(order)), cell, config, rec))
    lines = [
        "How each rule spreads the latents over the test tokens at its calibrated factor "
        f"(`python -m benchmarks.rule_spread`; {', '.join(sorted({r[1] for r in rows}))}; **bold**: the own rule). "
        "A threshold rule holds the *mean* L0 at k, not each token's: read with thresholds, an SAE "
        "trained to give every token k latents gives most tokens a few and some very many, and on "
        "those its latents, never trained to fire together, overshoot.",
        "",
        "| trained as | read by | FVU | L0 median | L0 90 % | L0 99 % | tokens with L0 > 2k | their share of the error | FVU of the other tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, cell, config, rec in sorted(rows, key=lambda r: (r[1], r[0])):
        for rule, s in rec["rules"].items():
            name = f"**{rule}**" if rule == rec["own_rule"] else rule
            q = s["l0_quantiles"]
            lines.append(
                f"| {config} ({cell}) | {name} | {s['fvu']:.4f} | {q['50']:.0f} | {q['90']:.0f} | {q['99']:.0f} | "
                f"{100 * s['tokens_over_wide']:.1f} % | {100 * s['error_share_over_wide']:.0f} % | "
                f"{s['fvu_others']:.4f} |"
            )
    return [*lines, ""]


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "claims", help="the claims grid's runs")
    p.add_argument("--records", type=Path, default=RECORDS, help="where each run's figures are kept (committed)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--k", nargs="+", type=int, default=[32])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    a = p.parse_args(argv)
    written = []
    for dataset in a.datasets:
        for config in a.configs:
            for k in a.k:
                for seed in a.seeds:
                    path = record_path(a.records, dataset, config, k, seed)
                    run = finished_run(a.out, dataset, config, k, seed)
                    if path.is_file() or run is None:
                        continue
                    print(f"{dataset} {config} k={k} seed={seed}: {run}", flush=True)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_json(path, measure_run(run))
                    written.append(path)
    print(f"{len(written)} runs measured; records in {a.records}")
    return written


if __name__ == "__main__":
    main()
