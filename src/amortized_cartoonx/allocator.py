"""The C allocator's settings for CPU runs (no torch import: the command line calls this before anything heavy).

A CPU optimizer step allocates and frees tensors of 10-50 MB (noise, mixed coefficients, decoded images). By
default glibc's ``malloc`` gives blocks of that size back to the kernel as soon as they are freed, so every step
pays for fresh pages again (page faults and zeroing). :func:`tune_cpu_allocator` makes it keep them.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameters (``malloc.h``).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
#: What :func:`tune_cpu_allocator` sets: blocks up to 32 MiB (glibc's largest mmap threshold) come from the heap,
#: the heap is not trimmed below 16 GiB of free memory, and it grows in 256 MiB steps.
TUNED_SETTINGS = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 16 << 30), (M_TOP_PAD, 256 << 20))
#: ``CARTOONX_ALLOCATOR=default`` in the environment keeps glibc's defaults.
ENV_VAR = "CARTOONX_ALLOCATOR"

_tuned = False


def tune_cpu_allocator() -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse instead of returning it to the kernel; True if applied.

    Most useful to the exact optimizer at many noise samples per step; measured in docs/results.md (2026-12-01,
    seventh session). A long-running process gets part of it on its own, as glibc raises its mmap threshold after
    large frees. The price: the process keeps the heap it once used (freed memory stays reserved for it), as
    PyTorch's GPU caching allocator does. The ``cartoonx`` command calls this at start; Python users may call it
    once. Process-wide, so never done on import. A no-op returning False off glibc Linux or with
    ``CARTOONX_ALLOCATOR=default``.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux") or os.environ.get(ENV_VAR, "tuned") == "default":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    refused = [param for param, value in TUNED_SETTINGS if mallopt(param, value) != 1]
    if refused:
        logger.debug("mallopt refused the parameters %s; glibc keeps its defaults for them", refused)
    _tuned = not refused
    return _tuned
