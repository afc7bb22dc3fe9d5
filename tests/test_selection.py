"""The selection kernels: exact against torch.topk on skewed rows, ties and non-positive values."""

from __future__ import annotations

import pytest
import torch

from sae_lightning.selection import GlobalTopK, per_column_topk

from .helpers.selection import assert_row_major_unique, counts_per_row


def test_mutual_choice_exact_when_some_rows_need_many_latents():
    """A few tokens take most of the budget: the two-stage selection must grow c."""
    B, F, k = 64, 512, 4
    z = torch.randn(B, F)
    z[:3] += 10.0  # three tokens dominate
    sel, values = GlobalTopK()(z, k * B)
    assert torch.equal(torch.sort(values, descending=True).values, torch.topk(z.flatten(), k * B).values)
    assert int(counts_per_row(sel)[:3].min()) > 2 * k


def test_per_column_topk_reports_cutoffs():
    zt = torch.tensor([[5.0, 1.0, 3.0], [0.5, 2.0, -1.0]])
    lat, tok, val, cutoff = per_column_topk(zt, torch.tensor([2, 0]))  # zt is latent-major
    assert sorted(zip(lat.tolist(), tok.tolist())) == [(0, 0), (0, 2)]
    assert cutoff[0] == 3.0 and cutoff[1] == float("-inf")


@pytest.mark.parametrize("seed", range(8))
def test_global_topk_is_exact_on_skewed_rows(seed):
    g = torch.Generator().manual_seed(seed)
    B, F = 40, 120
    scale = torch.exp(2 * torch.randn(B, 1, generator=g))  # heavy-tailed token scales
    z = torch.randn(B, F, generator=g) * scale
    if seed % 2:
        z = torch.round(z * 2) / 2  # with ties
    budget = int(torch.randint(1, B * F // 3, (1,), generator=g))
    for m in (budget, 1, B * F - 1, B * F):
        sel, values = GlobalTopK()(z, m)
        assert_row_major_unique(sel, F)
        assert sel.rows.numel() == m
        assert torch.equal(z[sel.rows, sel.cols], values)
        assert torch.equal(torch.sort(values, descending=True).values, torch.topk(z.flatten(), m).values)


# ---- the canonical order: value descending, then lower index first ------------------------------
def canonical_reference(values, m):
    """Positions of the m first entries of a 1-D tensor in the canonical order (brute force)."""
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    return sorted(order[:m])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selections_keep_the_lower_index_among_values_tied_at_the_cut(seed):
    """With many equal values at every cut, each kernel keeps exactly the pairs the canonical
    order (value descending, then lower latent / token / flat index) gives: the same pairs on any
    path that computes the same values (dense or blockwise, one rank or several)."""
    from sae_lightning.selection import topk_per_row

    g = torch.Generator().manual_seed(seed)
    B, F, k = 24, 40, 5
    z = torch.randint(0, 4, (B, F), generator=g).float()
    sel, vals = topk_per_row(z, k)
    for r in range(B):
        assert sorted(sel.cols[sel.rows == r].tolist()) == canonical_reference(z[r], k)
    assert torch.equal(vals, z[sel.rows, sel.cols])
    sel, vals = GlobalTopK()(z, k * B)
    assert sorted((sel.rows * F + sel.cols).tolist()) == canonical_reference(z.reshape(-1), k * B)
    m = torch.randint(0, B + 1, (F,), generator=g)
    lat, tok, val, _ = per_column_topk(z.t().contiguous(), m)
    for j in range(F):
        assert sorted(tok[lat == j].tolist()) == canonical_reference(z[:, j], int(m[j]))
        assert torch.all(val[lat == j].diff() <= 0)  # each latent's entries in value order


def assert_canonical_columns(z: torch.Tensor, m: torch.Tensor) -> None:
    """per_column_topk of latent-major ``z``: each latent keeps its canonical top-m_j, in value
    order, and its cutoff is its m_j-th value (-inf where m_j = 0)."""
    lat, tok, val, cut = per_column_topk(z, m)
    for j in range(z.shape[0]):
        assert sorted(tok[lat == j].tolist()) == canonical_reference(z[j], int(m[j])), j
        assert torch.all(val[lat == j].diff() <= 0)
        if m[j] > 0:
            assert cut[j] == torch.sort(z[j], descending=True).values[int(m[j]) - 1]
        else:
            assert cut[j] == float("-inf")


@pytest.mark.parametrize("seed", [0, 1])
def test_feature_choice_bulk_of_small_capacities_read_in_place_is_canonical(seed):
    """Zipf-like capacities (most latents 0–3 tokens of B = 64, a few large): the bulk is one
    topk over the whole matrix, the rest grouped; with ties everywhere every latent keeps its
    canonical top-m_j, in value order, and its cutoff is its m_j-th value."""
    g = torch.Generator().manual_seed(seed)
    B, F = 64, 120
    z = torch.randint(0, 5, (F, B), generator=g).float()
    m = torch.randint(0, 4, (F,), generator=g)
    m[:6] = torch.tensor([64, 40, 17, 9, 0, 33])
    assert_canonical_columns(z, m)


@pytest.mark.parametrize("kind", ["tied", "continuous"])
def test_feature_choice_large_capacities_through_group_maxima_are_canonical(kind):
    """B = 1024 (128 strided groups of 8): the latents above the bulk, whose capacities (17–60)
    are small against B, take their top-m_j through group maxima (row_topk) on their copied rows;
    every latent still keeps its canonical top-m_j in value order, with its m_j-th value as cutoff."""
    g = torch.Generator().manual_seed(3)
    B, F = 1024, 48
    z = torch.randint(0, 6, (F, B), generator=g).float() if kind == "tied" else torch.randn(F, B, generator=g)
    m = torch.randint(0, 4, (F,), generator=g)
    m[:8] = torch.tensor([60, 41, 33, 17, 24, 0, 50, 19])
    assert_canonical_columns(z, m)


@pytest.mark.parametrize(
    "n,W,width", [(64, 8192, 33), (50, 1000, 5), (7, 4099, 10), (3, 64, 4), (5, 17, 3), (40, 4096, 19)]
)
@pytest.mark.parametrize("kind", ["continuous", "tied", "constant"])
def test_row_topk_equals_torch_topk(n, W, width, kind):
    """The grouped top-k: torch.topk's values, entries at distinct indices holding them, and
    torch.topk's indices too where the values are distinct."""
    from sae_lightning.selection import row_topk

    g = torch.Generator().manual_seed(n * W + width)
    z = {
        "continuous": lambda: torch.randn(n, W, generator=g),
        "tied": lambda: torch.randint(0, 12, (n, W), generator=g).float(),
        "constant": lambda: torch.ones(n, W),
    }[kind]()
    values, index = row_topk(z, width)
    ref = torch.topk(z, width, dim=1, sorted=True)
    assert torch.equal(values, ref.values)
    assert torch.equal(z.gather(1, index), values)
    assert all(len(set(row.tolist())) == width for row in index)
    if kind == "continuous":
        assert torch.equal(index, ref.indices)
    loose, where = row_topk(z, width, sorted=False)  # in no order: the same entries
    assert torch.equal(torch.sort(loose, dim=1, descending=True).values, ref.values)
    assert torch.equal(z.gather(1, where), loose)
    assert all(len(set(row.tolist())) == width for row in where)


@pytest.mark.parametrize("W", [512, 517, 24])  # a multiple of 8, not one, too few groups
@pytest.mark.parametrize("kind,band", [("continuous", 0), ("tied", 0), ("int16", 0), ("int16", 3)])
def test_row_candidates_hold_each_rows_top_count_and_band(W, kind, band):
    """Per-row counts (0, small, a skewed tail, wider than half the groups) and widths: every
    row's candidates are exactly its entries ≥ τ − band for some τ at most its count-th largest
    (so all those within ``band`` key steps below that entry, or above), at least count of them,
    each once, not many more, and nothing for count 0."""
    from sae_lightning.selection import row_candidates

    n = 300
    g = torch.Generator().manual_seed(W + band)
    z = {
        "continuous": lambda: torch.randn(n, W, generator=g),
        "tied": lambda: torch.randint(0, 12, (n, W), generator=g).float(),
        "int16": lambda: torch.randn(n, W, generator=g).abs().bfloat16().view(torch.int16),  # rescore.py's keys
    }[kind]()
    count = torch.randint(1, 12, (n,), generator=g)
    count[:20] = 0
    count[20:40] = torch.randint(12, 60, (20,), generator=g)  # the Zipf head: other buckets
    count[40:45] = W  # more than half the groups: in full
    count = count.clamp(max=W)
    width = (count + torch.randint(0, 6, (n,), generator=g)).clamp(max=W)
    rows, cols = row_candidates(z, count, width, band)
    key = rows * W + cols
    assert key.unique().numel() == key.numel()
    counts = torch.bincount(rows, minlength=n)
    assert torch.equal(counts == 0, count == 0) and bool((counts >= count).all())
    for r in range(n):
        c = int(count[r])
        if c == 0:
            continue
        cut = torch.topk(z[r].double(), c).values[-1] - band  # the c-th largest, less the band (key steps)
        mine = cols[rows == r]
        assert set((z[r].double() >= cut).nonzero().squeeze(1).tolist()) <= set(mine.tolist()), r
        least = z[r, mine].double().min()
        assert torch.equal(torch.sort(mine).values, (z[r].double() >= least).nonzero().squeeze(1)), r  # all ≥ its τ
    if kind != "tied" and band == 0:  # a few more than the counts (entries between τ and the cut)
        assert rows.numel() <= 1.5 * int(count.sum())


def test_row_topk_lets_nan_and_inf_through():
    from sae_lightning.selection import row_topk

    z = torch.randn(10, 8192)
    z[3, 5000], z[7, 17] = float("nan"), float("inf")
    values, index = row_topk(z, 33)
    assert torch.isnan(values[3, 0]) and int(index[3, 0]) == 5000
    assert values[7, 0] == float("inf") and int(index[7, 0]) == 17


def test_topk_per_row_orders_each_row_canonically():
    """Within a row: value descending, then lower latent first, equal values inside the kept
    set and at the cut alike (the re-scored bf16 path orders its pairs so: rescore.per_column)."""
    from sae_lightning.selection import topk_per_row

    g = torch.Generator().manual_seed(0)
    z = torch.randint(0, 6, (50, 40), generator=g).float()  # many equal values in every row
    sel, vals = topk_per_row(z, 7)
    cols, vals = sel.cols.view(50, 7), vals.view(50, 7)
    for r in range(50):
        want = sorted(range(40), key=lambda c: (-float(z[r, c]), c))[:7]
        assert cols[r].tolist() == want and vals[r].tolist() == [float(z[r, c]) for c in want]


def test_topk_per_row_settles_ties_by_labels():
    """With ``labels`` (the latents each position stands for, in no order) ties go to the lower
    label: the same pairs, as positions, as the matrix laid out in label order gives."""
    from sae_lightning.selection import topk_per_row

    g = torch.Generator().manual_seed(1)
    n, w = 60, 24
    labels = torch.stack([torch.randperm(1000, generator=g)[:w] for _ in range(n)])
    z = torch.randint(0, 5, (n, w), generator=g).float()  # ties inside the kept set and at the cut
    z[:5] = torch.randn(5, w, generator=g)  # and some rows without any
    sel, vals = topk_per_row(z, 6, labels=labels)
    order = torch.sort(labels, dim=1).indices  # the same rows laid out in label order
    ref, ref_vals = topk_per_row(z.gather(1, order), 6)
    assert torch.equal(labels.gather(1, sel.cols.view(n, 6)), labels.gather(1, order).gather(1, ref.cols.view(n, 6)))
    assert torch.equal(vals, ref_vals)
