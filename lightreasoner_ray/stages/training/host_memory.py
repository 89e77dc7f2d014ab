"""Host memory of CPU training workers: give freed tensors back to the system.

glibc's malloc serves allocations below its mmap threshold from heaps that it rarely
returns to the system, and it raises that threshold (up to 32 MB) each time a larger block
is freed. A training step frees many activation tensors of a few hundred kilobytes to a few
megabytes in an order the heap cannot coalesce, so a CPU worker's resident memory grew by
0.4-0.8 GB an update at the full-depth 1.5B (LoRA, ZeRO-3) and reached 1.5-2 GB above what
its tensors needed. A fixed threshold makes every block at or above it a private mapping that
goes back to the system when freed. Measured there: the resident memory between updates
stayed flat (3.6 GB), the speed within 5%.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
# Blocks of at least this many bytes are mapped on their own and unmapped when freed.
MMAP_THRESHOLD_BYTES = 64 * 1024
# The environment variable through which glibc reads the same setting at start-up.
ENV_OVERRIDE = "MALLOC_MMAP_THRESHOLD_"


def glibc() -> bool:
    """Whether this process runs on glibc's allocator (Linux, not musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "gnu_get_libc_version")
    except OSError:
        return False


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold for this process; whether it took effect.

    Does nothing outside glibc (macOS, musl) or when ``MALLOC_MMAP_THRESHOLD_`` is set (the
    user's own choice wins).
    """
    if ENV_OVERRIDE in os.environ or not glibc():
        return False
    mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
    if not applied:
        logger.debug("mallopt(M_MMAP_THRESHOLD, %d) was refused", threshold)
    return applied
