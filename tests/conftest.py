from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Small sizes that train in seconds on a 2-core CPU.
TINY = [
    "model.n_latents=256",
    "model.init_sample_tokens=1024",
    "data.d_model=32",
    "data.n_features=128",
    "data.active_median=4",
    "data.active_max=32",
    "data.batch_size=128",
    "data.val_tokens=512",
    "data.calibration_tokens=2048",
    "optim.warmup_steps=5",
    "stats.dead_window_tokens=2000",
    "stats.density_time_constant_tokens=2000",
]


def compose_config(overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
