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
    x, n_active, _ = src.batch(4096, torch.Generator().manual_seed(0))
    assert x.shape == (4096, 128)
    assert torch.allclose(src.features.norm(dim=1), torch.ones(1024), atol=1e-5)
    q = torch.quantile(n_active.float(), torch.tensor([0.1, 0.5, 0.9]))
    assert q[0] < 8 < q[1] <= 17 and q[2] > 35  # most tokens need few features, some need many
    # same seed, same tokens (every variant trains on the same data)
    again = SyntheticActivations(SyntheticSpec()).batch(4096, torch.Generator().manual_seed(0))[0]
    assert torch.equal(x, again)


def test_without_a_hierarchy_the_tokens_are_those_of_the_runs_before_it():
    """(Sums measured before the hierarchy existed: runs of old configs see the same data.)"""
    x = SyntheticActivations(SyntheticSpec(d_model=32, n_features=128, active_median=4, active_max=32)).tokens(1000, 5)
    assert abs(float(x.double().sum()) - 415.5185723443283) < 1e-6 * 13834
    assert abs(float(x.double().pow(2).sum()) - 13834.265307218371) < 1e-6 * 13834


def test_children_fire_only_with_their_parent_and_as_often_as_asked():
    spec = SyntheticSpec(d_model=32, n_features=256, active_median=4, active_max=32, hierarchy_parents=8,
                         children_per_parent=3, child_probability=0.5)  # fmt: skip
    src = SyntheticActivations(spec)
    assert src.children.shape == (8, 3) and not bool(torch.isin(src.children, src.parents).any())
    _, _, coef = src.batch(20000, torch.Generator().manual_seed(1))
    parent = coef[:, src.parents] > 0  # [n, 8]
    child = coef[:, src.children.reshape(-1)].reshape(-1, 8, 3) > 0
    assert not bool((child.any(2) & ~parent).any()), "a child fired without its parent"
    assert int(child.sum(2).max()) == 1  # one child at a time
    share = float(child.any(2)[parent].float().mean())
    assert abs(share - 0.5) < 0.03
    # parents are the most frequent features
    rates = (coef > 0).float().mean(0)
    assert float(rates[src.parents].min()) >= float(torch.quantile(rates, 0.9))


def test_absorption_known_answers():
    from sae_lightning.metrics import absorption

    g = torch.Generator().manual_seed(0)
    P, d, N = 4, 8, 4000
    feats = torch.nn.functional.normalize(torch.randn(P, d, generator=g), dim=1)
    decoder = torch.cat([feats, torch.nn.functional.normalize(torch.randn(6, d, generator=g), dim=1)])
    parent = torch.rand(N, P, generator=g) < 0.3
    child = parent & (torch.rand(N, P, generator=g) < 0.5)
    coin = torch.rand(N, P, generator=g) < 0.5

    def case(on):
        return absorption(feats, decoder, lambda latents: on[:, latents], parent, child)["absorption"]

    assert case(parent) == 0.0  # fires wherever its parent is active
    assert case(parent & ~child) == 1.0  # never beside a child: wholly absorbed
    assert abs(case(parent & (~child | coin)) - 0.5) < 0.05  # beside a child half the time
