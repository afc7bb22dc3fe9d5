"""Compare finished runs: ``python -m sae_lightning.compare outputs/runs/*`` prints one
markdown table row per run from its ``metrics.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = [
    ("variant", lambda m: m["variant"]),
    ("k", lambda m: str(m["k"])),
    ("tokens", lambda m: f"{m['tokens'] / 1e6:.2f}M"),
    ("FVU (batch)", lambda m: f"{m['val/batch/fvu']:.4f}"),
    ("FVU (threshold)", lambda m: f"{m['val/threshold/fvu']:.4f}"),
    ("L0 batch", lambda m: f"{m['val/batch/l0_mean']:.2f}"),
    ("L0 threshold", lambda m: f"{m['val/threshold/l0_mean']:.2f}"),
    (
        "L0 per token p10 / p50 / p90 / max",
        lambda m: "{:.0f} / {:.0f} / {:.0f} / {:.0f}".format(
            m["val/batch/l0_p10"], m["val/batch/l0_p50"], m["val/batch/l0_p90"], m["val/batch/l0_max"]
        ),
    ),
    ("L0 std", lambda m: f"{m['val/batch/l0_std']:.1f}"),
    ("dead", lambda m: f"{100 * m['val/dead_fraction']:.1f}%"),
    ("never fired (val)", lambda m: f"{100 * m['val/batch/never_fired_fraction']:.1f}%"),
    ("recovery: mean max cos", lambda m: _opt(m, "val/recovery_mean_max_cos", "{:.3f}")),
    ("recovered > 0.9", lambda m: _opt(m, "val/recovery_share_above_0.9", "{:.1%}")),
    ("ΔCE (batch)", lambda m: _opt(m, "val/batch/delta_ce", "{:.3f}")),
    ("ΔCE (threshold)", lambda m: _opt(m, "val/threshold/delta_ce", "{:.3f}")),
    ("loss recovered (batch)", lambda m: _opt(m, "val/batch/loss_recovered", "{:.1%}")),
    ("loss recovered (threshold)", lambda m: _opt(m, "val/threshold/loss_recovered", "{:.1%}")),
    ("tokens/s", lambda m: f"{m['tokens_per_second']:.0f}"),
]


def _opt(m: dict, key: str, fmt: str) -> str:
    return fmt.format(m[key]) if key in m else "-"


def table(run_dirs: list[Path]) -> str:
    rows = []
    for d in run_dirs:
        f = Path(d) / "metrics.json"
        if f.is_file():
            m = json.loads(f.read_text())
            rows.append([fn(m) for _, fn in COLUMNS])
    head = [name for name, _ in COLUMNS]
    keep = [i for i in range(len(head)) if not rows or any(r[i] != "-" for r in rows)]  # drop all-empty columns
    head, rows = [head[i] for i in keep], [[r[i] for i in keep] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (holding metrics.json)")
    print(table(p.parse_args(argv).runs))


if __name__ == "__main__":
    main()
