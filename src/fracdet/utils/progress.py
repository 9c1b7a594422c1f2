"""Progress bars with rate and ETA on a terminal, quiet in logs and tests when asked."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

__all__ = ["progress", "progress_bar"]


def progress_bar(*, desc: str, total: int | None = None, unit: str = "img"):
    """A tqdm bar on stderr to ``update()`` by hand; ``FRACDET_PROGRESS=0`` switches bars off."""
    from tqdm.auto import tqdm

    disable = os.environ.get("FRACDET_PROGRESS", "1") == "0"
    return tqdm(desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True)


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    """Wrap ``iterable`` in a :func:`progress_bar`."""
    with progress_bar(desc=desc, total=total, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update(1)
