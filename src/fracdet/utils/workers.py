"""How many threads CPU-bound helpers use."""

from __future__ import annotations

import os

__all__ = ["worker_count"]


def worker_count() -> int:
    """Threads for decoding, matching and scoring (folder decoders, server workers): ``FRACDET_WORKERS``, else
    the cores this process may use."""
    if env := os.environ.get("FRACDET_WORKERS"):
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)
