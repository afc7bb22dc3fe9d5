"""python train.py --help: every key of every spec, with its default, what it allows and a
description taken from the spec's source."""

from __future__ import annotations

from omegaconf import OmegaConf

from sae_lightning.help import field_docs, sections
from sae_lightning.spec import flatten

from .conftest import compose_config


def test_every_field_of_every_spec_has_a_description():
    missing = [r.key for _, rows in sections() for r in rows if not r.doc]
    assert missing == []


def test_descriptions_come_from_the_comment_on_the_line_or_above():
    import dataclasses

    @dataclasses.dataclass
    class Spec:
        a: int = 1  # on the line
        # above,
        # on two lines
        b: int = 2
        c: int = 3

    docs = field_docs(Spec)
    assert docs == {"a": "on the line", "b": "above, on two lines"}


def test_train_py_help_lists_every_key_of_the_composed_configs(cli):
    proc = cli("train.py", "--help", timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""
    listed = {
        line.split(" = ")[0].strip() for line in proc.stdout.splitlines() if line.startswith("  ") and " = " in line
    }
    for preset in (
        ["variant=jumprelu", "data=minilm"],
        ["variant=matryoshka_mutual_choice"],
        ["variant=feature_choice"],
    ):
        keys = flatten(OmegaConf.to_container(compose_config(preset)))
        for key in keys:
            if key.startswith(("trainer.", "hydra.")) or key == "sweep_trial":  # the sweeper's, not a user's
                continue
            general = (
                ".".join(["variant.losses.NAME", *key.split(".")[3:]]) if key.startswith("variant.losses.") else key
            )
            assert key in listed or general in listed, key
    assert "variant.losses.sparsity.mode = target  [one of 'target', 'penalty']" in proc.stdout
