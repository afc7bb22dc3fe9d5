from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]

# Small sizes that train in seconds on a 2-core CPU.
TINY = [
    "model.n_latents=256",
    "model.init_sample_tokens=1024",
    "data.d_model=32",
    "data.n_features=128",
    "data.active_median=4",
    "data.active_max=32",
    "data.batch_size=128",
    "data.val_tokens=512",
    "data.calibration_tokens=2048",
    "optim.warmup_steps=5",
    "stats.dead_window_tokens=2000",
    "stats.density_time_constant_tokens=2000",
]


def compose_config(overrides: list[str] = ()):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture(scope="session")
def cli(tmp_path_factory):
    """train.py / harvest.py run as from the shell, forked from one pre-imported server (tests/helpers/cli.py)."""
    from .helpers.cli import CLI

    return CLI(tmp_path_factory.mktemp("cli"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- a tiny causal LM (random weights, built from a transformers config, no download) with a
# tokenizer trained here, and a small local text corpus: for the real-activation tests
TEXT = [
    "Sparse autoencoders explain activations as sparse sums of learned features.",
    "Each feature picks the tokens it matches best, and tokens get a variable number of features.",
    "Mutual choice shares one budget of matches across the whole batch of tokens.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Language models write text one token at a time, reading everything before it.",
    "A shard is written to a temporary file, hashed, and renamed when it is whole.",
]


def write_corpus(path, n_docs: int = 120) -> None:
    """n_docs paragraphs (blank-line separated) of varied length."""
    paras = []
    for i in range(n_docs):
        sentences = [TEXT[(i * 7 + j) % len(TEXT)] for j in range(1 + i % 5)]
        paras.append(f"Document {i}. " + " ".join(sentences))
    path.write_text("\n\n".join(paras) + "\n")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    write_corpus(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A 2-block Llama (d_model 32) saved with its tokenizer; returns the folder."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny_lm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        TEXT * 4, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<pad>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def cache_run(tiny_lm, corpus_file, tmp_path_factory, cli):
    """A short Mutual Choice run on a cache harvested from the tiny LM: ``<root>/out/runs/<run>``,
    its cache at ``<root>/cache``."""
    from sae_lightning.data.harvest import harvest

    from .helpers.harvest import spec_for

    root = tmp_path_factory.mktemp("cache_run")
    harvest(root / "cache", spec_for(tiny_lm, corpus_file, token_budget=2500, shard_tokens=512), progress=False,
            log=lambda *a: None)  # fmt: skip
    r = cli("train.py", f"out_dir={root / 'out'}", "data=cache", f"data.path={root / 'cache'}", "data.batch_size=64",
            "data.val_tokens=256", "data.calibration_tokens=256", "model.n_latents=64", "model.init_sample_tokens=256",
            "variant=mutual_choice", "variant.k=4", "trainer.max_steps=40", "trainer.val_check_interval=20",
            "progress=none")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    (run_dir,) = (root / "out" / "runs").iterdir()
    return run_dir
