"""Train a sparse autoencoder: `python train.py variant=feature_choice` (see README.md)."""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sae_lightning.cli import run_entry, user_errors
from sae_lightning.train import run


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig):
    hc = HydraConfig.get()
    # a sweep trial runs in the folder Hydra made for it; a single run makes its own, once checked
    if hc.mode == RunMode.MULTIRUN:  # errors go to the sweeper, which records them on the trial
        return run(cfg, Path(hc.runtime.output_dir), overrides=list(hc.overrides.task))
    with user_errors():
        return run(cfg, None, overrides=list(hc.overrides.task))


if __name__ == "__main__":
    if {"--help", "-h"} & set(sys.argv[1:]):  # every key, from the specs (Hydra's own: --hydra-help)
        from sae_lightning.help import text

        print(text(), end="")
        sys.exit(0)
    run_entry(main)
