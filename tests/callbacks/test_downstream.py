"""ΔCE / loss recovered: the splice changes exactly the kept positions, and the figures follow."""

from __future__ import annotations

import math

import pytest
import torch

from sae_lightning.callbacks.downstream import DownstreamLoss
from sae_lightning.data.harvest import harvest
from sae_lightning.data.harvest_spec import HarvestSpec


class FakeSAE:
    device = torch.device("cpu")

    def __init__(self, fn):
        self.fn = fn

    def reconstruct(self, x, mode):
        return self.fn(x)


@pytest.fixture(scope="module")
def callback(tiny_lm, corpus_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("down") / "cache"
    spec = HarvestSpec.parse(
        {
            "lm": {"name": str(tiny_lm)},
            "corpus": {"path": str(corpus_file)},
            "layer": 0,
            "context_length": 16,
            "token_budget": 300,
            "dtype": "float32",
        }
    )
    manifest = harvest(folder, spec, progress=False, log=lambda *a: None)
    return DownstreamLoss(folder, manifest, contexts=5, batch_size=7)


def test_perfect_reconstruction_recovers_all_of_the_loss(callback):
    f = callback.measure(FakeSAE(lambda x: x))
    assert callback.ids.shape == (5, 16) and bool(callback.keep[:, 0].logical_not().all())  # BOS kept out
    for mode in ("batch", "threshold"):
        assert abs(f[f"val/{mode}/delta_ce"]) < 1e-5 and abs(f[f"val/{mode}/loss_recovered"] - 1) < 1e-4


def test_zero_reconstruction_is_zero_ablation(callback):
    f = callback.measure(FakeSAE(torch.zeros_like))
    assert math.isclose(f["val/batch/ce_spliced"], f["val/ce_zero_ablation"], rel_tol=1e-6)
    assert abs(f["val/batch/loss_recovered"]) < 1e-5
    half = callback.measure(FakeSAE(lambda x: 0.5 * x))["val/batch/ce_spliced"]
    assert half != f["val/ce_clean"]  # the splice reaches the model's output


def test_chunking_the_contexts_does_not_change_the_loss(callback):
    callback.measure(FakeSAE(lambda x: x))  # loads the model

    def ce(replace, chunk=16):
        return callback._losses({"x": replace}, chunk)["x"]["ce"]

    assert math.isclose(ce(None, chunk=2), ce(None, chunk=16), rel_tol=1e-5)
    assert math.isclose(ce(torch.zeros_like, chunk=1), ce(torch.zeros_like), rel_tol=1e-5)


def test_kl_divergence_is_zero_for_a_perfect_splice_and_scores_zero_for_ablation(callback):
    perfect = callback.measure(FakeSAE(lambda x: x))
    assert perfect["val/kl_zero_ablation"] > 0
    for mode in ("batch", "threshold"):
        assert abs(perfect[f"val/{mode}/kl_div"]) < 1e-5 and abs(perfect[f"val/{mode}/kl_div_score"] - 1) < 1e-4
    zero = callback.measure(FakeSAE(torch.zeros_like))
    assert zero["val/batch/kl_div"] == pytest.approx(zero["val/kl_zero_ablation"], rel=1e-5)
    assert abs(zero["val/batch/kl_div_score"]) < 1e-4
    half = callback.measure(FakeSAE(lambda x: 0.5 * x))
    assert 0 < half["val/batch/kl_div"] and half["val/batch/kl_div_score"] < 1


def test_kept_activations_stop_at_the_site_and_equal_a_full_pass(callback):
    callback.measure(FakeSAE(lambda x: x))  # loads the model
    from sae_lightning.data import lm as lm_mod

    full = []
    with torch.inference_mode():
        for ids, keep in zip(callback.ids.split(16), callback.keep.split(16)):
            with lm_mod.hook_site(
                callback.model, callback.site, callback.layer, lambda h, keep=keep: full.append(h[keep])
            ):
                callback.model(input_ids=ids.clamp_min(0), attention_mask=(ids >= 0).long(), use_cache=False)
    assert torch.equal(callback.kept_activations(), torch.cat(full).float())


def test_replacements_spliced_in_one_pass_give_each_one_alone(callback):
    """measure() splices every replacement beside one clean forward per chunk: the same figures
    as a pass per replacement."""
    callback.measure(FakeSAE(lambda x: x))
    replacers = {"half": lambda x: 0.5 * x, "zero": torch.zeros_like, "noisy": lambda x: x + 0.1}
    together = callback._losses(replacers, chunk=2)
    for name, replace in replacers.items():
        assert callback._losses({name: replace}, chunk=2)[name] == together[name]


@pytest.mark.parametrize("site,layer", [("resid_post", 0), ("resid_post", 1), ("resid_pre", 1)])
def test_replaying_the_blocks_before_the_site_changes_no_figure_and_skips_them(callback, site, layer):
    """measure() runs every chunk to the site once and then, for the clean pass and each
    replacement, computes only the blocks after it: the same figures, bitwise, as full passes."""
    import copy

    from sae_lightning.data import lm as lm_mod

    callback.measure(FakeSAE(lambda x: x))  # loads the model
    cb = copy.copy(callback)
    cb.site, cb.layer = site, layer
    kept, recorded = cb.site_pass()
    assert recorded is not None and len(recorded) == len(cb.ids.split(16)) and kept.shape[0] == int(cb.keep.sum())
    replacers = {"clean": None, "half": lambda x: 0.5 * x, "zero": torch.zeros_like, "noisy": lambda x: x + 0.1}
    full = cb._losses(replacers)
    _, layers = lm_mod.blocks(cb.model)
    calls = []
    handle = layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        assert cb._losses(replacers, recorded=recorded) == full
    finally:
        handle.remove()
    assert calls == []  # block 0 was not computed
    assert not any("forward" in vars(block) for block in layers)  # the blocks are themselves again
