"""Which batches of a global stream this process trains: shared by every data kind."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def batch_indices(start: int, rank: int = 0, world: int = 1) -> Iterator[int]:
    """Global batch indices for this rank (and, inside a DataLoader worker, this worker).

    Rank r of a world of W takes global batches r, r + W, r + 2W, ... from its ``start``-th on;
    the loader's N workers take every N-th of those, which the DataLoader interleaves back in
    order. So a stream whose batch i is a pure function of i restarts exactly at a saved step,
    no two ranks or workers train on the same batch, and the order does not depend on N."""
    info = torch.utils.data.get_worker_info()
    wid, nw = (info.id, info.num_workers) if info else (0, 1)
    q = start + wid  # this rank's q-th batch
    while True:
        yield q * world + rank
        q += nw
