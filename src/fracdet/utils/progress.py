"""Progress bars with rate and ETA on a terminal, quiet in logs and tests when asked."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "img") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr; ``FRACDET_PROGRESS=0`` switches bars off."""
    from tqdm.auto import tqdm

    disable = os.environ.get("FRACDET_PROGRESS", "1") == "0"
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True)
