"""Freed memory kept for reuse instead of handed back to the kernel (glibc's malloc).

Why: every message builds a fresh optimizer, so a client step allocates momentum
buffers and weight-decay temporaries about twice the model's size, and the server
allocates a new global model every round. glibc serves each block above a threshold
that starts at 128 KiB with its own ``mmap`` and unmaps it on ``free``, and trims the
heap's free top, so the next message faults in and zeroes all those pages again, and a
client step is slower by that work (``python benchmarks/allocator_benchmark.py`` counts
the faults and times both settings; docs/performance.md). A preloaded jemalloc or tcmalloc would
keep them too; two ``mallopt`` calls do it without another library.

Blocks up to 32 MiB (glibc's largest threshold on 64-bit) come from the heap; larger
ones (data sets, evaluation activations) still go back to the kernel when freed. A
process thus keeps at most its peak of heap blocks, plus a free top of up to 1 GiB.
Results do not change: only where memory comes from does.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's malloc.h: free top kept before the heap is trimmed
M_MMAP_THRESHOLD = -3  # glibc's malloc.h: blocks from then on get their own mmap
MMAP_THRESHOLD = 32 << 20  # glibc's upper limit for it on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30

_kept: bool | None = None  # the outcome of the first call in this process


def glibc_version() -> str:
    """``"glibc 2.36"``-like on glibc, "" elsewhere (macOS, musl, Windows)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        return ""


def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; True when glibc took both, False when this
    is not glibc (nothing changes there). Idempotent and cheap after the first call."""
    global _kept
    if _kept is None:
        _kept = _set_thresholds()
    return _kept


def _set_thresholds() -> bool:
    if not glibc_version().startswith("glibc"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; setting either also stops glibc from moving both
    # thresholds by itself (it raises them as mmapped blocks are freed)
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and (
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    )
