"""Global allocation across ranks: 2 CPU processes (gloo) select, over the union of their
batches, exactly the pairs one process selects on the concatenated batch (Mutual Choice's
global top-M, Feature Choice's per-latent top-m_j); with ties, the budget is met exactly and
the cut is respected. The kernels are in sae_lightning/collective.py."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_lightning.allocators import Mode
from sae_lightning.collective import Collective, global_per_column_topk, global_top_m
from sae_lightning.module import SAEModule
from sae_lightning.selection import GlobalTopK, per_column_topk, sort_pairs

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        cases = torch.load(Path(folder) / "cases.pt")
        coll = Collective()
        out = {}
        for name, case in cases.items():
            z = case["z"].chunk(WORLD, dim=0)[rank].contiguous()  # this rank's tokens [B, F]
            sel, values = global_top_m(z, case["k"], coll)
            out[f"{name}/mc"] = (sel.rows + rank * z.shape[0], sel.cols, values)
            fsel, theta = global_per_column_topk(z.t().contiguous(), case["m"], coll)
            out[f"{name}/fc"] = (fsel.rows + rank * z.shape[0], fsel.cols, theta)
        torch.save(out, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs every case on 2 gloo ranks once; returns (cases, {case/kind: pairs of both ranks})."""
    folder = tmp_path_factory.mktemp("collective")
    g = torch.Generator().manual_seed(0)
    B, F, k = 48, 40, 3  # 96 tokens in all
    plain = torch.randn(WORLD * B, F, generator=g)
    ties = torch.randint(0, 6, (WORLD * B, F), generator=g).float()  # many equal values at every cut
    skewed = plain.clone()
    skewed[:B] += 3.0  # rank 0's tokens take most of the budget: ranks' shares differ
    m = torch.randint(0, 8, (F,), generator=g)
    m[:3] = torch.tensor([0, WORLD * B, B + 5])  # a latent with no capacity, one with every token, one > B
    cases = {
        "plain": {"z": plain, "k": k, "m": m},
        "skewed": {"z": skewed, "k": k, "m": m},
        "ties": {"z": ties, "k": k, "m": m},
    }
    torch.save(cases, folder / "cases.pt")
    mp.spawn(_worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    parts = [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]
    merged = {}
    for key in parts[0]:
        rows = torch.cat([p[key][0] for p in parts])
        cols = torch.cat([p[key][1] for p in parts])
        merged[key] = (rows, cols, [p[key][2] for p in parts])
    return cases, merged


def pairs(rows, cols, F):
    return sorted((rows * F + cols).tolist())


@pytest.mark.parametrize("case", ["plain", "skewed"])
def test_global_allocation_mutual_choice_equals_one_process_on_the_concatenated_batch(two_ranks, case):
    cases, got = two_ranks
    z, k = cases[case]["z"], cases[case]["k"]
    one, values = GlobalTopK()(z, k * z.shape[0])
    rows, cols, vals = got[f"{case}/mc"]
    assert pairs(rows, cols, z.shape[1]) == pairs(one.rows, one.cols, z.shape[1])
    assert torch.equal(torch.cat(vals).sort().values, values.sort().values)
    if case == "skewed":  # the budget is shared across ranks, not split evenly
        assert (rows < z.shape[0] // WORLD).sum() > 1.5 * k * z.shape[0] / WORLD


@pytest.mark.parametrize("case", ["plain", "skewed"])
def test_global_allocation_feature_choice_equals_one_process_on_the_concatenated_batch(two_ranks, case):
    cases, got = two_ranks
    z, m = cases[case]["z"], cases[case]["m"]
    lat, tok, _, cutoff = per_column_topk(z.t().contiguous(), m)
    one = sort_pairs(tok, lat, n_tokens=z.shape[0], n_latents=z.shape[1])
    rows, cols, thetas = got[f"{case}/fc"]
    assert pairs(rows, cols, z.shape[1]) == pairs(one.rows, one.cols, z.shape[1])
    assert torch.equal(thetas[0], thetas[1])  # every rank holds the same cutoffs
    assert torch.equal(thetas[0], cutoff.float())


def test_global_allocation_with_ties_meets_the_budget_and_respects_the_cut(two_ranks):
    cases, got = two_ranks
    z, k, m = cases["ties"]["z"], cases["ties"]["k"], cases["ties"]["m"]
    N, F = z.shape
    rows, cols, _ = got["ties/mc"]
    assert len(set(pairs(rows, cols, F))) == rows.numel() == k * N  # exactly the budget, no pair twice
    chosen = torch.zeros(N, F, dtype=torch.bool)
    chosen[rows, cols] = True
    assert z[chosen].min() >= z[~chosen].max()  # nothing left out above a chosen value
    rows, cols, thetas = got["ties/fc"]
    chosen = torch.zeros(N, F, dtype=torch.bool)
    chosen[rows, cols] = True
    assert torch.equal(chosen.sum(0), m)  # each latent exactly its capacity
    for j in range(F):
        col, pick = z[:, j], chosen[:, j]
        if 0 < m[j] < N:
            assert col[pick].min() >= col[~pick].max()
            assert col[pick].min() == thetas[0][j]


# ---- the same through Lightning's DDP: training steps of the real module ---------------------

STEPS = 4


class Recording(SAEModule):
    """The module, recording each training step's selected (token, latent) pairs and saving
    them with its state when training ends (one file per rank)."""

    def __init__(self, config, d_model, folder):
        super().__init__(config, d_model)
        self.folder, self.picked = folder, []

    def forward_step(self, x, mode=Mode.BATCH, update=False, collective=None, grad=None):
        out, ctx = super().forward_step(x, mode, update, collective, grad)
        if update:
            self.picked.append(out.code.token_index() * out.code.n_latents + out.code.latents)
        return out, ctx

    def on_train_end(self):
        self.calibrate(self.data().calibration_tokens())  # each rank on the whole held-out set
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        torch.save({"picked": self.picked, "state": state}, Path(self.folder) / f"rank{self.global_rank}.pt")


class Concatenated:
    """Global batch i of a one-process run: the WORLD batches the ranks take at step i."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, i: int):
        return torch.cat([self.inner(i * WORLD + r) for r in range(WORLD)])


def train(overrides: list[str], folder: Path, devices: int) -> dict:
    """STEPS training steps on ``devices`` CPU ranks (ddp_spawn) or on one process that reads the
    ranks' batches concatenated; returns rank 0's (or the only) recording, and rank 1's."""
    import lightning as L

    from sae_lightning.config import load_config
    from sae_lightning.data.synthetic import SyntheticBatches

    from .conftest import TINY, compose_config

    B = 64
    batch = B * (WORLD if devices == 1 else 1)
    config = load_config(
        compose_config([*TINY, *overrides, f"data.batch_size={batch}", "model.init_encoder_scale=gao"])
    )
    datamodule = config.data.build()
    if devices == 1:
        datamodule.batch_of = lambda: Concatenated(SyntheticBatches(datamodule.source, B))
    L.seed_everything(0, verbose=False)
    module = Recording(config, datamodule.d_model, str(folder))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=STEPS,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,  # the module clips its own gradients
    )  # fmt: skip
    old = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = str(free_port())  # Lightning would reuse the previous run's port
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        os.environ.pop("MASTER_PORT") if old is None else os.environ.update(MASTER_PORT=old)
    return {r: torch.load(folder / f"rank{r}.pt") for r in range(devices)}


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant",
    [
        ["variant=mutual_choice", "variant.losses.aux_zipf.coef=0", "variant.k=8"],
        ["variant=feature_choice", "variant.rank=static", "variant.k=8"],
    ],
    ids=["mutual_choice", "feature_choice"],
)
def test_global_allocation_ddp_training_steps_equal_one_process_on_the_global_batch(tmp_path, variant):
    """Global allocation inside Lightning's DDP: 2 gloo ranks train STEPS steps; at every step
    the pairs the ranks select together are the pairs one process selects on the concatenated
    batch, and after the steps parameters, thresholds (EMA and calibrated) and latent statistics
    agree."""
    for name in ("two", "one"):
        (tmp_path / name).mkdir()
    two, one = train(variant, tmp_path / "two", 2), train(variant, tmp_path / "one", 1)
    B, F = 64, 256
    assert len(one[0]["picked"]) == len(two[0]["picked"]) == STEPS
    for step in range(STEPS):
        ranks = [two[r]["picked"][step] for r in range(WORLD)]
        ranks = torch.cat([ranks[r] + r * B * F for r in range(WORLD)])  # rank r's tokens follow rank r-1's
        assert torch.equal(ranks.sort().values, one[0]["picked"][step].sort().values), f"step {step}"
    for key, value in one[0]["state"].items():
        if key == "allocator.capacity_by_rank":  # Zipf capacities at this process's batch (the ranks': B)
            continue
        for r in range(WORLD):
            other = two[r]["state"][key]
            if value.is_floating_point():
                assert torch.allclose(other, value, rtol=1e-4, atol=1e-6), f"{key} on rank {r}"
            else:
                assert torch.equal(other, value), f"{key} on rank {r}"
    assert int(two[0]["state"]["stats.tokens_seen"]) == STEPS * B * WORLD
    assert bool(two[0]["state"]["allocator.calibrated"])


@pytest.mark.slow
@pytest.mark.parametrize("capacity", ["zipf", "demand"])
def test_global_allocation_keeps_feature_choice_demand_and_capacities_the_same_on_every_rank(tmp_path, capacity):
    """Demand (the sampled Mutual Choice cutoff of every rank, shares averaged over the ranks),
    the ranking it sets and the capacities drawn from it are the same on both ranks."""
    two = train(["variant=feature_choice", f"variant.capacity={capacity}", "variant.k=8"], tmp_path, 2)
    a, b = two[0]["state"], two[1]["state"]
    assert not torch.allclose(a["allocator.demand"], torch.full_like(a["allocator.demand"], 8 / 256))  # it moved
    for key in ("allocator.demand", "allocator.rank_to_latent", "allocator.theta_ema", "allocator.allocation_batch"):
        assert torch.equal(a[key], b[key]), key
    assert int(a["allocator.allocation_batch"]) == 64 * WORLD
    for step in range(STEPS):  # the global budget, less the pairs whose affinity the ReLU drops
        assert 0.5 * 8 * 64 * WORLD < two[0]["picked"][step].numel() + two[1]["picked"][step].numel() <= 8 * 64 * WORLD
