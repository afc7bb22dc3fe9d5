"""Peak memory and step time against the dictionary size: ``python -m benchmarks.memory``.

Each (F, variant, ``model.block_latents``) is one fresh process running
``python -m benchmarks.step`` (the real training step under a Lightning Trainer, each variant
with its default losses) for a few steps; its peak resident set size, read from the kernel when
it ends (``wait4``), is the figure: what a training process of that size needs, torch and the
data generator included. Beside it, the parameters with their gradients and Adam's two moments
(32·F·d bytes in fp32), which any trainer holds, and the dense affinity matrix (4·B·F bytes),
which the blockwise path never holds. The dense path is measured only up to
``--dense-max-latents`` (beyond it the matrix and its temporaries outgrow a 24 GiB machine).

Rows are written to the JSON report as they finish; a rerun skips the rows already there (pass
``--fresh`` to measure again). A log-log figure of peak memory against F goes beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sae_lightning.atomic import atomic_path, atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def run_row(F: int, variant: str, block: str, a) -> dict:
    """One fresh process: its step time (median) and peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.step",
            "--latents",
            str(F),
            "--variants",
            variant,
            "--block-latents",
            block,
            "--d",
            str(a.d),
            "--k",
            str(a.k),
            "--batch",
            str(a.batch),
            "--steps",
            str(a.steps),
            "--warmup",
            str(a.warmup),
            "--no-reference",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--same-process",
            "--out",
            str(out),
        ]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        log = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            tail = " | ".join(log.strip().splitlines()[-3:])
            return {"n_latents": F, "variant": variant, "block": block, "failed": f"exit {proc.returncode}: {tail}"}
        row = json.loads(out.read_text())["sizes"][0]["rows"][0]
    return {
        "n_latents": F,
        "variant": variant,
        "block": block,
        "block_latents": row["block_latents"],
        "step_s": row["step_s"],
        "tokens_per_s": a.batch / row["step_s"],
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: kilobytes
        "state_bytes": 32 * F * a.d,
        "dense_affinities_bytes": 4 * a.batch * F,
    }


def print_table(rows: list[dict]) -> None:
    print(
        f"  {'F':>7}  {'variant':<15}{'block':>14}{'step s':>8}{'tokens/s':>10}{'peak RSS GiB':>14}"
        f"{'state GiB':>11}{'dense z GiB':>13}"
    )
    for r in rows:
        if "failed" in r:
            print(f"  {r['n_latents']:>7}  {r['variant']:<15}{r['block']:>14}  FAILED {r['failed']}")
            continue
        block = ("dense" if r["block_latents"] is None else str(r["block_latents"])) + (
            " (auto)" if r["block"] == "default" else ""
        )
        print(
            f"  {r['n_latents']:>7}  {r['variant']:<15}{block:>14}{r['step_s']:>8.2f}{r['tokens_per_s']:>10.0f}"
            f"{r['peak_rss_bytes'] / GIB:>14.2f}{r['state_bytes'] / GIB:>11.2f}{r['dense_affinities_bytes'] / GIB:>13.2f}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "failed" not in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (variant, block), marker in zip(
        sorted({(r["variant"], r["block"]) for r in ok}), ["o", "s", "^", "v", "D", "x", "+", "*"] * 4
    ):
        pts = sorted(
            (r["n_latents"], r["peak_rss_bytes"] / GIB) for r in ok if (r["variant"], r["block"]) == (variant, block)
        )
        ax.plot(*zip(*pts), marker=marker, label=f"{variant}, block {block}")
    Fs = sorted({r["n_latents"] for r in ok})
    if Fs:
        d = {r["n_latents"]: r for r in ok}
        ax.plot(Fs, [d[F]["state_bytes"] / GIB for F in Fs], "k--", label="parameters + grads + Adam (32·F·d B)")
        ax.plot(Fs, [d[F]["dense_affinities_bytes"] / GIB for F in Fs], "k:", label="one dense z′ [B, F] (4·B·F B)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("latents F")
    ax.set_ylabel("GiB")
    ax.set_title("peak resident memory of a training process")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--latents", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072, 262144])
    p.add_argument("--variants", nargs="+", default=["topk", "mutual_choice", "feature_choice"])
    p.add_argument(
        "--block-latents", nargs="+", default=["default", "null"], help="as benchmarks.step's (null: the dense matrix)"
    )
    p.add_argument("--dense-max-latents", type=int, default=131072, help="measure block null only up to this F")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=2, help="measured steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default="outputs/bench/memory.json")
    p.add_argument("--fresh", action="store_true", help="measure every row again")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows: list[dict] = []
    if out.exists() and not a.fresh:
        rows = [r for r in json.loads(out.read_text())["rows"] if "failed" not in r]
    done = {(r["n_latents"], r["variant"], r["block"]) for r in rows}
    todo = [
        (F, v, b)
        for F in a.latents
        for v in a.variants
        for b in a.block_latents
        if (F, v, b) not in done and not (b == "null" and F > a.dense_max_latents)
    ]
    setup = {"d": a.d, "k": a.k, "batch": a.batch, "steps": a.steps}
    for i, (F, v, b) in enumerate(todo):
        print(f"[{i + 1}/{len(todo)}] F={F} {v} block={b}", flush=True)
        rows.append(run_row(F, v, b, a))
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, {**setup, "rows": rows})
    rows.sort(key=lambda r: (r["n_latents"], r["variant"], r["block"]))
    atomic_write_json(out, {**setup, "rows": rows})
    print(f"\nd={a.d} k={a.k} B={a.batch}, {a.steps} measured steps per row")
    print_table(rows)
    plot(rows, out.with_suffix(".png"))
    print(f"written {out} and {out.with_suffix('.png')}")
    return rows


if __name__ == "__main__":
    main()
