"""Decoded, resized pixels for training and evaluation, cached so an epoch never waits on JPEG decoding.

Every image becomes one square grey ``uint8`` array at the model's input size, resized the way the paper
does it (the whole radiograph squashed to a square, no crop, so nothing near the border is lost). The
arrays are cached by content hash and size in the feature cache, so the second run of any command, and
every epoch of a training run, reads them from memory instead of decoding JPEGs.

Unreadable files (truncated, corrupt, missing) are not fatal: they are left out and listed, so that one bad
file never loses a training run; :func:`load_pixels` returns which rows it kept.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
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
) -> PixelSet:
    """Decode and resize every file of ``table`` (cached by content and size).

    Args:
        table: a sample table (``table.attrs["root"]`` holds the dataset root).
        size: side of the square output.
        cache: where arrays are kept between runs; ``None`` uses the default feature cache.
        desc: label of the progress bar.
    """
    cache = cache if cache is not None else FeatureCache()
    paths = absolute_paths(table)
    # None where the file cannot be read (pandas may hold it as NaN)
    keys = [k if isinstance(k, str) else None for k in hash_files(paths, desc="hashing")["sha256"]]
    kind, error_kind = f"pixels{size}", "pixel-errors"  # failures are cached too: a bad file stays bad
    found = cache.get_many(kind, [k for k in keys if k])
    errors = {k: v.decode() for k, v in cache.get_many(error_kind, [k for k in keys if k and k not in found]).items()}
    todo = sorted({k: p for k, p in zip(keys, paths, strict=True) if k and k not in found and k not in errors}.items())
    if todo:
        fresh, failed = [], []
        with ThreadPoolExecutor(worker_count()) as pool, progress_bar(desc=desc, total=len(todo)) as bar:
            futures = {key: pool.submit(_decode, path, size) for key, path in todo}
            for key, future in futures.items():
                try:
                    fresh.append((key, future.result().tobytes()))
                except ImageReadError as exc:
                    failed.append((key, str(exc).split(": ", 1)[-1].encode()))
                bar.update(1)
        cache.put_many(kind, fresh)
        cache.put_many(error_kind, failed)
        found.update(fresh)
        errors.update((k, v.decode()) for k, v in failed)
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
    images = np.zeros((len(keep), size, size), np.uint8)
    for i, row in enumerate(keep):
        images[i] = np.frombuffer(found[keys[row]], np.uint8).reshape(size, size)
    kept = table.iloc[keep].reset_index(drop=True)
    kept.attrs.update(table.attrs)
    return PixelSet(images, kept, pd.DataFrame(skipped, columns=["path", "reason"]))
