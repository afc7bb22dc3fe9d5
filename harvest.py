"""Harvest activations into a cache: `python harvest.py data=minilm` (see README.md)."""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_lightning.cli import command, run_entry, user_errors
from sae_lightning.config import resolve
from sae_lightning.data import DataSpec
from sae_lightning.data.activations import ActivationsData
from sae_lightning.errors import ConfigError


@hydra.main(config_path="configs", config_name="harvest", version_base="1.3")
def main(cfg: DictConfig):
    from sae_lightning.data.harvest import harvest

    with user_errors():
        data = DataSpec.from_raw(resolve(cfg)["data"], "data")  # checks the whole data section, as train.py does
        if not isinstance(data, ActivationsData) or data.harvest is None:
            raise ConfigError("data", data.kind, "a data config of kind 'activations' with a harvest section")
        manifest = harvest(Path(data.path).expanduser(), data.harvest, progress=cfg.progress)
    print(
        f"cache: {data.path} ({manifest['tokens']} tokens, d_model {manifest['d_model']}, "
        f"{len(manifest['shards'])} shards); train on it with: {train_command()}"
    )


def train_command() -> str:
    """The train.py command that reads this cache: the same data config and data overrides."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    data_overrides = [o for o in hc.overrides.task if o.startswith(("data.", "+data.", "out_dir="))]
    return command("train.py", f"data={hc.runtime.choices.get('data')}", *data_overrides)


if __name__ == "__main__":
    run_entry(main)
