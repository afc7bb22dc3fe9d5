"""Checkpoints written to a temporary file and renamed into place: a crash mid-write
leaves the previous checkpoint intact, never a half-written one. What is written must open again
with the weights-only loader (checkpoint_file.check_plain): a checkpoint never needs pickle."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..atomic import atomic_path
from ..checkpoint_file import check_plain


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        check_plain(checkpoint)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
