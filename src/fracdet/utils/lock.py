"""One process at a time in a working folder: a training run, a PACS node's spool.

Two processes in one such folder do not fail; they interleave. A second ``fracdet train --resume`` of a run
that is still training trained beside it, each overwriting the other's checkpoints and metrics, and both
ended with exit 0; a second node on the same spool would analyse the files queued there twice and delete
the first one's half-received images as stale. :func:`exclusive` holds an advisory lock (``flock``) on the
folder itself, so nothing is written into it: the kernel releases the lock when its process ends, however
it ends, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["FolderInUseError", "exclusive"]


class FolderInUseError(RuntimeError):
    """Another process works in the folder; the message names the folder and what works there."""


@contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder`` (which must exist) for this process while the block runs.

    Raises:
        FolderInUseError: another process, or another open of it in this one, holds it; ``what`` names the
            kind of work (``"a training run"``) in the message.
    """
    folder = Path(folder)
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUseError(
                f"{folder} is in use by another process ({what}); wait for it to end, or choose another folder"
            ) from None
        yield folder
    finally:
        os.close(descriptor)  # closing the last descriptor releases the lock
