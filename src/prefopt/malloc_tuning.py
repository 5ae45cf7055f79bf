"""Keep freed tensor memory in the process instead of returning it to the kernel (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
unmaps it on free. A training step allocates and frees the same large buffers over and over:
[rows, T, hidden] activations, [chunk, V] logits, gradients. Each new mapping is zero-filled by
the kernel page by page on first touch. On the benchmark's smol135 step that meant about
2 million minor page faults per step and a fifth of the CPU time spent in the kernel.

`mallopt(M_MMAP_MAX, 0)` serves large blocks from the heap instead, and a high
`M_TRIM_THRESHOLD` keeps freed blocks there for reuse. It is the in-process form of
`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...` (docs/benchmarks.md, "Allocator"). The cost is
peak RSS: 4-7% higher on that benchmark (17% in its leanest setting), because memory freed late
in a step is not handed back. Other C libraries (musl), macOS and Windows are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Bytes of free memory at the top of the heap kept before trimming (mallopt takes an int)."""

_applied = False


def keep_freed_memory() -> bool:
    """Apply the glibc settings above once per process; True if they are in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success.
    _applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if _applied:
        logger.debug("glibc malloc: large blocks from the heap, freed memory kept for reuse")
    return _applied
