import pytest

from sae_lightning.allocators import ALLOCATORS, register
from sae_lightning.data import DATA_KINDS, data_kind
from sae_lightning.losses import LOSSES
from sae_lightning.registry import Registry


def test_a_name_registered_twice_is_refused():
    reg = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg["a"] is A and A.name == "a"
    reg.register("a")(A)  # the same class again (a module imported twice) is harmless

    class B:
        pass

    with pytest.raises(TypeError, match=r"widget 'a' registered twice: .*A and .*B"):
        reg.register("a")(B)
    assert reg["a"] is A


def test_the_package_registries_refuse_a_second_claim_to_a_name():
    with pytest.raises(TypeError, match="allocator 'topk' registered twice"):
        register("topk")(type("OtherTopK", (), {}))
    with pytest.raises(TypeError, match="data kind 'synthetic' registered twice"):
        data_kind("synthetic")(type("OtherSynthetic", (), {}))
    assert {"topk", "mutual_choice", "feature_choice", "jumprelu"} <= set(ALLOCATORS)
    assert {"synthetic", "activations"} <= set(DATA_KINDS) and {"recon", "aux_k", "aux_zipf"} <= set(LOSSES)
