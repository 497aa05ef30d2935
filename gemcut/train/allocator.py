"""Keep freed tensor memory in the process on Linux CPUs, so a training step does not page-fault it back.

    python -m pytest -q tests/test_allocator.py

glibc's malloc serves every block of 32 MiB or more (and, with its default dynamic threshold, many
smaller ones) with a fresh `mmap`, and `free` hands it straight back to the kernel. A training step
allocates the same large tensors every time (activations, and gradients: the word-embedding gradient of
all-MiniLM-L6-v2 alone is 47 MB, re-created at each backward pass), so each step faults every page of
them in again and the kernel zeroes each page first. In a profile of MiniLM fine-tuning on a 2-core CPU
the zero-fill of that one gradient took 20 ms a step, 2.3 GB/s where a warm memset runs several times
faster. The PyTorch CPU tuning guide's answer is to preload jemalloc or tcmalloc; `keep_freed_memory`
gets the same effect from glibc itself, with no extra dependency: `mallopt(M_MMAP_MAX, 0)` serves large
blocks from the heap, and a high `M_TRIM_THRESHOLD` stops `free` from returning the heap's top to the
kernel, so the next step reuses warm pages.

The cost: the process keeps its peak heap until it exits (a training process holds it anyway, step after
step). Nothing changes on a GPU's memory, on other C libraries (musl, macOS), or when
GEMCUT_KEEP_FREED_MEMORY=0 is set. `train()` calls this once, for CPU runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # return memory to the kernel only when 1 GiB lies free at the heap top

_applied = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says; True when it was (or already is) in effect."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("GEMCUT_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success. A high trim threshold alone is harmless if M_MMAP_MAX is then refused.
    if mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) != 1 or mallopt(M_MMAP_MAX, 0) != 1:
        log.debug("mallopt refused; freed memory goes back to the kernel as usual")
        return False
    _applied = True
    return True
