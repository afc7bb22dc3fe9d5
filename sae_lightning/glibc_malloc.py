"""Keep freed large blocks in the process's heap (glibc), so that each training step's [B, F]
temporaries reuse pages already mapped instead of faulting in fresh ones.

glibc serves an allocation above ``M_MMAP_THRESHOLD`` (a few MiB, adjusted dynamically) with
its own ``mmap`` and returns it to the kernel on free; the next step's matrix of the same size
then touches new pages, and the kernel zeroes every one of them on first touch: a cost per
step proportional to the [B, F] temporaries' size. Raising the threshold (and the heap's trim
threshold) keeps those pages. The cost: the resident size does not shrink between steps, and
freed blocks are not always reusable for other sizes, so a wide dictionary's peak grows (both
measured in docs/performance.md, "Measured figures behind design choices in the code"). PyTorch's CPU tuning guide
reaches the same end with jemalloc or tcmalloc through ``LD_PRELOAD``; this needs no extra
library.

Applied by the entry points that train (``train.py``, sweep trials, the benchmarks), on Linux
with glibc only; ``SAE_LIGHTNING_MALLOC=system`` leaves the C allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc's malloc once per process; True if it was tuned."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SAE_LIGHTNING_MALLOC", "") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    return _applied
