"""Handing freed heap memory back to the operating system after a long read.

Reading a prompt allocates large temporaries per model call (activations of a 2048-token chunk are tens of MB).
glibc's malloc serves allocations below its mmap threshold from the heap, and that threshold rises as large
blocks are freed, so after a long read much of the freed memory stays in the process: measured on the embedded
model, 98-150 MiB at 32K-64K tokens (`malloc_trim` returned it), about 3 KiB per token read. A chat that reads
documents for hours should not carry that, so `Engine.feed` releases it after each multi-token feed: one
`malloc_trim(0)`, well under a millisecond, once per prompt (never per decoded token).

Only glibc has `malloc_trim`; with another C library `release_free_memory` does nothing and says so by its
return value (`AVAILABLE` is False): that allocator's own policy then decides, and nothing else changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_TRIM = _malloc_trim()
AVAILABLE = _TRIM is not None


def release_free_memory() -> bool:
    """Return the heap's free pages to the operating system; False where the C library cannot (not glibc)."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True
