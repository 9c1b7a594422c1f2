"""Pictures of image pairs, so that a person can check what the audit claims."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from fracdet.data.features import load_thumbnail
from fracdet.utils.atomic import atomic_file

__all__ = ["pair_montage", "save_pair_montage"]

_CAPTION = 28


def _tile(thumb: bytes | None, size: int) -> Image.Image:
    tile = Image.new("L", (size, size), 40)
    if thumb is not None:
        im = Image.fromarray(load_thumbnail(thumb))
        im.thumbnail((size, size))
        tile.paste(im, ((size - im.width) // 2, (size - im.height) // 2))
    return tile


def pair_montage(
    pairs: Sequence[tuple[bytes | None, bytes | None, str]],
    *,
    columns: int = 5,
    title: str | None = None,
    tile: int = 160,
) -> Image.Image:
    """Lay out pairs side by side with a caption under each pair.

    Args:
        pairs: ``(thumbnail_a, thumbnail_b, caption)``; thumbnails are the cached JPEG bytes.
        columns: pairs per row.
        title: optional line at the top.
        tile: side of each image's square in pixels.
    """
    cell_w, cell_h = 2 * tile + 12, tile + _CAPTION + 8
    rows = max(1, -(-len(pairs) // columns))
    top = 24 if title else 0
    canvas = Image.new("RGB", (columns * cell_w, rows * cell_h + top), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 5), title, fill="black")
    for k, (a, b, caption) in enumerate(pairs):
        x, y = (k % columns) * cell_w, (k // columns) * cell_h + top
        canvas.paste(_tile(a, tile).convert("RGB"), (x + 2, y))
        canvas.paste(_tile(b, tile).convert("RGB"), (x + tile + 6, y))
        for n, line in enumerate(caption.split("\n")[:2]):
            draw.text((x + 4, y + tile + 2 + 12 * n), line[:52], fill="black")
    return canvas


def save_pair_montage(path: str | Path, pairs: Sequence[tuple[bytes | None, bytes | None, str]], **kwargs) -> Path:
    """Write :func:`pair_montage` to ``path`` (PNG) and return the path."""
    with atomic_file(path) as tmp:
        pair_montage(pairs, **kwargs).save(tmp, format="PNG")
    return Path(path)
