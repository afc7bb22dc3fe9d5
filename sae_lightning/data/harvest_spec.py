"""What a harvest is asked for: the language model and the harvest's own settings
(``data.harvest``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ..errors import require
from ..spec import parse, setting
from .corpus import CorpusSpec


@dataclass(kw_only=True)
class LMSpec:
    # the language model whose activations are harvested
    name: str = setting(
        "builtin:minilm", allowed="builtin:minilm, builtin:smollm2, a local folder, a .gguf file or a hub name"
    )
    revision: str | None = None  # a hub model's revision (null: its default)
    gguf_file: str | None = None  # the .gguf file inside a hub repository or folder
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # the model's compute dtype
    device: str = setting("auto", allowed="auto, cpu, cuda or cuda:N")  # where the model runs

    def check(self, prefix: str) -> None:
        require(
            self.device in ("auto", "cpu") or self.device.startswith("cuda"),
            f"{prefix}.device",
            self.device,
            "auto, cpu, cuda or cuda:N",
        )


@dataclass(kw_only=True)
class HarvestSpec:
    """How a cache is harvested (``data.harvest``; configs/data/minilm.yaml composes these defaults)."""

    lm: LMSpec = setting(default_factory=LMSpec)
    corpus: CorpusSpec = setting(default_factory=CorpusSpec)
    site: Literal["resid_post", "resid_pre"] = "resid_post"  # the residual stream after or before the block
    layer: int = 3  # the block (0-based)
    context_length: int = setting(128, ge=2)  # tokens per context
    batch_size: int = setting(32, ge=1)  # contexts per forward pass
    token_budget: int = setting(1_000_000, ge=1)  # harvest until this many tokens are stored (or the corpus ends)
    dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # stored activations
    drop_special: bool = True  # drop BOS/EOS/SEP/CLS positions (padding is always dropped)
    prepend_bos: Literal["auto"] | bool = setting("auto", allowed="auto, true or false")  # auto: causal models
    shard_tokens: int = setting(131072, ge=1)  # about this many tokens per shard
    # also store ∇ₓL per kept token: the gradient of the model's next-token cross-entropy (summed
    # over each context) with respect to the site's activations (causal models only; for
    # variant.gradient_ranking). bfloat16 keeps float32's range: gradients are small (float16
    # would flush many to zero)
    gradients: bool = False
    gradient_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # the stored gradients' dtype

    @classmethod
    def parse(cls, cfg: Any, prefix: str = "data.harvest") -> HarvestSpec:
        return parse(cls, cfg, prefix)
