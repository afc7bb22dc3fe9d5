"""Selection kernels the allocators and the auxiliary losses share: exact top-k per row, exact
global top-M of a matrix, per-column top-m_j, threshold selection, token-major ordering.

Each returns a :class:`Selection` (pairs, no values, no gradient). Every one stops on NaN or
inf (:func:`check_finite`) instead of selecting garbage or, for the global top-M, spinning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import TrainingDiverged
from .sparse import Selection


def check_finite(top_values: Tensor) -> None:
    """Raise TrainingDiverged if any of ``top_values`` is NaN or +inf. Allocators pass the
    values ``torch.topk`` kept: it ranks NaN above every number, so a NaN or +inf anywhere
    in a row (or column) of z' shows among that row's top values, at no extra pass over z'."""
    if not bool(torch.isfinite(top_values).all()):
        raise TrainingDiverged("non-finite affinities z' (NaN or inf) reached the allocator")


def canonical_rows(z: Tensor, k: Tensor) -> Tensor:
    """For each row of ``z`` ([n, W]) the positions of its top-k_r entries in the canonical order
    (value descending, then position ascending), as a [n, W] mask with k_r entries per row. For
    the few rows whose cut falls inside a run of equal values (``torch.topk`` leaves which of
    them it keeps unspecified)."""
    kmax = int(k.max()) if k.numel() else 0
    if kmax == 0:
        return torch.zeros_like(z, dtype=torch.bool)
    top = torch.topk(z, kmax, dim=1, sorted=True).values
    theta = top.gather(1, (k - 1).clamp_min(0).unsqueeze(1))
    above = z > theta
    tie = z == theta
    need = (k.unsqueeze(1) - above.sum(1, keepdim=True)).clamp_min(0)
    return (above | (tie & (tie.cumsum(1) <= need))) & (k.unsqueeze(1) > 0)


ROW_GROUP = 8  # the strided group size of row_topk


def row_topk(z: Tensor, width: int, sorted: bool = True) -> tuple[Tensor, Tensor]:
    """``torch.topk(z, width, dim=1, sorted=sorted)`` of a [n, W] matrix: the same values, and the
    same indices but for the order among equal values (``sorted=False``: each row's top-``width``
    in no particular order, as ``torch.topk``'s); about twice as fast for width ≪ W.

    Column c's group is {c, c + W/8, c + 2W/8, ...} (8 columns, strided, so that the groups'
    maxima are one elementwise max of 8 contiguous slabs: a pass at memory speed). The row's
    top-``width`` lie in its ``width`` groups of largest maxima: the ``width`` largest maxima are
    ``width`` distinct entries, so the width-th largest entry v is at least the width-th largest
    maximum, and an entry ≥ v lies in a group whose maximum is ≥ v (an entry of a group left out
    by a tie among maxima equals v: a tie at the cut, which the callers settle by value). Those
    groups are found the same way (recursively, in no order: docs/performance.md) and
    ``torch.topk`` runs on their 8·width entries. NaN and +inf propagate
    through the maxima, so they still reach the top."""
    n, W = z.shape
    G = ROW_GROUP
    cols = W // G
    if z.device.type != "cpu" or width < 1 or 2 * width > cols or z.stride(1) != 1:
        return torch.topk(z, min(width, W), dim=1, sorted=sorted)
    maxima = z[:, : cols * G].view(n, G, cols).amax(1)  # [n, cols]: each group's maximum
    _, groups = row_topk(maxima, width, sorted=False)
    values, pos = torch.topk(group_entries(z, groups), width, dim=1, sorted=sorted)
    return values, group_columns(groups, pos, W)


def group_entries(z: Tensor, groups: Tensor) -> Tensor:
    """The entries of the strided groups ``groups`` ([n, w] group numbers) of each row of a [n, W]
    matrix, [n, 8·w]: position g·w + l holds z[row, g·(W // 8) + groups[row, l]]; then the last W
    mod 8 columns (in no group: candidates of every row). One gather through a [n, 8, W // 8]
    view with the groups' index broadcast over its middle dimension (an index built as [n, 8·w]
    longs cost as much as the gather itself)."""
    n, W = z.shape
    G, cols = ROW_GROUP, W // ROW_GROUP
    w = groups.shape[1]
    entries = z[:, : cols * G].view(n, G, cols).gather(2, groups.unsqueeze(1).expand(n, G, w)).view(n, G * w)
    return entries if W == cols * G else torch.cat([entries, z[:, cols * G :]], 1)


def group_columns(groups: Tensor, pos: Tensor, W: int) -> Tensor:
    """The columns of positions ``pos`` ([n, p]) in the rows of :func:`group_entries`."""
    n, w = groups.shape
    G, cols = ROW_GROUP, W // ROW_GROUP
    g = torch.div(pos, w, rounding_mode="floor")
    col = groups.gather(1, (pos - g * w).clamp(max=w - 1)) + g * cols
    return col if W == cols * G else torch.where(pos < G * w, col, pos - G * w + cols * G)


def row_candidates(z: Tensor, count: Tensor, width: Tensor | None = None, band: int = 0) -> tuple[Tensor, Tensor]:
    """(row, column) of every entry of a [n, W] matrix within ``band`` key steps below its row's
    count_r-th largest, or above (all of them, ties included): candidates for a re-scoring
    (:mod:`rescore`, whose int16 views of bf16 make a key step one bf16 step). Found without a
    top-k over the entries themselves (~2× faster than :func:`per_column_topk` for Feature
    Choice's capacities).

    With τ_r the count_r-th largest maximum of the row's strided groups of 8 (:func:`row_topk`'s
    groups), at most the count_r-th largest entry, the candidates are the entries ≥ τ_r − band,
    looked for in the row's width_r (≥ count_r; default count_r) groups of largest maxima,
    one more, and the last W mod 8 columns; a row whose next group's maximum also reaches
    τ_r − band (so more groups might hold some) looks in twice as many, and one whose width
    exceeds half its number of groups is compared in full. The bulk of the rows (widths up to
    the 90th percentile) is served in place, the others in buckets of similar widths."""
    n, W = z.shape
    G = ROW_GROUP
    cols = W // G
    count = count.clamp(min=0, max=W)
    width = count if width is None else torch.maximum(width.clamp(max=W), count)
    found_rows: list[Tensor] = []
    found_cols: list[Tensor] = []
    grouped = z.device.type == "cpu" and z.is_contiguous() and cols >= 2
    maxima = z[:, : cols * G].view(n, G, cols).amax(1) if grouped else None
    spread3 = torch.arange(G, device=z.device).view(1, G, 1)
    lowest = torch.iinfo(z.dtype).min if not z.is_floating_point() else float("-inf")

    def lowered(tau: Tensor) -> Tensor:
        """τ − band, in the keys' dtype (int keys: not below their least value)."""
        if band == 0:
            return tau
        return (tau.long() - band).clamp(min=lowest).to(z.dtype)

    def full_rows(r: Tensor, c: Tensor) -> None:
        """Rows ``r`` in full: their entries ≥ their c-th largest − band."""
        rows_z = z[r]
        tau = lowered(torch.topk(rows_z, int(c.max()), dim=1, sorted=True).values.gather(1, (c - 1).unsqueeze(1)))
        hit = (rows_z >= tau).nonzero()
        found_rows.append(r[hit[:, 0]])
        found_cols.append(hit[:, 1])

    def in_groups(r: Tensor | None, c: Tensor, top: int) -> None:
        """Rows ``r`` (None: every row, in place), counts ``c``, the top-``top`` groups of each."""
        assert maxima is not None
        mx = maxima if r is None else maxima.index_select(0, r)
        rows = torch.arange(n, device=z.device) if r is None else r
        look = min(cols, top + 1)
        vals, groups = row_topk(mx, look)  # by the maxima's own groups where it pays
        tau = lowered(vals.gather(1, (c.clamp(min=1) - 1).unsqueeze(1)))  # [rows, 1]
        live = c > 0
        unsure = live & (vals[:, -1] >= tau.squeeze(1)) if look < cols else torch.zeros_like(live)
        if r is None:
            entries = group_entries(z[:, : cols * G], groups)  # [n, 8·look], g-major
        else:  # [rows, 8, look] through broadcast indices (a copy of the rows would cost more)
            entries = z[:, : cols * G].view(n, G, cols)[r.view(-1, 1, 1), spread3, groups.unsqueeze(1)]
        ok = (live & ~unsure).unsqueeze(1)
        keep = ((entries.view(mx.shape[0], G * look) >= tau) & ok).view(-1).nonzero().squeeze(1)
        at = torch.div(keep, G * look, rounding_mode="floor")
        found_rows.append(rows[at])
        pos = keep - at * G * look
        g = torch.div(pos, look, rounding_mode="floor")
        found_cols.append(groups.view(-1)[at * look + pos - g * look] + g * cols)
        if W > cols * G:  # the last W mod 8 columns belong to no group
            tail = ((z[rows, cols * G :] >= tau) & ok).nonzero()
            found_rows.append(rows[tail[:, 0]])
            found_cols.append(tail[:, 1] + cols * G)
        if bool(unsure.any()):  # more groups reach τ − band: look in twice as many
            again = rows[unsure]
            if 4 * look <= cols:
                in_groups(again, c[unsure], 2 * look)
            else:
                full_rows(again, c[unsure])

    positive = width[count > 0]
    done = torch.zeros(n, dtype=torch.bool, device=z.device)
    if grouped and positive.numel():
        bulk = int(torch.quantile(positive.double(), 0.9, interpolation="higher"))
        if 2 * bulk <= cols:
            done = (count > 0) & (width <= bulk)
            in_groups(None, torch.where(done, count, torch.zeros_like(count)), bulk)
    rest = torch.where(done | (count == 0), torch.zeros_like(width), width)
    order = torch.argsort(rest, descending=True, stable=True)
    w_sorted = rest[order].tolist()
    start = 0
    while start < n and w_sorted[start] > 0:
        top = w_sorted[start]
        end = start
        while end < n and w_sorted[end] > 0 and 2 * w_sorted[end] >= top:
            end += 1
        r = order[start:end]
        if grouped and 2 * top <= cols:
            in_groups(r, count[r], top)
        else:
            full_rows(r, count[r])
        start = end
    if not found_rows:
        empty = torch.empty(0, dtype=torch.long, device=z.device)
        return empty, empty
    return torch.cat(found_rows), torch.cat(found_cols)


def topk_per_row(z: Tensor, k: int, offset: int = 0, labels: Tensor | None = None) -> tuple[Selection, Tensor]:
    """The top-k latents of every token (row-major order) and their values, in the canonical
    order (value descending, then lower latent first; among equal values at the cut, the lower
    latents are kept): the same pairs in the same order whatever the implementation of
    ``torch.topk`` does with ties. ``offset`` is added to the latent indices (a block of latents).
    ``labels`` ([B, W], distinct in each row): the latents the positions stand for, where not in
    position order (their order then settles ties; the columns returned are still positions)."""
    B, F = z.shape
    k = min(k, F)
    width = min(k + 1, F)
    top_values, top_indices = row_topk(z, width)
    check_finite(top_values)
    idx, vals = top_indices[:, :k], top_values[:, :k]
    at_cut = torch.zeros(B, dtype=torch.bool, device=z.device)
    if width > k:
        at_cut = top_values[:, k] == top_values[:, k - 1]
    equal = at_cut | (vals[:, 1:] == vals[:, :-1]).any(1) if k > 1 else at_cut
    tied = equal.nonzero().squeeze(1)
    if tied.numel():  # rows with equal values among the kept ones (or at the cut): canonical order
        idx, vals = idx.clone(), vals.clone()
        rows_z, kept = z[tied], idx[tied]
        perm = None
        if labels is not None:  # the rows' entries in label order: position order settles ties
            perm = torch.sort(labels[tied], dim=1).indices
            rows_z = rows_z.gather(1, perm)
            kept = torch.argsort(perm, dim=1).gather(1, kept)
        cut = at_cut[tied].nonzero().squeeze(1)
        if cut.numel():  # a cut inside a run of equal values: the lower latents among them
            mask = canonical_rows(rows_z[cut], torch.full((cut.numel(),), k, device=z.device))
            kept[cut] = mask.nonzero()[:, 1].view(-1, k)
        kept = torch.sort(kept, dim=1).values  # latent order, then value order (stable)
        rows_val = rows_z.gather(1, kept)
        by_value = torch.sort(rows_val, dim=1, descending=True, stable=True).indices
        kept = kept.gather(1, by_value)
        idx[tied] = kept if perm is None else perm.gather(1, kept)
        vals[tied] = rows_val.gather(1, by_value)
    rows = torch.arange(B, device=z.device).repeat_interleave(k)
    return Selection(rows=rows, cols=idx.reshape(-1) + offset, n_tokens=B), vals.reshape(-1)


def top_canonical(values: Tensor, keys: Tensor, m: int) -> Tensor:
    """Positions of the m largest ``values`` in the canonical order (value descending, then
    ``keys`` ascending; keys distinct): exact and unique, ties at the cut included."""
    if m >= values.numel():
        return torch.arange(values.numel(), device=values.device)
    top = torch.topk(values, m, sorted=False)
    cut = top.values.min()
    if int((values == cut).sum()) == int((top.values == cut).sum()):  # no tie across the cut
        return top.indices
    above = (values > cut).nonzero().squeeze(1)
    eq = (values == cut).nonzero().squeeze(1)
    eq = eq[torch.argsort(keys[eq])][: m - above.numel()]
    return torch.cat([above, eq])


class GlobalTopK:
    """Exact top-M of a flattened [B, F] matrix without sorting it.

    1. From a strided sample of z′ (2^16 entries), a threshold θ that about 1.5·M entries reach.
    2. Every entry ≥ θ is a candidate: one comparison and one ``nonzero``, a chunk of rows at a
       time (its mask stays in cache). NaN is kept as a candidate, so it stops selection.
    3. If fewer than M entries reach θ (the sample misjudged it), θ is lowered (4× the share)
       and step 2 repeated. Then the top-M of the candidates, in the canonical order (value,
       then lower token-major position), is exactly the flat top-M, ties at the cut included.

    Where F is a multiple of 8, step 2 compares the maxima of strided groups of 8 entries (see
    :func:`row_topk`) and then only the entries of the groups that reach θ.

    (This replaced a per-row top-w scheme with widening passes: 1.3–1.9× faster at B = 4096,
    F = 8192–16384, the same pairs; docs/performance.md.)
    """

    SAMPLE = 1 << 16
    MARGIN = 1.5  # candidates aimed at, as a multiple of the budget
    CHUNK = 1 << 21  # entries compared per chunk of rows

    def __call__(self, z: Tensor, budget: int) -> tuple[Selection, Tensor]:
        B, F = z.shape
        flat = z.reshape(-1)
        n = flat.numel()
        budget = min(budget, n)
        if budget == 0:
            empty = torch.empty(0, dtype=torch.long, device=z.device)
            return Selection(rows=empty, cols=empty, n_tokens=B), z.new_empty(0)
        G, cols = ROW_GROUP, F // ROW_GROUP
        grouped = z.device.type == "cpu" and F % G == 0 and cols >= 2 and z.is_contiguous()
        # the entries compared against θ: every entry, or (grouped) the maxima of strided groups of
        # 8 (as row_topk's), whose groups alone can hold entries ≥ θ: 8× fewer to compare and
        # pick out, for one elementwise max over 8 slabs (at memory speed)
        scan = z.view(B, G, cols).amax(1) if grouped else z
        width = scan.shape[1]
        sample = scan.reshape(-1)[:: max(1, scan.numel() // self.SAMPLE)]
        share = self.MARGIN * budget / scan.numel()
        rows_per_chunk = max(1, self.CHUNK // width)
        values: Tensor | None = None  # the candidates' values, where the filter read them
        while True:
            want = int(share * sample.numel()) + 8
            if share >= 1.0 or want >= sample.numel():
                keys, values = torch.arange(n, device=z.device), None  # every entry
            else:
                theta = torch.topk(sample, want, sorted=False).values.min()
                hits = torch.cat(
                    [
                        (~(scan[i : i + rows_per_chunk] < theta)).reshape(-1).nonzero().squeeze(1) + i * width
                        for i in range(0, B, rows_per_chunk)
                    ]
                )
                if grouped:  # the groups' entries that reach θ (NaN kept: it stops selection below)
                    row = torch.div(hits, cols, rounding_mode="floor")
                    first = row * F + (hits - row * cols)
                    keys = (first.unsqueeze(1) + cols * torch.arange(G, device=z.device)).reshape(-1)
                    read = flat[keys]  # one gather of the groups' entries from the whole matrix
                    reach = ~(read < theta)
                    keys, values = keys[reach], read[reach]
                else:
                    keys, values = hits, None
            # at least `budget` entries reach θ, so θ ≤ the budget-th largest: every entry of the
            # top-M (ties at its cut included) is a candidate
            if keys.numel() >= budget:
                break
            share *= 4
        if values is None:
            values = flat[keys]
        check_finite(values)
        chosen = top_canonical(values, keys, budget)
        keys, order = torch.sort(keys[chosen])
        rows = torch.div(keys, F, rounding_mode="floor")
        return Selection(rows=rows, cols=keys - rows * F, n_tokens=B), values[chosen][order]


def per_column_topk(zt: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For each row j of ``zt`` ([F, B], latent-major) its top-m_j entries.

    The bulk of the latents (the 90 % with the smallest positive capacities, when that is at
    most B/8) is served by one ``topk`` over the whole matrix, read in place; the others are
    grouped by capacity so that each ``topk`` call, on a copy of its rows, asks for at most
    four times the smallest capacity in its group: the work stays within a small factor of
    Σ m_j even for Zipf capacities, and only the few large-capacity rows are copied (a
    ``topk``'s cost on a CPU follows its rows more than its k, so fewer, wider groups win:
    docs/performance.md). Ties at a latent's cut keep the lower tokens (canonical: the same pairs
    whatever ``torch.topk`` does). Returns (latent, token, value) of the kept entries, each
    latent's in value order, and each latent's cutoff value (its m_j-th largest, -inf where
    m_j = 0).
    """
    F_, B = zt.shape
    order = torch.argsort(m, descending=True, stable=True)
    m_sorted = m[order].tolist()
    lat_out, tok_out, val_out = [], [], []
    cutoff = torch.full((F_,), float("-inf"), dtype=zt.dtype, device=zt.device)

    def take(lat: Tensor, top: int, vals: Tensor, idx: Tensor) -> None:
        """Keep each latent's top-m_j of its sorted top-``top + 1`` (``vals``, ``idx``)."""
        cap = m[lat]
        width = vals.shape[1]
        check_finite(vals[:, 0])  # each latent's largest value
        tied = (cap < B) & (
            vals.gather(1, cap.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
            == vals.gather(1, (cap - 1).unsqueeze(1)).squeeze(1)
        )
        tied = tied.nonzero().squeeze(1)
        if tied.numel():  # those latents keep the lower tokens among the tied values
            rows = zt[lat[tied]]
            mask = canonical_rows(rows, cap[tied])
            ranked = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :top]  # kept first
            order_v = torch.sort(rows.gather(1, ranked), dim=1, descending=True, stable=True).indices
            idx, vals = idx.clone(), vals.clone()
            idx[tied, :top] = ranked.gather(1, order_v)
            vals[tied, :top] = rows.gather(1, idx[tied, :top])
        vals, idx = vals[:, :top], idx[:, :top]
        keep = torch.arange(top, device=zt.device).unsqueeze(0) < cap.unsqueeze(1)
        lat_out.append(lat.unsqueeze(1).expand(-1, top)[keep])
        tok_out.append(idx[keep])
        val_out.append(vals[keep])
        cutoff[lat] = vals.gather(1, (cap - 1).unsqueeze(1)).squeeze(1)

    n_pos = sum(1 for c in m_sorted if c > 0)
    stop = n_pos  # latents order[:stop] are grouped; order[stop:n_pos] are the bulk
    if n_pos:
        bulk_cap = m_sorted[n_pos - 1 - int(0.9 * (n_pos - 1))]  # the 90th percentile from below
        if bulk_cap + 1 <= max(1, B // 8):
            stop = next(i for i, c in enumerate(m_sorted) if c <= bulk_cap)
            lat = order[stop:n_pos]
            vals, idx = row_topk(zt, bulk_cap + 1)  # every row, read in place
            take(lat, bulk_cap, vals[lat], idx[lat])
    start = 0
    while start < stop:
        top = m_sorted[start]
        end = start
        while end < stop and 4 * m_sorted[end] >= top:
            end += 1
        lat = order[start:end]
        # one more: a tie at the cut? (row_topk: torch.topk's values, through group maxima where
        # the capacity is small against B: 45 -> 39 ms for FC at F = 8192, docs/performance.md)
        vals, idx = row_topk(zt[lat], min(top + 1, B))
        take(lat, top, vals, idx)
        start = end
    if not lat_out:
        empty = torch.empty(0, dtype=torch.long, device=zt.device)
        return empty, empty, zt.new_empty(0), cutoff
    return torch.cat(lat_out), torch.cat(tok_out), torch.cat(val_out), cutoff


def threshold_selection(z: Tensor, theta: Tensor, layout: str = "token") -> Selection:
    """Pairs with z' > θ and z' > 0, token-major. θ is a scalar or one per latent."""
    if layout == "token":
        rows, cols = torch.nonzero((z > theta) & (z > 0), as_tuple=True)
        return Selection(rows=rows, cols=cols, n_tokens=z.shape[0])
    theta = theta.unsqueeze(1) if theta.dim() == 1 else theta
    cols, rows = torch.nonzero((z > theta) & (z > 0), as_tuple=True)
    return sort_pairs(rows, cols, n_tokens=z.shape[1], n_latents=z.shape[0])


def sort_pairs(rows: Tensor, cols: Tensor, n_tokens: int, n_latents: int, values: Tensor | None = None) -> Selection:
    """Reorder (token, latent) pairs token-major (with their ``values``, if given)."""
    key, order = torch.sort(rows * n_latents + cols)
    rows = torch.div(key, n_latents, rounding_mode="floor")
    return Selection(
        rows=rows, cols=key - rows * n_latents, n_tokens=n_tokens, values=None if values is None else values[order]
    )
