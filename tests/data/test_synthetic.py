import torch

from sae_lightning.data.stream import BatchStream
from sae_lightning.data.synthetic import SyntheticActivations, SyntheticBatches, SyntheticSpec

SPEC = SyntheticSpec(d_model=16, n_features=64, active_median=4, active_max=16)


def first(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_ranks_split_the_stream_without_overlap_and_resume_exactly():
    src = SyntheticActivations(SPEC)
    whole = first(BatchStream(SyntheticBatches(src, 8), 0), 6)
    r0 = first(BatchStream(SyntheticBatches(src, 8), 0, rank=0, world=2), 3)
    r1 = first(BatchStream(SyntheticBatches(src, 8), 0, rank=1, world=2), 3)
    assert all(torch.equal(a, b) for a, b in zip(r0, whole[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(r1, whole[1::2]))
    resumed = first(BatchStream(SyntheticBatches(src, 8), start=2, rank=1, world=2), 1)[0]
    assert torch.equal(resumed, r1[2])


def test_heavy_tailed_activity_and_unit_features():
    src = SyntheticActivations(SyntheticSpec())
    x, n_active = src.batch(4096, torch.Generator().manual_seed(0))
    assert x.shape == (4096, 128)
    assert torch.allclose(src.features.norm(dim=1), torch.ones(1024), atol=1e-5)
    q = torch.quantile(n_active.float(), torch.tensor([0.1, 0.5, 0.9]))
    assert q[0] < 8 < q[1] <= 17 and q[2] > 35  # most tokens need few features, some need many
    # same seed, same tokens (every variant trains on the same data)
    again = SyntheticActivations(SyntheticSpec()).batch(4096, torch.Generator().manual_seed(0))[0]
    assert torch.equal(x, again)
