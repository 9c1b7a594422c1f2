"""Fracture masks: the expert boxes or polygons of an image, rasterised at a model's square input size.

Images are squashed (not cropped) to the square input (:mod:`fracdet.data.pixels`), so annotations
normalised to the whole image land on the same pixels of the square.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["MASK_TARGETS", "fracture_mask"]

#: What a mask is drawn from: the boxes, or the polygons (falling back to the box of an image without one).
MASK_TARGETS = ("box", "polygon")


def fracture_mask(
    size: int,
    boxes: Sequence[Sequence[float]] | None,
    polygons: Sequence[Sequence[float]] | None = None,
    *,
    target: str = "box",
    instances: bool = False,
) -> np.ndarray:
    """``(size, size)`` uint8 mask (> 0 = fracture) from normalised ``(x0, y0, x1, y1)`` boxes or flat polygons.

    Every annotation covers at least one pixel, so a tiny fracture is never lost to rounding.

    Args:
        instances: number the fractures ``1, 2, ...`` instead of marking them all 1, so each one's extent can
            be read back after augmentation (a detector's box targets). They are drawn largest first, so a
            small fracture inside a larger one stays visible.
    """
    if target not in MASK_TARGETS:
        raise ValueError(f"mask target must be one of {', '.join(MASK_TARGETS)}, not {target!r}")
    mask = np.zeros((size, size), np.uint8)
    boxes = list(boxes) if isinstance(boxes, Sequence) else []
    polygons = list(polygons) if isinstance(polygons, Sequence) else []
    if target == "polygon" and polygons:
        shapes = [np.round(np.asarray(p, np.float64).reshape(-1, 2) * size).astype(np.int32) for p in polygons]
        shapes.sort(key=lambda points: -abs(cv2.contourArea(points)))
        for number, points in enumerate(shapes, start=1):
            cv2.fillPoly(mask, [points], number if instances else 1)
        return mask
    boxes = sorted(boxes, key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    for number, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        c0, r0 = int(np.clip(np.floor(x0 * size), 0, size - 1)), int(np.clip(np.floor(y0 * size), 0, size - 1))
        c1, r1 = int(np.clip(np.ceil(x1 * size), c0 + 1, size)), int(np.clip(np.ceil(y1 * size), r0 + 1, size))
        mask[r0:r1, c0:c1] = number if instances else 1
    return mask
