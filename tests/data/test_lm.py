"""Naming a model and a site."""

from __future__ import annotations

import pytest

from sae_lightning.data import lm
from sae_lightning.errors import ConfigError, DataError


def test_resolve_names(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    s = lm.resolve(str(gguf))
    assert (s.folder, s.gguf_file, s.local) == (str(tmp_path), "m.Q4.gguf", True)
    assert lm.resolve(str(tmp_path)).local and lm.resolve(str(tmp_path)).gguf_file is None
    hub = lm.resolve("some-org/some-model")
    assert not hub.local and hub.folder == "some-org/some-model"
    with pytest.raises(DataError, match="does not exist"):
        lm.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(DataError, match="model folder .* does not exist"):
        lm.resolve(str(tmp_path / "missing_folder"))
    with pytest.raises(ConfigError, match="data.harvest.lm.name='builtin:gpt2'.*builtin:minilm"):
        lm.resolve("builtin:gpt2")


def test_layers_count_from_the_end_and_are_range_checked():
    assert lm.check_site("resid_post", -1, 6) == 5 and lm.check_site("resid_pre", 0, 6) == 0
    with pytest.raises(ConfigError, match=r"data.harvest.layer=-7 .*\[0, 5\]"):
        lm.check_site("resid_post", -7, 6)


def test_resid_pre_of_a_block_is_the_previous_blocks_output(tiny_lm):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    got = {}
    with torch.no_grad():
        with lm.hook_site(model, "resid_pre", 1, lambda h: got.setdefault("pre", h.clone())):
            with lm.hook_site(model, "resid_post", 0, lambda h: got.setdefault("post", h.clone())):
                model(ids)
    torch.testing.assert_close(got["pre"], got["post"])
