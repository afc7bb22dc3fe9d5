"""The streaming DataModule over an activation cache: split, order, workers, position, errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sae_lightning.atomic import atomic_write_json
from sae_lightning.data import build_datamodule, shards
from sae_lightning.data.harvest import harvest
from sae_lightning.errors import ConfigError, DataError

from ..helpers.harvest import spec_for


@pytest.fixture(scope="module")
def cache(tiny_lm, corpus_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("acts") / "cache"
    harvest(
        folder, spec_for(tiny_lm, corpus_file, token_budget=1500, shard_tokens=256), progress=False, log=lambda *a: None
    )
    return folder


def make(cache, **kw):
    cfg = {
        "kind": "activations",
        "path": str(cache),
        "batch_size": 64,
        "val_tokens": 100,
        "calibration_tokens": 90,
        "num_workers": 0,
        "shuffle_buffer_tokens": 256,
        "seed": 0,
    }
    cfg.update(kw)
    dm = build_datamodule(cfg)
    dm.open()  # opens (and verifies) the cache
    return dm


def rows_key(x: torch.Tensor) -> list[tuple]:
    return sorted(map(tuple, x.numpy().round(5).tolist()))


def first_batches(dm, n, trainer=None):
    dm.trainer = trainer
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_split_is_disjoint_and_covers_the_cache(cache):
    dm = make(cache)  # data.test_tokens null: as many as validation
    n = dm.reader.n_tokens
    assert (
        dm.ranges["test"] == (n - 100, n) and dm.val_range == (n - 200, n - 100) and dm.cal_range == (n - 290, n - 200)
    )
    assert dm.train_tokens == dm.n_batches * 64 <= n - 290 < dm.train_tokens + 64
    # each held-out split is its own range, read in a fixed permutation
    assert sorted(dm.heldout_index("test")) == list(range(n - 100, n))
    assert sorted(dm.heldout_index("validation")) == list(range(n - 200, n - 100))
    assert sorted(dm.heldout_index("calibration")) == list(range(n - 290, n - 200))
    torch.testing.assert_close(dm.val_tensor(), dm.reader.gather(dm.heldout_index("validation")))
    assert rows_key(dm.val_tensor()) == rows_key(dm.reader.range(n - 200, n - 100))
    assert rows_key(dm.test_tensor()) == rows_key(dm.reader.range(n - 100, n))
    assert rows_key(dm.calibration_tokens()) == rows_key(dm.reader.range(n - 290, n - 200))
    assert dm.calibration_tokens().shape == (90, 32) and dm.sample(50).shape == (50, 32)
    again = make(cache)
    torch.testing.assert_close(again.val_tensor(), dm.val_tensor())  # fixed by data.seed
    assert not np.array_equal(make(cache, seed=1).heldout_index("validation"), dm.heldout_index("validation"))
    # training, calibration, validation and test tokens are disjoint: an epoch's training batches
    trained = np.concatenate([dm.order.batch(j) for j in range(dm.n_batches)])
    held = {name: set(dm.heldout_index(name).tolist()) for name in ("calibration", "validation", "test")}
    assert len(set(trained.tolist())) == len(trained) == dm.train_tokens
    for name, index in held.items():
        assert not index & set(trained.tolist()), name
    assert not (held["calibration"] & held["validation"]) and not (held["validation"] & held["test"])
    assert not (held["calibration"] & held["test"])
    # test_tokens = 0 (a run from before the split): validation and calibration where they were
    old = make(cache, test_tokens=0)
    assert old.val_range == (n - 100, n) and old.cal_range == (n - 190, n - 100) and old.test_tensor().shape[0] == 0


def test_each_heldout_token_knows_its_context(cache):
    """contexts(split): the context each token of the split came from, in the split's order."""
    dm = make(cache)
    context = context_of_token(cache)
    for split in ("calibration", "validation", "test"):
        assert np.array_equal(dm.contexts(split).numpy(), context[dm.heldout_index(split)])


def test_downstream_contexts_lie_wholly_inside_their_split(cache):
    """ΔCE during training splices validation contexts, the final figures test ones: each row
    given holds kept tokens of that split only, and the eval ids are those rows."""
    from sae_lightning.callbacks.downstream import eval_contexts

    dm = make(cache)
    context = context_of_token(cache)
    manifest = shards.read_manifest(cache)
    seen = set()
    for split in ("validation", "test"):
        rows = dm.split_rows(split)
        start, stop = dm.ranges[split]
        assert len(rows) >= 2 and not seen & set(rows.tolist())
        seen |= set(rows.tolist())
        for r in rows:  # every kept token of the context lies in the split
            where = np.nonzero(context == r)[0]
            assert where.min() >= start and where.max() < stop
        ids = eval_contexts(cache, manifest, 2, rows)
        every = np.concatenate([np.load(cache / e["ids"]["file"]) for e in manifest["shards"]])
        assert np.array_equal(ids.numpy(), every[rows[-2:]])


def context_of_token(cache) -> np.ndarray:
    """For each token of the cache, the index of the context it came from (from the ids files)."""
    manifest = shards.read_manifest(cache)
    dropped = set(manifest["harvest"]["dropped_token_ids"])
    kept = [
        sum(1 for t in row.tolist() if t >= 0 and t not in dropped)
        for entry in manifest["shards"]
        for row in np.load(cache / entry["ids"]["file"])
    ]
    return np.repeat(np.arange(len(kept)), kept)


def test_validation_batches_span_many_contexts(cache):
    """A validation batch mixes the contexts of its split as a training batch does, not the
    few neighbouring contexts that reading the split in order would give."""
    dm = make(cache, val_tokens=400, batch_size=64)
    context = context_of_token(cache)
    assert len(context) == dm.reader.n_tokens
    split = context[dm.val_range[0] : dm.val_range[1]]
    n_split = len(np.unique(split))
    first = context[dm.heldout_index("validation")[:64]]
    in_order = len(np.unique(split[:64]))
    assert n_split >= 20 and in_order <= 6
    assert len(np.unique(first)) >= 0.8 * n_split
    val_batch = next(iter(dm.val_dataloader()))
    torch.testing.assert_close(val_batch, dm.reader.gather(dm.heldout_index("validation")[:64]))


def test_every_training_token_exactly_once_per_epoch(cache):
    dm = make(cache)
    nb = dm.n_batches
    assert nb >= 8 and dm.order.m == 4  # several windows per epoch
    for epoch in range(2):
        idx = np.concatenate([dm.order.batch(epoch * nb + j) for j in range(nb)])
        assert np.array_equal(np.sort(idx), np.arange(dm.train_tokens))
    batches = first_batches(dm, nb)
    assert rows_key(torch.cat(batches)) == rows_key(dm.reader.range(0, dm.train_tokens))
    e0 = np.concatenate([dm.order.batch(j) for j in range(nb)])
    e1 = np.concatenate([dm.order.batch(nb + j) for j in range(nb)])
    assert not np.array_equal(e0, e1)  # each epoch its own order
    # a batch mixes tokens of several blocks (the shuffle buffer works)
    assert len(np.unique(dm.order.batch(0) // 64)) > 1


def test_order_is_fixed_by_the_seed_and_workers_do_not_change_it(cache):
    a = first_batches(make(cache), 6)
    b = first_batches(make(cache, num_workers=2), 6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
    c = first_batches(make(cache, seed=1), 6)
    assert not torch.equal(a[0], c[0])


def test_ranks_split_the_stream(cache):
    dm = make(cache)
    whole = first_batches(make(cache), 6)
    r0 = first_batches(dm, 3, SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0, world_size=2))
    r1 = first_batches(
        make(cache), 3, SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=1, world_size=2)
    )
    for j in range(3):
        torch.testing.assert_close(r0[j], whole[2 * j])
        torch.testing.assert_close(r1[j], whole[2 * j + 1])


def test_position_is_saved_and_restored(cache):
    whole = first_batches(make(cache), 9)
    dm = make(cache)
    dm.trainer = SimpleNamespace(global_step=5, accumulate_grad_batches=1, global_rank=0, world_size=1)
    state = dm.state_dict()
    assert state["position"] == 5 and state["fingerprint"] == shards.fingerprint(dm.manifest)
    fresh = make(cache)
    fresh.load_state_dict(state)
    resumed = first_batches(
        fresh, 4, SimpleNamespace(global_step=5, accumulate_grad_batches=1, global_rank=0, world_size=1)
    )
    for j in range(4):
        torch.testing.assert_close(resumed[j], whole[5 + j])
    with pytest.raises(DataError, match="trained on the activation cache .* holds other activations"):
        make(cache).load_state_dict({**state, "fingerprint": "0" * 16})
    with pytest.raises(ConfigError, match="data.seed / data.order_seed / data.batch_size"):
        make(cache, seed=3).load_state_dict(state)


def test_d_model_must_match_the_cache(cache):
    with pytest.raises(
        ConfigError, match=r"data.d_model=64 is not allowed; expected null or 32: the cache .* holds d_model 32"
    ):
        make(cache, d_model=64)
    assert make(cache, d_model=32).d_model == 32


def test_missing_cache_without_harvest_section(tmp_path):
    with pytest.raises(DataError, match="no activation cache at .* harvest it first"):
        make(tmp_path / "nothing")


def test_too_small_cache_names_the_sizes(cache):
    with pytest.raises(DataError, match=r"too few for data.test_tokens=100000 \+ data.val_tokens=100000"):
        make(cache, val_tokens=100000)


def test_nan_in_a_shard_is_reported_when_read(cache, tmp_path):
    import shutil

    copy = tmp_path / "nan_cache"
    shutil.copytree(cache, copy)
    arr = np.load(copy / "shard_00000.npy")
    arr[3, 5] = np.nan
    np.save(copy / "shard_00000.npy", arr)  # same size: only the checksum sees it
    with pytest.raises(DataError, match="shard_00000.npy is corrupt: sha256"):
        make(copy)
    dm = make(copy, verify="size")
    with pytest.raises(DataError, match="shard_00000.npy holds a NaN or inf at row 3"):
        dm.reader.range(0, 10)


def test_a_cache_of_other_settings_is_refused(cache, tiny_lm, corpus_file):
    from dataclasses import asdict

    spec = spec_for(tiny_lm, corpus_file, token_budget=1500, shard_tokens=256)
    assert make(cache, harvest=asdict(spec)).d_model == 32  # the settings it was made with
    with pytest.raises(DataError, match=r"other settings \(data.harvest.layer: cache 0 vs now 1\)"):
        make(cache, harvest={**asdict(spec), "layer": 1})


def test_data_cache_config_needs_a_path():
    from sae_lightning.config import load_config

    from ..conftest import compose_config

    with pytest.raises(ConfigError, match=r"data.path='\?\?\?' is not allowed; expected a value"):
        load_config(compose_config(["data=cache"]))


def test_an_incomplete_cache_without_harvest_section_says_so(cache, tmp_path):
    import shutil

    copy = tmp_path / "partial"
    shutil.copytree(cache, copy)
    m = shards.read_manifest(copy)
    atomic_write_json(copy / "manifest.json", {**m, "complete": False})
    with pytest.raises(DataError, match="is incomplete .* re-run the harvest command"):
        make(copy)


def test_resume_from_a_checkpoint_of_another_cache_is_refused_before_training(cache, tmp_path):
    from sae_lightning.resume import read
    from sae_lightning.train import _check_checkpoint

    dm = make(cache)
    good = {"position": 4, "fingerprint": dm.fingerprint, "seed": 0, "batch_size": 64, "path": str(cache)}
    ckpt = tmp_path / "x.ckpt"
    hp = {"config": {"data": {}}, "d_model": 32}
    torch.save(
        {"state_dict": {"sae.W_enc": torch.zeros(8, 32)}, "hyper_parameters": hp, "ActivationsDataModule": good}, ckpt
    )
    _check_checkpoint(read(str(ckpt)), dm)
    assert dm._restored["position"] == 4
    torch.save(
        {
            "state_dict": {"sae.W_enc": torch.zeros(8, 32)},
            "hyper_parameters": hp,
            "ActivationsDataModule": {**good, "fingerprint": "f" * 16, "path": "/elsewhere"},
        },
        ckpt,
    )
    with pytest.raises(DataError, match="trained on the activation cache /elsewhere"):
        _check_checkpoint(read(str(ckpt)), make(cache))


def test_the_order_seed_draws_the_training_order_and_nothing_held_out(cache):
    """Two order seeds: different first batches, the same tokens over an epoch, the same held-out
    splits; the same seed: the same batches, also after a resume from a saved position."""
    zero, one, again = (first_batches(make(cache, order_seed=s), 4) for s in (0, 1, 1))
    assert not torch.equal(zero[0], one[0])
    assert all(torch.equal(a, b) for a, b in zip(one, again))
    a, b = make(cache, order_seed=0), make(cache, order_seed=1)
    epoch = lambda dm: torch.cat([dm.reader.gather(np.sort(dm.order.batch(j))) for j in range(dm.n_batches)])  # noqa: E731
    assert torch.equal(epoch(a).sort(0).values, epoch(b).sort(0).values)  # a permutation of the same tokens
    torch.testing.assert_close(a.val_tensor(), b.val_tensor(), rtol=0, atol=0)
    torch.testing.assert_close(a.calibration_tokens(), b.calibration_tokens(), rtol=0, atol=0)
    # a resume restores the seed's own stream, and refuses another order seed
    dm = make(cache, order_seed=1)
    dm.trainer = SimpleNamespace(global_step=2, accumulate_grad_batches=1, global_rank=0, world_size=1)
    state = dm.state_dict()
    fresh = make(cache, order_seed=1)
    fresh.load_state_dict(state)
    resumed = first_batches(fresh, 2, SimpleNamespace(global_step=2, accumulate_grad_batches=1, global_rank=0,
                                                      world_size=1))  # fmt: skip
    assert torch.equal(resumed[0], one[2]) and torch.equal(resumed[1], one[3])
    with pytest.raises(
        ConfigError, match=r"data.order_seed .*\(0, 0, 64\) is not allowed; expected the checkpoint's \(0, 1, 64\)"
    ):
        make(cache, order_seed=0).load_state_dict(state)
