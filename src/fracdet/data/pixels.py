"""Decoded, resized pixels for training and evaluation, cached so an epoch never waits on JPEG decoding.

Every image becomes one square grey ``uint8`` array at the model's input size, resized the way the paper
does it (the whole radiograph squashed to a square, no crop, so nothing near the border is lost). The
arrays are cached by content hash and size in the feature cache, so the second run of any command, and
every epoch of a training run, reads them instead of decoding JPEGs.

A table's images are handed out memory-mapped from a *pixel store*: one ``.npy`` file per ordered list of
contents and size, under ``pixels/`` in the cache folder, written once from the cache a chunk at a time.
The operating system pages in what an epoch reads, so an archive larger than memory trains in bounded
memory, every data-loading process shares one copy, and a rerun on the same table starts without reading
the cache at all.

Unreadable files (truncated, corrupt, missing) are not fatal: they are left out and listed, so that one bad
file never loses a training run; :func:`load_pixels` returns which rows it kept.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from fracdet.data.decode import ImageReadError, read_image
from fracdet.data.features import hash_files
from fracdet.data.table import absolute_paths
from fracdet.utils.cache import FeatureCache
from fracdet.utils.progress import progress_bar
from fracdet.utils.workers import worker_count

__all__ = ["PixelSet", "load_pixels", "resize_display", "resize_square"]

log = logging.getLogger(__name__)


def resize_square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Float grey pixels in [0, 1] -> ``size`` x ``size`` uint8 (area averaging when shrinking)."""
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=2)
    shrinking = pixels.shape[0] >= size and pixels.shape[1] >= size
    resized = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


def resize_display(pixels: np.ndarray, longest: int) -> np.ndarray:
    """Float grey pixels in [0, 1] -> uint8 whose longest side is at most ``longest``, in their own aspect
    ratio (what a reader is shown: a radiograph squashed to a square distorts the anatomy)."""
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=2)
    h, w = pixels.shape
    scale = min(1.0, longest / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resized = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA) if scale < 1 else pixels
    return np.clip(np.rint(resized * 255.0), 0, 255).astype(np.uint8)


@dataclass
class PixelSet:
    """Images of a table ready for a model.

    Attributes:
        images: ``(N, size, size)`` uint8 grey pixels, one per kept row.
        table: the kept rows of the input table, in the same order (index reset).
        skipped: ``path, reason`` of rows left out because they could not be read.
    """

    images: np.ndarray
    table: pd.DataFrame
    skipped: pd.DataFrame


def _decode(path: Path, size: int) -> np.ndarray:
    return resize_square(read_image(path), size)


def load_pixels(
    table: pd.DataFrame,
    size: int,
    *,
    cache: FeatureCache | None = None,
    desc: str = "decoding",
    in_memory: bool = False,
) -> PixelSet:
    """Decode and resize every file of ``table`` (cached by content and size).

    With a working cache the images come memory-mapped from a pixel store (see the module docstring), so
    a table larger than memory loads, and trains, in bounded memory; without one (``--no-cache``, a cache
    that cannot be written) or with ``in_memory`` they are held in memory.

    Args:
        table: a sample table (``table.attrs["root"]`` holds the dataset root).
        size: side of the square output.
        cache: where arrays are kept between runs; ``None`` uses the default feature cache.
        desc: label of the progress bar.
        in_memory: hold the images in this process's memory instead of mapping a store.
    """
    cache = cache if cache is not None else FeatureCache()
    paths = absolute_paths(table)
    # None where the file cannot be read (pandas may hold it as NaN)
    keys = [k if isinstance(k, str) else None for k in hash_files(paths, desc="hashing")["sha256"]]
    path_of = {k: p for k, p in zip(keys, paths, strict=True) if k}
    kind = f"pixels{size}"
    errors = {k: v.decode() for k, v in cache.get_many(_ERROR_KIND, path_of).items()}
    stored = cache.contains(kind, [k for k in path_of if k not in errors])
    todo = sorted((k, p) for k, p in path_of.items() if k not in errors and k not in stored)
    held = _decode_missing(cache, kind, todo, size, errors, desc)  # what the cache could not keep
    keep, skipped = [], []
    for row, key in enumerate(keys):
        if key is None:
            skipped.append((table["path"].iloc[row], "file not found or not readable"))
        elif key in errors:
            skipped.append((table["path"].iloc[row], errors[key]))
        else:
            keep.append(row)
    if skipped:
        log.warning("left out %d unreadable files, e.g. %s (%s)", len(skipped), *skipped[0])
    kept_keys = [keys[row] for row in keep]
    images = None
    if cache.writable and not held and not in_memory:
        images = _open_store(cache, kind, kept_keys, size, path_of)
    if images is None:
        images = np.zeros((len(keep), size, size), np.uint8)
        _fill(images, cache, kind, kept_keys, size, path_of, held)
    kept = table.iloc[keep].reset_index(drop=True)
    kept.attrs.update(table.attrs)
    return PixelSet(images, kept, pd.DataFrame(skipped, columns=["path", "reason"]))


_ERROR_KIND = "pixel-errors"  # failures are cached too: a bad file stays bad
_CHUNK = 256  # images decoded or copied between two writes: memory stays bounded whatever the table's size
STORE_VERSION = 1
#: Pixel stores kept in a cache (the most recently used); older ones are deleted when a new one is written.
STORES_KEPT = 16


def _decode_missing(
    cache: FeatureCache, kind: str, todo: list[tuple[str, Path]], size: int, errors: dict[str, str], desc: str
) -> dict[str, bytes]:
    """Decode ``todo`` into the cache chunk by chunk, failures into ``errors``; return what the cache could
    not store (it is disabled or its disk is full), which must then be held in memory."""
    held: dict[str, bytes] = {}
    if not todo:
        return held
    with ThreadPoolExecutor(worker_count()) as pool, progress_bar(desc=desc, total=len(todo)) as bar:
        for start in range(0, len(todo), _CHUNK):
            chunk = todo[start : start + _CHUNK]
            fresh, failed = [], []
            for (key, _), future in zip(chunk, [pool.submit(_decode, p, size) for _, p in chunk], strict=True):
                try:
                    fresh.append((key, future.result().tobytes()))
                except ImageReadError as exc:
                    failed.append((key, str(exc).split(": ", 1)[-1].encode()))
                bar.update(1)
            cache.put_many(kind, fresh)
            cache.put_many(_ERROR_KIND, failed)
            errors.update((k, v.decode()) for k, v in failed)
            if not cache.writable:
                held.update(fresh)
    return held


def _fill(
    out: np.ndarray,
    cache: FeatureCache,
    kind: str,
    keys: list[str],
    size: int,
    path_of: dict[str, Path],
    held: dict[str, bytes] | None = None,
) -> None:
    """Copy the cached arrays of ``keys`` into ``out`` row by row, a chunk at a time. An entry the cache no
    longer trusts (its checksum failed) is decoded again."""
    held = held or {}
    for start in range(0, len(keys), _CHUNK):
        chunk = keys[start : start + _CHUNK]
        found = {k: held[k] for k in chunk if k in held}
        found.update(cache.get_many(kind, [k for k in chunk if k not in found]))
        again = [(k, _decode(path_of[k], size).tobytes()) for k in dict.fromkeys(chunk) if k not in found]
        cache.put_many(kind, again)
        found.update(again)
        for i, key in enumerate(chunk, start):
            out[i] = np.frombuffer(found[key], np.uint8).reshape(size, size)


def _open_store(
    cache: FeatureCache, kind: str, keys: list[str], size: int, path_of: dict[str, Path]
) -> np.ndarray | None:
    """The images of ``keys``, in order, memory-mapped from the cache's pixel store, written first if absent.

    A store is one ``.npy`` file per ordered list of contents and size, beside a BLAKE2 checksum that is
    checked whenever it is opened (a damaged store is written again, as a damaged cache entry is recomputed).
    It is opened copy-on-write: what a caller writes into the array stays in its memory, never in the file.
    Returns ``None`` when the store cannot be written (a full disk): the caller holds the images in memory.
    """
    digest = hashlib.blake2b(f"{STORE_VERSION}:{kind}:{','.join(keys)}".encode(), digest_size=16).hexdigest()
    path = cache.directory / "pixels" / f"{kind}-{len(keys)}-{digest}.npy"
    sidecar = path.with_suffix(".blake2b")
    if path.exists():
        if sidecar.exists() and _file_checksum(path) == sidecar.read_text().strip():
            os.utime(path)  # most recently used: the last to be deleted
            return np.load(path, mmap_mode="c")
        log.warning("pixel store %s failed its checksum; writing it again", path.name)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(keys), size, size))
        _fill(images, cache, kind, keys, size, path_of)
        images.flush()
        del images
        sidecar.write_text(_file_checksum(tmp))
        tmp.replace(path)  # atomic: a reader sees no store or a whole one
    except OSError as exc:
        log.warning("pixel store %s: cannot write (%s); holding the images in memory", path.parent, exc)
        tmp.unlink(missing_ok=True)
        return None
    _evict(path.parent)
    return np.load(path, mmap_mode="c")


def _file_checksum(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _evict(directory: Path) -> None:
    """Delete all but the :data:`STORES_KEPT` most recently used stores (a process that has one open keeps
    reading it: the file goes when the last map of it closes), and temporary files of writes that died."""
    stores = sorted(directory.glob("*.npy"), key=lambda p: p.stat().st_mtime, reverse=True)
    stale = [p for p in directory.glob("*.tmp") if time.time() - p.stat().st_mtime > 3600]
    for path in stores[STORES_KEPT:] + stale:
        with suppress(OSError):
            path.unlink()
            path.with_suffix(".blake2b").unlink(missing_ok=True)
