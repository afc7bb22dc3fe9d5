"""Config errors: one clear line naming the key, the value and what is allowed; nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sae_lightning.config import load_config
from sae_lightning.errors import ConfigError

from .conftest import ROOT, compose_config
from .helpers.cli import hang_guard

BAD = [
    (["variant.k=0"], r"variant.k=0 .*integer > 0"),
    (["variant.k=-3"], r"variant.k=-3 "),
    (["model.n_latents=64", "variant.k=65"], r"variant.k=65 .*at most model.n_latents = 64"),
    (["model.normalisation=batchnorm"], r"model.normalisation='batchnorm'.*'none', 'dataset_scale', 'layernorm'"),
    (["model.b_pre_init=median"], r"model.b_pre_init='median'.*'geometric_median'"),
    (
        ["variant.allocator=switch"],
        r"variant.allocator='switch'.*'feature_choice', 'jumprelu', 'mutual_choice', 'topk'",
    ),
    (["+variant.losses.aux_q.coef=1"], r"variant.losses.aux_q"),
    (["variant=feature_choice", "variant.capacity=pareto"], r"variant.capacity='pareto'.*'uniform', 'zipf'"),
    (["variant=feature_choice", "variant.rank=random"], r"variant.rank='random'.*'static', 'by_density'"),
    (["variant=feature_choice", "variant.zipf_beta=-2"], r"variant.zipf_beta=-2"),
    (["variant=feature_choice", "+variant.capacty=zipf"], r"variant.capacty.*a key of allocator 'feature_choice'"),
    (["optim.lr=-1"], r"optim.lr=-1"),
    (["data.batch_size=0"], r"data.batch_size=0"),
    (["data.kind=parquet"], r"data.kind='parquet'.*'synthetic'"),
    (["stats.dead_window_tokens=0"], r"stats.dead_window_tokens=0"),
    (["trainer.max_steps=0"], r"trainer.max_steps=0"),
    (["variant.threshold_ema_beta=1.5"], r"variant.threshold_ema_beta=1.5.*\[0, 1\)"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_values_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(compose_config(overrides))


def test_default_config_is_valid():
    config = load_config(compose_config())
    assert config.variant.name == "mutual_choice" and config.data.build().d_model == config.data.d_model == 128


def test_train_py_reports_a_config_error_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "train.py", f"out_dir={out}", "model.n_latents=16", "variant.k=32"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=hang_guard(120),
    )
    assert proc.returncode == 2
    assert "error: config error: variant.k=32 is not allowed; expected at most model.n_latents = 16" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(p.is_file() for p in out.rglob("*")), list(out.rglob("*"))


def test_unknown_variant_is_refused_by_hydra_with_the_options(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", f"out_dir={tmp_path}", "variant=switch"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=hang_guard(120),
    )
    assert proc.returncode != 0
    assert "Could not find 'variant/switch'" in proc.stderr and "mutual_choice" in proc.stderr
    assert not any(tmp_path.iterdir())


# deliberate differences between a config file and the spec defaults (what makes it that config)
OWN = {
    "minilm": {"data.path"},
    "smollm2": {"data.path", "data.harvest.lm.name", "data.harvest.layer"},
    "cache": {"data.path"},
    "synthetic": set(),
}


@pytest.mark.parametrize("data", sorted(OWN))
@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_the_composed_config_holds_the_spec_defaults(data, variant):
    """Defaults live in the specs and Hydra composes them from there (register_defaults); the
    YAML holds choices. A choice that overrides a default is listed in OWN: anything else that
    differs from the spec is a default written twice."""
    import dataclasses

    from sae_lightning.allocators import get_allocator_class
    from sae_lightning.config import TrainConfig, normalised, resolve
    from sae_lightning.data import DATA_KINDS
    from sae_lightning.losses import LOSSES
    from sae_lightning.spec import as_dict, flatten

    raw = resolve(
        compose_config([f"data={data}", f"variant={variant}"] + (["data.path=/x"] if data == "cache" else []))
    )
    got = flatten(normalised(raw))
    kind = DATA_KINDS[raw["data"]["kind"]]
    want = {
        **flatten(
            {
                f.name: as_dict(f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(TrainConfig)
                if f.name not in ("variant", "data", "trainer")
                and (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
            }
        ),
        **flatten({"data": as_dict(kind(kind=kind.KIND, **({"path": "/x"} if kind.KIND == "activations" else {})))}),
        **flatten({"variant": as_dict(get_allocator_class(variant).Config())}),
        **flatten({"variant": {"losses": {n: as_dict(LOSSES[n]()) for n in raw["variant"].get("losses") or {}}}}),
    }
    if data != "synthetic":  # the harvest section: compared with HarvestSpec's defaults where there is one
        from sae_lightning.data.harvest_spec import HarvestSpec

        if raw["data"].get("harvest") is not None:
            want.update(flatten({"data": {"harvest": as_dict(HarvestSpec())}}))
    want["data.order_seed"] = raw["seed"]  # null in the spec: the training seed, as normalised() reads it
    want["data.test_tokens"] = got["data.val_tokens"]  # null in the spec: as many as validation
    differ = {k: (got.get(k), v) for k, v in want.items() if k in got and got[k] != v and k not in OWN[data]}
    assert not differ, differ


def test_the_training_seed_draws_the_data_order_unless_the_order_seed_is_set():
    from sae_lightning.config import load_config

    from .conftest import compose_config

    assert load_config(compose_config(["seed=3"])).data.order_seed == 3
    assert load_config(compose_config(["seed=3", "data.order_seed=0"])).data.order_seed == 0
    assert load_config(compose_config([])).as_dict()["data"]["order_seed"] == 0  # written into config.yaml
    one, two = (load_config(compose_config([f"seed={s}"])).data.build() for s in (1, 2))
    assert not torch.equal(one.batch_of()(0), two.batch_of()(0))
    assert torch.equal(one.val_tensor(), two.val_tensor()) and torch.equal(one.sample(64), two.sample(64))


def test_the_module_spec_is_the_same_from_a_typed_config_and_from_a_checkpoints_dict():
    from sae_lightning.config import SECTIONS, ModuleSpec

    config = load_config(
        compose_config(["variant=feature_choice", "variant.k=8", "optim.lr=0.001", "data.batch_size=256"])
    )
    typed, plain = ModuleSpec.of(config), ModuleSpec.of(config.as_dict())
    for key in ModuleSpec.READS:
        assert getattr(typed, key) == getattr(plain, key), key
    assert (plain.batch_size, plain.optim.lr, plain.variant.params.k) == (256, 0.001, 8)
    assert plain.variant.as_dict() == typed.variant.as_dict() and plain.stats == typed.stats
    assert set(ModuleSpec.READS) <= set(SECTIONS)  # the module reads sections of the one table
