"""What a resumed run continues with: the saved config, command-line keys only where given, and
only keys that do not change what is trained."""

from __future__ import annotations

import pytest

from sae_lightning.errors import ConfigError
from sae_lightning.resume import explicit_keys, resumed_config

SAVED = {
    "seed": 0,
    "resume": None,
    "out_dir": "outputs",
    "variant": {"name": "topk", "allocator": "topk", "k": 32, "losses": {"aux_k": {"coef": 0.03}}},
    "model": {"n_latents": 4096},
    "trainer": {"max_steps": 2000, "val_check_interval": 500},
    "data": {"kind": "synthetic", "batch_size": 1024, "num_workers": 0},
}


def composed(**changes):
    """What Hydra composes from the defaults (mutual_choice!) plus the command line."""
    import copy

    c = copy.deepcopy(SAVED)
    c["variant"] = {"name": "mutual_choice", "allocator": "mutual_choice", "k": 32, "losses": {"aux_zipf": {}}}
    c["resume"] = "outputs/runs/x"
    for key, value in changes.items():
        node = c
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return c


def test_keys_not_on_the_command_line_come_from_the_run():
    config, changed = resumed_config(SAVED, composed(), ["resume=outputs/runs/x"])
    assert config["variant"] == SAVED["variant"] and config["resume"] == "outputs/runs/x" and changed == []


def test_the_training_length_and_cadence_may_change():
    config, changed = resumed_config(
        SAVED,
        composed(trainer__max_steps=4000, data__num_workers=2),
        ["resume=outputs/runs/x", "trainer.max_steps=4000", "data.num_workers=2"],
    )
    assert config["trainer"]["max_steps"] == 4000 and config["data"]["num_workers"] == 2
    assert changed == ["data.num_workers: 0 -> 2", "trainer.max_steps: 2000 -> 4000"]


@pytest.mark.parametrize(
    "overrides,changes,message",
    [
        (["variant.k=8"], {"variant__k": 8}, r"variant\.k: run 32 vs now 8"),
        (["variant=mutual_choice"], {}, r"variant\.allocator: run 'topk' vs now 'mutual_choice'"),
        (
            ["~variant.losses.aux_k"],
            {"variant__losses": {}},
            r"variant\.losses\.aux_k\.coef: run 0\.03 vs now '\(absent\)'",
        ),
        (["data.batch_size=64"], {"data__batch_size": 64}, r"data\.batch_size: run 1024 vs now 64"),
    ],
)
def test_anything_else_is_refused_naming_the_key(overrides, changes, message):
    with pytest.raises(ConfigError, match=message):
        resumed_config(SAVED, composed(**changes), ["resume=outputs/runs/x", *overrides])


def test_explicit_keys_from_hydra_overrides():
    assert explicit_keys(
        ["variant=topk", "trainer.max_steps=3", "+a.b=1", "~c.d", "hydra.run.dir=x", "variant.k=choice(1,2)"]
    ) == ["variant", "trainer.max_steps", "a.b", "c.d"]


def test_a_config_saved_by_older_code_is_read_in_todays_keys():
    """trainer.gradient_clip_val (before the module clipped) becomes optim.clip_grad_norm; a run
    from before seeds drew the order keeps the order it had (data.order_seed 0); one from before
    the test split keeps its splits (data.test_tokens 0)."""
    from sae_lightning.resume import upgraded

    old = {"trainer": {"max_steps": 5, "gradient_clip_val": 1.0}, "optim": {"lr": None}, "data": {"kind": "synthetic"}}
    new = upgraded(old)
    assert new["trainer"] == {"max_steps": 5} and new["optim"] == {"lr": None, "clip_grad_norm": 1.0}
    assert new["data"]["order_seed"] == 0 and "order_seed" not in old["data"]  # the saved dict is left as it was
    assert new["data"]["test_tokens"] == 0
    assert upgraded({**old, "trainer": {"gradient_clip_val": 0.0}})["optim"]["clip_grad_norm"] is None
    today = {"trainer": {}, "optim": {"clip_grad_norm": 0.5}, "data": {"order_seed": 3, "test_tokens": 512}}
    assert upgraded(today) == today


def test_a_data_section_given_again_on_resume_is_no_change_of_order_seed():
    """resume=RUN data=cache data.path=...: the section comes back without order_seed (null: the
    training seed), the saved config holds the seed's value; both mean the same order."""
    from sae_lightning.config import normalised

    data = {"kind": "synthetic", "batch_size": 1024}
    saved = {**SAVED, "seed": 2, "data": {**data, "order_seed": 2}}
    composed = {**SAVED, "seed": 2, "data": dict(data), "resume": "x"}
    merged, changed = resumed_config(saved, composed, ["resume=x", "data=synthetic"], normalised)
    assert changed == []
    with pytest.raises(ConfigError, match=r"data.order_seed: run 2 vs now 0"):
        resumed_config(saved, {**composed, "data": {**data, "order_seed": 0}}, ["resume=x", "data.order_seed=0"],
                       normalised)  # fmt: skip
