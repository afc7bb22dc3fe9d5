"""Description length (sae_lightning/description_length.py): known entropies, the precision rule, invariance."""

from __future__ import annotations

import math

import pytest
import torch

from sae_lightning.description_length import (
    GRID_RATIO,
    binary_entropy_bits,
    code_bits,
    description_length,
    held_out_codes,
    quantise,
    raw_bits,
)
from sae_lightning.evaluate import heldout_tokens
from sae_lightning.runs import load_run


def test_a_latent_firing_half_the_time_on_one_value_costs_one_bit():
    n = 1000
    latents = torch.zeros(n // 2, dtype=torch.long)
    bits = code_bits(latents, torch.zeros_like(latents), n, n_latents=3)  # latents 1 and 2 never fire: 0 bits
    assert bits == {"firing_bits": pytest.approx(1.0), "value_bits": 0.0, "bits": pytest.approx(1.0)}


@pytest.mark.parametrize("b", [1, 3, 5])
def test_a_uniform_value_of_2_to_the_b_levels_adds_b_times_p_bits(b):
    n, fires = 4096, 1024  # p = 1/4
    latents = torch.zeros(fires, dtype=torch.long)
    bins = torch.arange(fires) % (2**b) + 7  # any offset: only the histogram counts
    bits = code_bits(latents, bins, n, n_latents=1)
    assert bits["firing_bits"] == pytest.approx(float(binary_entropy_bits(torch.tensor(0.25))))
    assert bits["value_bits"] == pytest.approx(b * 0.25)


def test_binary_entropy_and_raw_bits_of_stand_ins():
    assert binary_entropy_bits(torch.tensor([0.0, 1.0, 0.5])).tolist() == [0.0, 0.0, 1.0]
    x = torch.stack([torch.arange(4000) % 4 * 1.0 + 0.5, torch.full((4000,), 3.3)], dim=1)
    assert raw_bits(x, 1.0) == pytest.approx(2.0)  # 4 equally likely levels, and a constant: 0
    assert raw_bits(x, 2.0) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def trained(cache_run):
    module, data = load_run(cache_run)
    return module, heldout_tokens(data, None)


def test_the_chosen_precision_meets_the_tolerance_and_a_coarser_one_does_not(trained):
    module, x = trained
    for mode in ("threshold", "batch"):
        out = description_length(module, x, mode, tolerance=0.01)
        assert out["dl_fvu_quantised"] <= out["dl_fvu"] * 1.01 + 1e-12
        codes = held_out_codes(module, x, mode)
        u = codes.contributions
        coarser = out["dl_precision"] * GRID_RATIO
        if coarser <= float(u.max()) * (1 + 1e-9):  # not already the coarsest on the grid
            _, centres = quantise(u, coarser)
            assert codes.fvu(centres / codes.unit) > out["dl_fvu"] * 1.01
        assert 0 < out["description_length"] < out["dl_naive_bits"]
        assert out["description_length"] == pytest.approx(out["dl_firing_bits"] + out["dl_value_bits"])


def test_description_length_of_a_trained_sae_falls_as_the_precision_coarsens(trained):
    module, x = trained
    codes = held_out_codes(module, x, "threshold")
    delta = description_length(module, x, "threshold")["dl_precision"]
    n = x.shape[0]
    bits = [code_bits(codes.latents, quantise(codes.contributions, delta * 2**m)[0], n, module.sae.n_latents)["bits"]
            for m in range(-4, 5)]  # fmt: skip
    assert all(a >= b for a, b in zip(bits, bits[1:])) and bits[0] > bits[-1]


def test_description_length_does_not_depend_on_how_a_latent_splits_its_scale(trained):
    """v·d_j is what is quantised: scaling a latent's encoder by c and its decoder row by 1/c
    (the same SAE, another convention) gives the same description length."""
    module, x = trained
    before = description_length(module, x, "batch")
    c = torch.linspace(0.5, 3.0, module.sae.n_latents)
    with torch.no_grad():
        module.sae.W_enc.mul_(c.unsqueeze(1))
        module.sae.b_enc.mul_(c)
        module.sae.W_dec.div_(c.unsqueeze(1))
    try:
        after = description_length(module, x, "batch")
    finally:
        with torch.no_grad():
            module.sae.W_enc.div_(c.unsqueeze(1))
            module.sae.b_enc.div_(c)
            module.sae.W_dec.mul_(c.unsqueeze(1))
    assert after["dl_precision"] == pytest.approx(before["dl_precision"], rel=1e-4)
    assert after["description_length"] == pytest.approx(before["description_length"], rel=1e-3)
    assert not math.isnan(after["dl_raw_bits"])


def test_the_certified_steps_give_the_precision_of_decoding_every_step(trained):
    """choose_precision skips the fine steps HeldOutCodes.passes_for_sure certifies: the same Δ
    and FVU as decoding every step, and the certificate never passes a step that fails."""
    import dataclasses

    from sae_lightning.description_length import START_STEP, choose_precision

    module, x = trained
    for mode in ("threshold", "batch"):
        codes = held_out_codes(module, x, mode)
        walked = choose_precision(dataclasses.replace(codes, directions=None), 0.01)  # no certificate
        assert choose_precision(codes, 0.01) == walked
        limit = walked[1] * 1.01 + 1e-12
        certain = codes.passes_for_sure(limit)
        top = float(codes.contributions.abs().max())
        certified = [i for i in range(START_STEP + 1) if certain(top * GRID_RATIO**-i)]
        assert certified, "the certificate takes no step: it saves nothing"
        for i in certified[:: max(1, len(certified) // 6)]:
            _, centres = quantise(codes.contributions, top * GRID_RATIO**-i)
            assert codes.fvu(centres / codes.unit) <= limit
