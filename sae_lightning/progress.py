"""Progress of long work outside a Lightning run (harvest): a tqdm bar on a terminal, a plain
line every 30 s in a log file. ``callbacks/progress.py`` shows training's with the same pieces."""

from __future__ import annotations

import sys
import time


def format_eta(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class PlainProgress:
    """What a tqdm bar shows, as a plain line at most every ``every_seconds`` (and at the end):
    for log files, where a bar writes a carriage-return update per refresh. Has the tqdm calls
    the harvest uses (``update``, ``set_postfix``, ``close``, ``total``)."""

    def __init__(self, desc: str, total: int, initial: int = 0, unit: str = "tok", every_seconds: float = 30.0):
        self.desc, self.total, self.n, self.unit, self.every = desc, total, initial, unit, every_seconds
        self._n0, self._t0 = initial, time.perf_counter()
        self._last, self._postfix, self._closed = self._t0, "", False

    def update(self, n: int) -> None:
        self.n += n
        if time.perf_counter() - self._last >= self.every:
            self._print()

    def set_postfix(self, refresh: bool = False, **values) -> None:
        self._postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def _print(self) -> None:
        elapsed = time.perf_counter() - self._t0
        rate = (self.n - self._n0) / max(elapsed, 1e-9)
        eta = f", ETA {format_eta((self.total - self.n) / rate)}" if rate > 0 and self.n < self.total else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f", {self._postfix}" if self._postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}{share}, {rate:.0f} {self.unit}/s{eta}{post}", flush=True)
        self._last = time.perf_counter()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._print()


def resolve_mode(mode: str) -> str:
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return mode


def progress_bar(desc: str, enabled: bool, total: int, initial: int):
    """A tqdm bar on a terminal, plain lines every 30 s in a log file, nothing when disabled."""
    if enabled and not sys.stderr.isatty():
        return PlainProgress(desc, total, initial)
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="tok",
        unit_scale=True,
        desc=desc,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.1,
    )
