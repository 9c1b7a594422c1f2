"""How a batch command's process keeps the memory it frees: glibc's malloc told to hold on to it.

A cold audit spends a sixth of its time in the kernel (``docs/BENCHMARKS.md``, *Two exact cuts in the
duplicate search*): its worker threads allocate and free large temporaries (matcher arrays, aligned images,
tensors) thousands of times, and glibc hands each freed block back to the system, so the next one is
zero-filled page by page again (6.5 million minor page faults in one multiregion audit). Raising malloc's
mmap threshold (blocks below it come from the heap, not fresh mappings) and its trim threshold (a heap
keeps that much free memory instead of returning it) lets those blocks be reused, at the price of a
higher resident size while the command runs.

The setting belongs to the whole process and cannot be undone (glibc then stops adapting its mmap
threshold), so only a command that owns its process applies it (``fracdet audit``, ``fracdet split`` and
``fracdet train`` run from a shell, not ``fracdet.cli.main`` called from Python), never the library on
import and never a server.
Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

__all__ = ["TRAINING_THRESHOLDS", "keep_freed_memory"]

log = logging.getLogger(__name__)

#: mallopt's parameter numbers (glibc's <malloc.h>).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap. glibc's own threshold adapts only up to 32 MiB, and blocks
#: above it are mapped afresh every time (a 40 MiB block allocated and freed 20 times on the main thread
#: and 20 on a worker: 409,645 page faults, against 20,441 with this; docs/BENCHMARKS.md says how).
MMAP_THRESHOLD = 64 * 1024 * 1024
#: A heap keeps up to this much freed memory rather than returning it.
TRIM_THRESHOLD = 1024 * 1024 * 1024
#: The thresholds for training on a CPU, whose activations and gradients are single blocks of hundreds of
#: MiB (the fused recipe at 320 px: 32 radiographs and their copies at once): below 64 MiB they would still
#: be mapped and zero-filled afresh every step (300,000 page faults a second, half the run's time in the
#: kernel; docs/BENCHMARKS.md, *Training on a CPU keeps the memory it frees*). mallopt takes a C int.
TRAINING_THRESHOLDS = {"mmap_threshold": 1024 * 1024 * 1024, "trim_threshold": 2**31 - 1}
#: The variables with which a user sets these thresholds: theirs are then kept.
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Tell this process's malloc to reuse what it frees (see the module docstring); ``True`` if it took.

    Does nothing (``False``) off glibc, or where the user set malloc's thresholds in the environment.
    """
    if platform.libc_ver()[0] != "glibc" or any(name in os.environ for name in USER_SETTINGS):
        return False
    libc = ctypes.CDLL(None)
    # mmap first: setting the trim threshold alone would freeze the mmap threshold at its 128 KiB start.
    done = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    log.debug("malloc keeps freed memory: %s (blocks up to %d MiB from the heap)", done, mmap_threshold >> 20)
    return done
