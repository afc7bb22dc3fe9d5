"""How documents become a harvest's contexts: the tokenizer's own framing (prefix and suffix
ids, BOS for a causal model, CLS/SEP for BERT), the document separator, the ids dropped, and the
corpus cut into framed pieces of ``context_length``."""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import ConfigError
from .harvest_spec import HarvestSpec


class Framing:
    """How the tokenizer frames a context (prefix/suffix ids), the document separator, and
    which ids are dropped."""

    def __init__(self, tokenizer, is_causal: bool, spec: HarvestSpec):
        tokenizer.model_max_length = 1 << 60  # documents are cut by us, not by the tokenizer (and no warning)
        probe = "hello world"
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = tokenizer(probe, add_special_tokens=True)["input_ids"]
        i = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
        self.prefix, self.suffix = list(full[:i]), list(full[i + len(plain) :])
        bos = tokenizer.bos_token_id
        want_bos = spec.prepend_bos if spec.prepend_bos != "auto" else is_causal
        if want_bos and not self.prefix and bos is not None:
            self.prefix = [bos]
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.separator = [] if sep is None else [sep]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep if sep is not None else 0)
        self.dropped = sorted(set(tokenizer.all_special_ids)) if spec.drop_special else []
        self.body = spec.context_length - len(self.prefix) - len(self.suffix)
        if self.body < 1:
            raise ConfigError(
                "data.harvest.context_length",
                spec.context_length,
                f"an integer > {len(self.prefix) + len(self.suffix)} (the model's framing tokens)",
            )

    def contexts(self, tokenizer, docs: Iterator[str]) -> Iterator[list[int]]:
        """The corpus as framed contexts (each at most context_length ids)."""
        buf: list[int] = []
        batch: list[str] = []

        def flush():
            nonlocal buf
            if not batch:
                return
            for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
                buf.extend(ids)
                buf.extend(self.separator)
            batch.clear()

        for doc in docs:
            batch.append(doc)
            if len(batch) == 64:
                flush()
                while len(buf) >= self.body:
                    yield self.prefix + buf[: self.body] + self.suffix
                    buf = buf[self.body :]
        flush()
        while buf:
            if buf == self.separator:
                break
            yield self.prefix + buf[: self.body] + self.suffix
            buf = buf[self.body :]
