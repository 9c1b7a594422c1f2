"""Files written atomically (temporary file, fsync, rename): an interrupted write never leaves half a file.

Used for every file fracdet keeps (checkpoints, run records, tables, figures, reports, heatmaps, model
folders, packs), so it sits below every package.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_file", "atomic_write_bytes", "atomic_write_text", "save_figure", "write_json"]


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8."""
    return atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a library that writes files itself (matplotlib, Pillow, pandas):
    flushed to disk and renamed over ``path`` when the block ends, removed if it raises. Its name ends in
    ``.tmp`` (what a sweep for leftovers looks for), so a writer that picks its format by the suffix is told
    the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp), tmp):  # name the file meant, not ours
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise


def save_figure(fig: Any, path: str | Path, *, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically, in the format its suffix names, and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> Path:
    """Write JSON atomically (pretty-printed, keys in insertion order)."""
    return atomic_write_bytes(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
