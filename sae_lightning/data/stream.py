"""What every data kind shares: an endless training stream whose global batch i is a pure
function of i (so a run restarts exactly at a saved step, under any number of ranks and loader
workers), and the held-out tensors as the validation loader."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

# a training batch: tokens [B, d], or (tokens, their ∇ₓL) where the run ranks by gradients
Batch = Tensor | tuple[Tensor, Tensor]


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


class BatchStream(IterableDataset):
    """Endless training batches ``batch_of(i)`` for the global indices this rank and worker take."""

    def __init__(self, batch_of: Callable[[int], Batch], start: int, rank: int = 0, world: int = 1):
        self.batch_of, self.start, self.rank, self.world = batch_of, start, rank, world

    def __iter__(self) -> Iterator[Batch]:
        for i in batch_indices(self.start, self.rank, self.world):
            yield self.batch_of(i)


class StreamingDataModule(L.LightningDataModule):
    """The loaders of a data kind: a subclass gives ``batch_of`` (global batch i of the training
    stream, picklable for loader workers) and ``val_tensor``; ``batch_size`` and ``num_workers``
    are set by its constructor."""

    batch_size: int
    num_workers: int
    prefetch_factor: int | None = None  # batches each loader worker reads ahead

    def batch_of(self) -> Callable[[int], Batch]:
        raise NotImplementedError

    def val_tensor(self) -> Tensor:
        raise NotImplementedError

    def has_gradients(self) -> bool:
        """Whether the data hold ∇ₓL beside each token (only a cache harvested with gradients)."""
        return False

    def use_gradients(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} holds no gradients")

    def sample_gradients(self, n: int) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} holds no gradients")

    def position(self) -> int:
        """Batches this rank has trained on (the stream restarts there)."""
        t = self.trainer
        return t.global_step * t.accumulate_grad_batches if t is not None else 0

    def start_position(self) -> int:
        """Where the training stream starts: the position (a subclass may restore its own)."""
        return self.position()

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        stream = BatchStream(
            self.batch_of(), self.start_position(), t.global_rank if t else 0, t.world_size if t else 1
        )
        return DataLoader(
            stream,
            batch_size=None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(cast(Any, self.val_tensor()), batch_size=self.batch_size, shuffle=False)  # rows of a tensor
