"""The C allocator's settings: keep freed memory for reuse (opt-in, process-wide).

glibc returns big freed buffers to the system and page-faults them in again on the next
forward; ``keep_freed_memory()`` tells glibc to keep them (the same effect as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment).  It is opt-in
because the process then keeps its peak memory for its whole life.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
#: glibc's own M_MMAP_MAX: how many blocks it serves with mmap at once
_GLIBC_MMAP_MAX = 65536
#: The smallest block ``returning_freed_memory`` maps apart: from 128 kB on (glibc's first
#: threshold), paths with medium-sized temporaries paid for fresh pages in their timing that
#: they do not pay when they run, and lost to others (the 28 x 28 net's last layer: "premix"
#: to "inline", 4 % on its training step); from 32 MB on, resnet50's timing still fragmented
#: the heap (peak 1524-1727 MB against 1275-1341 at 8 MB).
_MAPPED_BYTES = 8 << 20
_allocator_applied: dict | None = None


def _glibc() -> ctypes.CDLL | None:
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        return ctypes.CDLL("libc.so.6")
    return None


def keep_freed_memory(trim_threshold: int = 2**31 - 1) -> dict:
    """Make glibc keep freed memory for reuse instead of unmapping it (opt-in, process-wide).

    Every KW forward allocates per-sample kernels of tens to hundreds of megabytes; by
    default glibc serves such blocks with mmap and unmaps them on free, so the next forward
    page-faults every page again.  ``mallopt(M_MMAP_MAX, 0)`` serves them from the heap and
    ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` stops glibc from giving the heap back, which
    is what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes>`` in the environment does.  The
    price: the process keeps its peak memory.  It helps plain models too, so benchmarks must
    run both models under the same setting.  Returns ``allocator_settings()``; does nothing
    (and says so) where the C library is not glibc.
    """
    global _allocator_applied
    libc = _glibc()
    if libc is not None:
        trim = min(int(trim_threshold), 2**31 - 1)  # mallopt takes an int
        if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, trim) != 1:
            raise OSError("mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD")
        _allocator_applied = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": trim}
    return allocator_settings()


def allocator_settings() -> dict:
    """What the C allocator runs with: glibc's environment variables and ``keep_freed_memory``."""
    names = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX", "LD_PRELOAD")
    return {"libc": "-".join(platform.libc_ver()) or "unknown",
            "environment": {name: os.environ[name] for name in names if name in os.environ},
            "mallopt": _allocator_applied}


def keeps_freed_memory() -> bool:
    """Whether glibc keeps freed memory in this process (``keep_freed_memory()``, or
    ``MALLOC_MMAP_MAX_=0`` in the environment)."""
    return _allocator_applied is not None or os.environ.get("MALLOC_MMAP_MAX_") == "0"


@contextlib.contextmanager
def returning_freed_memory() -> Iterator[None]:
    """Inside the block glibc serves blocks of 8 MB and more with mmap again and gives them back
    when they are freed, where ``keep_freed_memory()`` keeps them; outside it nothing changes.

    For work done once whose big temporaries must not stay in the heap: timing a KW layer's
    paths allocates each path's outputs and kernels a few times over, and kept, they left the
    heap fragmented at the size of the timing's peak for the life of the process (resnet50 at
    batch 8, two training steps in fresh processes: peak 1659-1837 MB above the built model,
    1275-1341 with the timing's big blocks mapped apart, plain 1109-1246).  The paths then
    chosen (no ``grouped`` or ``bmm`` on its first layers) stepped 0.95x the time, interleaved.
    """
    libc = _glibc()
    if libc is None or not keeps_freed_memory():
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _MAPPED_BYTES)
    libc.mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, 0)
