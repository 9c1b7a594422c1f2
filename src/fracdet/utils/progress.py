"""Progress bars with rate and ETA on a terminal, quiet in logs and tests when asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress", "progress_bar"]


#: Seconds between two progress lines when stderr is not a terminal (a log file, a service's journal): a line
#: with the rate and ETA now and then, not a redrawn bar that writes a line per update into the log.
LOG_INTERVAL_S = 60.0


def progress_bar(*, desc: str, total: int | None = None, unit: str = "img", initial: int = 0):
    """A tqdm bar on stderr to ``update()`` by hand; ``FRACDET_PROGRESS=0`` switches bars off.

    On a terminal the bar redraws in place; elsewhere it writes a line at most every :data:`LOG_INTERVAL_S`.
    ``initial``: what was done before (a resumed epoch), counted in the position, not in the rate.
    """
    from tqdm.auto import tqdm

    disable = os.environ.get("FRACDET_PROGRESS", "1") == "0"
    terminal = sys.stderr.isatty()
    return tqdm(desc=desc, total=total, unit=unit, initial=initial, disable=disable, dynamic_ncols=terminal,
                mininterval=0.1 if terminal else LOG_INTERVAL_S, ncols=None if terminal else 100)  # fmt: skip


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    """Wrap ``iterable`` in a :func:`progress_bar`."""
    with progress_bar(desc=desc, total=total, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
