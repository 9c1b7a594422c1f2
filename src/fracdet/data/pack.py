"""A compact copy of a dataset for moving it to a training machine (a lent GPU, a cloud box).

Every readable image is shrunk (never enlarged, aspect ratio kept) until its shorter side is at most
``size``, stored as grey lossy WebP (or JPEG), and listed in ``manifest.csv`` with its label, group, split
and metadata. Measured on the 3,421 train + val files of FracAtlas at 384 px (``fracdet pack
../shared/data/fracatlas --splits splits/fracatlas_seed0.csv --only train val --out DIR [--quality 80]``):
28.3 MiB at WebP quality 90, with a mean re-encoding error of 0.71 grey levels (of 255), and 16.4 MiB at
quality 80 with 1.00 (what ``scripts/gpu_prepare.sh`` uses); the original JPEGs of all 4,083 files take
91 MiB. ``PACK.json`` records each pack's own figures.

Each packed file keeps the *original relative path and name*, even though its bytes are now WebP (every
fracdet reader recognises images by content, not by extension). That is what makes the copy useful: a
run trained on the pack saves a ``splits.csv`` whose paths are the original dataset's, so the run is then
evaluated on the untouched originals with ``fracdet evaluate RUN --data ORIGINAL``.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from fracdet.data.decode import ImageReadError, read_image
from fracdet.data.sources import ANNOTATION_COLUMNS
from fracdet.data.table import absolute_paths
from fracdet.utils.atomic import atomic_file, atomic_write_bytes, atomic_write_text
from fracdet.utils.progress import progress_bar
from fracdet.utils.workers import worker_count

__all__ = ["PackResult", "pack_dataset"]

FORMATS = {"webp": "WEBP", "jpeg": "JPEG"}


@dataclass
class PackResult:
    """What :func:`pack_dataset` wrote.

    Attributes:
        root: the pack's folder; ``manifest`` is ``root/manifest.csv``.
        images: files written.
        bytes: their total size.
        mean_abs_error: mean absolute difference, in grey levels (0-255), between each shrunk image and
            its re-encoded copy: the price of the lossy format.
        skipped: ``path, reason`` of files that could not be read (left out of the manifest).
    """

    root: Path
    manifest: Path
    images: int
    bytes: int
    mean_abs_error: float
    skipped: pd.DataFrame


def _shrink(pixels: np.ndarray, size: int) -> np.ndarray:
    """Float grey pixels -> uint8, shrunk (area averaging) until the shorter side is at most ``size``."""
    if pixels.ndim == 3:
        pixels = pixels.mean(axis=2)
    height, width = pixels.shape
    scale = size / min(height, width)
    if scale < 1:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA)
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def _pack_one(source: Path, target: Path, size: int, fmt: str, quality: int) -> tuple[int, float]:
    grey = _shrink(read_image(source), size)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, FORMATS[fmt], quality=quality)
    data = buffer.getvalue()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
    atomic_write_bytes(target, data)
    return len(data), float(np.abs(decoded - grey).mean())


def pack_dataset(
    table: pd.DataFrame,
    out_dir: str | Path,
    *,
    size: int = 384,
    fmt: str = "webp",
    quality: int = 90,
    splits: list[str] | None = None,
) -> PackResult:
    """Write a compact copy of ``table``'s images and a manifest to ``out_dir``.

    Args:
        table: a sample table (``table.attrs["root"]`` is the dataset root), usually with a split column
            from a manifest (:func:`fracdet.data.split.apply_manifest`).
        size: the largest input size a model will be trained at; images are only ever shrunk.
        fmt: ``webp`` (about half the bytes of JPEG at the same error) or ``jpeg``.
        quality: the encoder's quality, 1-100.
        splits: pack only rows of these splits (e.g. ``["train", "val"]`` when the test split is
            evaluated on the originals anyway).

    Raises:
        ValueError: an unknown format, a quality outside 1-100, or no rows to pack.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be within 1-100, not {quality}")
    rows = table[table["split"].isin(splits)] if splits else table
    if rows.empty:
        raise ValueError(f"no rows to pack (splits {splits}; present: {sorted(table['split'].dropna().unique())})")
    rows.attrs.update(table.attrs)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    written, sizes, errors, skipped = [], [], [], []
    sources = absolute_paths(rows)
    with ThreadPoolExecutor(worker_count()) as pool, progress_bar(desc="packing", total=len(rows)) as bar:
        futures = [
            pool.submit(_pack_one, source, root / path, size, fmt, quality)
            for source, path in zip(sources, rows["path"], strict=True)
        ]
        for k, future in enumerate(futures):
            try:
                nbytes, error = future.result()
                written.append(k)
                sizes.append(nbytes)
                errors.append(error)
            except (ImageReadError, OSError) as exc:
                skipped.append((rows["path"].iloc[k], str(exc).split(": ", 1)[-1]))
            bar.update(1)
    kept = rows.iloc[written].copy()
    for column in ANNOTATION_COLUMNS:  # expert boxes and polygons travel as JSON (a localiser trains on them)
        if column in kept:
            kept[column] = [json.dumps(v if isinstance(v, list) else []) for v in kept[column]]
    scalar = [c for c in kept.columns if not kept[c].map(lambda v: isinstance(v, list | dict | tuple)).any()]
    manifest = root / "manifest.csv"
    with atomic_file(manifest) as tmp:
        kept[scalar].to_csv(tmp, index=False)
    result = PackResult(root, manifest, len(written), int(sum(sizes)), float(np.mean(errors)) if errors else 0.0,
                        pd.DataFrame(skipped, columns=["path", "reason"]))  # fmt: skip
    info = {
        "source_root": table.attrs.get("root"),
        "source_layout": table.attrs.get("layout"),
        "size": size,
        "format": fmt,
        "quality": quality,
        "splits": splits or "all",
        "images": result.images,
        "bytes": result.bytes,
        "mean_abs_error_grey_levels": round(result.mean_abs_error, 3),
        "columns_left_out": sorted(set(kept.columns) - set(scalar)),
        "skipped": [{"path": p, "reason": r} for p, r in skipped],
    }
    atomic_write_text(root / "PACK.json", json.dumps(info, indent=2) + "\n")
    return result
