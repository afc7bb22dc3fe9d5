"""Training progress: its rate counts every process's tokens, as the trainer counts processes."""

from __future__ import annotations

from types import SimpleNamespace

from sae_lightning.callbacks.progress import Progress


def test_the_rate_uses_the_trainers_world_size(capsys):
    """devices=-1 or auto: only the trainer knows how many processes there are."""
    progress = Progress("lines", batch_size=1024)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, world_size=4, max_steps=10, progress_bar_metrics={})
    progress.on_train_start(trainer, None)
    assert progress.tokens_per_step == 4096
    trainer.global_step = 5
    progress._t0 -= 1.0  # one second ago
    assert 5 * 4096 / 1.1 < progress._rate(trainer) <= 5 * 4096
