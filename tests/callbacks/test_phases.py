"""ValidationTimer: a validation's time runs to its very end (the downstream loss works there)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from sae_lightning.callbacks.phases import ValidationTimer


def trainer(fn: str):
    return SimpleNamespace(state=SimpleNamespace(fn=fn))


def test_work_at_the_end_of_a_validation_counts_as_validation():
    timer = ValidationTimer()
    timer.on_validation_epoch_start(trainer("fit"), None)
    time.sleep(0.05)  # what the hooks before the timer's own on_validation_end do: the downstream loss, figures
    timer.on_validation_end(trainer("fit"), None)
    assert timer.seconds >= 0.05


def test_the_final_validation_is_not_counted_here():
    timer = ValidationTimer()
    timer.on_validation_epoch_start(trainer("validate"), None)
    timer.on_validation_end(trainer("validate"), None)
    assert timer.seconds == 0.0


def test_the_timer_ends_the_callbacks_of_a_run():
    """train.py lists it after every callback that works at a validation's end."""
    import inspect

    from sae_lightning import train

    source = inspect.getsource(train._trainer)
    assert source.index("DownstreamLoss.of(") < source.index("        timer,")
