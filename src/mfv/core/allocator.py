"""Keep freed memory in the process instead of handing it back to the kernel at every free.

glibc's malloc serves every block above its mmap threshold (at most 32 MB) with a fresh mapping
and unmaps it when freed. A vision network's activations at a batch of 8-32 images are such
blocks, so every step of a scan, an optimization or an evaluation maps them anew and the kernel
zero-fills each page on first touch: on the quiet 2-core CPU, 6 steps of Lite0's
forward+backward at batch 24 took 4.3-8.9 s of system time and 1.6-2.8 M page faults, against
0.1 s and 0.05 M with freed memory kept: 1.49x less CPU time, 1.5-2.2x less wall time
(`python benchmarks/allocator.py`). `keep_freed_memory` switches that off for this process (and
the processes it forks) the way the `MALLOC_MMAP_MAX_` / `MALLOC_TRIM_THRESHOLD_` environment
variables would. The price is a larger resident heap, so `release_free_memory` hands its free
pages back between stages (once a stage, not once a step; it changes no setting).

A process-wide setting is its owner's choice: the `mfv` command and mfv's Ray workers call
`keep_freed_memory`; a library call (`mfv.run`, `mfv.sweep`) never does, so a Python caller who
wants the speed calls `mfv.core.allocator.keep_freed_memory()` once, before the runs.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_MAX = -4
KEEP = 2**31 - 1  # the largest trim threshold mallopt takes: never trim
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TOP_PAD_", "GLIBC_TUNABLES", "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to serve large blocks from its heap and never trim it; whether it
    was done (not on other C libraries, nor when the user configured the allocator through the
    environment, whose choice wins)."""
    libc = _glibc()
    if libc is None or any(name in os.environ for name in USER_SETTINGS):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP))


def release_free_memory() -> None:
    """Return the heap's free pages to the kernel (glibc's malloc_trim), e.g. when a stage ends
    and the next one allocates blocks of other sizes; elsewhere nothing."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (whose malloc these calls tune), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    return ctypes.CDLL(None)
