"""Benchmarks and measurements, run from the repository root: ``python -m benchmarks.<name>``.

- ``step``: the training step of each allocator against a naive dense step (docs/performance.md);
- ``memory``: peak memory and step time of a training process against the dictionary size;
- ``passes``: memory traffic over the [B, F] affinity matrix in one training step;
- ``rescore``: the re-scored bf16 selection against the fp32 one over training;
- ``ddp``: global allocation across 2 gloo ranks against per-rank allocation;
- ``parity``: our TopK against SAELens's on identical batches (docs/parity.md);
- ``data_pipeline``: harvest against the bare forward pass, the loader against training;
- ``claims``: the paper's claims measured on three datasets (docs/results.md);
- ``gradient_ranking``: g-SAE ranking against plain ranking on SmolLM2 (docs/gradient_ranking.md);
- ``long``: TopK, MC and FC trained 10-20M tokens, with learning curves (docs/long_runs.md);
- ``fc_diagnosis``: why Feature Choice loses to TopK on MiniLM (docs/method_choices.md);
- ``eval_cost``: the evaluation after training, and what its two shortcuts save (docs/performance.md).
"""


def train_in_subprocess(args: list[str], folder, threads: int, what: str) -> bool:
    """``python train.py ARGS`` from the repository root on ``threads`` threads, its output kept
    in ``folder/train.log``; prints one line and returns False if it failed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from sae_lightning.atomic import atomic_write_text

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "train.py", *args], cwd=root, env=env, capture_output=True, text=True)
    atomic_write_text(Path(folder) / "train.log", proc.stdout + proc.stderr)
    if proc.returncode != 0:
        print(f"  FAILED {what}: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
    return proc.returncode == 0


def run_state(folder):
    """What a grid cell's ``folder/runs`` holds: (its last finished run, the last run stopped
    midway with a checkpoint to resume), each None where there is none."""
    from pathlib import Path

    runs = sorted((Path(folder) / "runs").glob("*")) if (Path(folder) / "runs").is_dir() else []
    done = [r for r in runs if (r / "metrics.json").is_file()]
    stopped = [r for r in runs if (r / "checkpoints" / "last.ckpt").is_file()]
    return (done[-1] if done else None), (stopped[-1] if stopped else None)
