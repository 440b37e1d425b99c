"""The C allocator's settings: keep freed memory for reuse (opt-in, process-wide).

glibc returns big freed buffers to the system and page-faults them in again on the next
forward; ``keep_freed_memory()`` tells glibc to keep them (the same effect as
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...`` in the environment).  It is opt-in
because the process then keeps its peak memory for its whole life.
"""
from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_applied: dict | None = None


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
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
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
