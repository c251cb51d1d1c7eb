"""Keep freed memory inside the process during CPU training (Linux, glibc).

A training step allocates and frees the same large buffers (activations, logits, gradients) every step. glibc
serves blocks above its mmap threshold with fresh ``mmap`` calls and hands them back to the kernel on ``free``, so
every step pays a page fault for each page it touches again: on opt-small with batch 16 x 128, a fifth of the CPU
time of a step was system time, 570 ms per step against 445 ms with the setting below (benchmarks/results,
docs/performance.md). Turning off ``mmap`` for ``malloc`` and never trimming the heap keeps those pages; the price
is that the process holds on to its peak memory until it exits, which a training process does anyway.
"""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to reuse freed memory instead of returning it to the kernel; True if it took effect.

    A no-op elsewhere (macOS, Windows, musl) and when ``QUANTIZABLE_KEEP_FREED_MEMORY=0``.
    """
    if sys.platform != "linux" or os.environ.get("QUANTIZABLE_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
