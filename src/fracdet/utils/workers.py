"""How many threads CPU-bound helpers use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["opencv_on_calling_threads", "worker_count"]


def worker_count() -> int:
    """Threads for decoding, matching and scoring (folder decoders, server workers): ``FRACDET_WORKERS``, else
    the cores this process may use."""
    if env := os.environ.get("FRACDET_WORKERS"):
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def opencv_on_calling_threads() -> Iterator[None]:
    """Within the block, each OpenCV function runs on the thread that calls it, not spread over OpenCV's own
    pool (one thread per core); the pool's size is restored afterwards.

    For work that already runs on :func:`worker_count` threads side by side: there OpenCV's pool only adds
    threads that compete with the workers for the same cores (the duplicate search's workers spent about twice
    as long off the CPU with it: ``docs/BENCHMARKS.md``, *The duplicate search's workers kept busy*). OpenCV's
    setting is the process's, so a block that calls this should be the only OpenCV user of the process while
    it runs (an audit, a split), not a server's request.
    """
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(0)  # 0: no parallel regions at all (OpenCV's documented "run sequentially")
    try:
        yield
    finally:
        cv2.setNumThreads(before)
