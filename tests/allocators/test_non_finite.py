"""NaN or inf anywhere: every allocator stops with one clear error, at once (never a hang)."""

from __future__ import annotations

import signal
import time

import pytest
import torch

from sae_lightning.allocators import ALLOCATORS, get_allocator_class
from sae_lightning.allocators.base import BatchContext
from sae_lightning.errors import DataError, TrainingDiverged

from ..conftest import TINY, compose_config
from ..helpers.cli import hang_guard

B, F, K = 256, 512, 8


@pytest.fixture
def deadline():
    """Fail (instead of hanging the suite) if the block takes more than 5 s on an idle machine
    (times SAE_TEST_SLACK, as every limit of the suite)."""
    limit = max(1, round(hang_guard(5)))

    def on_alarm(signum, frame):
        raise TimeoutError(f"the allocator did not stop within {limit} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def allocators():
    for name in sorted(ALLOCATORS):
        yield name, {"k": K}
    yield "feature_choice+mc_warmup", {"k": K, "mc_warmup_steps": 10}


@pytest.mark.parametrize("name,params", list(allocators()), ids=[n for n, _ in allocators()])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_affinities_stop_every_allocator_at_once(name, params, bad, deadline):
    cls = get_allocator_class(name.split("+")[0])
    alloc = cls.from_dict(params, F, B)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):  # anywhere in the matrix
        z = torch.randn(B, F, generator=g)
        i, j = int(torch.randint(B, (1,), generator=g)), int(torch.randint(F, (1,), generator=g))
        z[i, j] = bad
        if cls.layout == "latent":
            z = z.t().contiguous()
        start = time.perf_counter()
        with pytest.raises(TrainingDiverged, match="non-finite affinities"):
            alloc.allocate(z, BatchContext(step=0, update=True))
        assert time.perf_counter() - start < hang_guard(1.0)


@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_a_non_finite_batch_is_named_with_its_token_and_step(variant):
    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    config = load_config(compose_config([f"variant={variant}", *TINY, "variant.k=8"]))
    dm = config.data.build()
    module = SAEModule(config, dm.d_model)
    x = dm.sample(128)
    x[17, 3] = float("nan")
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"non-finite input activations \(NaN or inf\) at token 17 of a batch of 128"):
        module.forward_step(x, "batch", update=True)
    assert time.perf_counter() - start < hang_guard(1.0)


def test_the_step_and_the_tensor_are_named_when_the_weights_diverge():
    from sae_lightning.config import load_config
    from sae_lightning.module import SAEModule

    config = load_config(compose_config(["variant=mutual_choice", *TINY, "variant.k=8"]))
    dm = config.data.build()
    module = SAEModule(config, dm.d_model)
    with torch.no_grad():
        module.sae.W_enc[5, 2] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"at step 0 \(not finite: sae\.W_enc; lower optim\.lr\)"):
        module.forward_step(dm.sample(128), "batch")


@pytest.mark.parametrize("variant", ["topk", "mutual_choice", "feature_choice"])
def test_a_diverging_run_ends_in_one_line_with_status_1(variant, cli, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    r = cli(
        "train.py",
        f"out_dir={out}",
        f"variant={variant}",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        *TINY,
        "variant.k=8",
        "trainer.max_steps=50",
        "progress=none",
        timeout=120,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: training diverged: ") and "at step " in lines[0], lines[0]
