"""Keep freed memory in the process for reuse (glibc's malloc): decoding makes many short-lived
tensors of ever-changing sizes.

glibc serves a block above its mmap threshold (128 kB at first, raised as such blocks are freed)
with fresh pages from the kernel and hands them back on free, and every first touch of a fresh
page is a page fault. A decoding step's tensors change size at every step (the cache length
grows, finished sources leave), so the threshold never catches up and a decode spends much of
its system time in page faults. `keep_freed_memory()` fixes the threshold at its maximum (32 MB
on 64-bit) and raises the trim threshold, so blocks below 32 MB come back from the heap
(docs/history.md, "fewer page faults"). The cost: the process keeps
up to `trim_threshold` bytes of freed memory rather than returning it to the system.

The decoding commands call it; the Python API leaves the process's allocator alone unless
asked. Elsewhere than glibc (macOS, musl) it does nothing and returns False. Setting
MALLOC_MMAP_THRESHOLD_ in the environment (glibc's own knob) takes precedence.
"""
from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Set glibc's mmap and trim thresholds; True if both were set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
