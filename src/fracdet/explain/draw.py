"""Boxes drawn onto pictures by confidence level: *definite* solid, *suspicious* dashed, each with its score.

The styles come from :data:`fracdet.models.scoring.LEVEL_STYLE`, which the report's gallery and the web page
follow too, so a reader sees the same convention everywhere.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fracdet.models.scoring import LEVEL_STYLE, ScoredBox

__all__ = ["draw_boxes"]


def _dashed_line(
    draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], colour, width: int, dash: float
) -> None:
    length = float(np.hypot(end[0] - start[0], end[1] - start[1]))
    steps = max(1, int(length // dash))
    for k in range(0, steps, 2):
        a, b = k / steps, min(1.0, (k + 1) / steps)
        points = [(start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])) for t in (a, b)]
        draw.line(points, fill=colour, width=width)


def draw_boxes(rgb: np.ndarray, boxes: Iterable[ScoredBox], *, width: int = 2) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with every levelled box drawn in its level's style and labelled with its score."""
    boxes = [b for b in boxes if b.level in LEVEL_STYLE]
    if not boxes:
        return rgb
    picture = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(picture)
    h, w = rgb.shape[:2]
    font = ImageFont.load_default(size=max(10, h // 40))
    for box in boxes:
        style, colour = LEVEL_STYLE[box.level]
        x0, y0, x1, y1 = box.x0 * (w - 1), box.y0 * (h - 1), box.x1 * (w - 1), box.y1 * (h - 1)
        if style == "solid":
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        else:
            corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
            for start, end in itertools.pairwise(corners):
                _dashed_line(draw, start, end, colour, width, dash=max(4.0, w / 80))
        draw.text((x0 + 2, max(0.0, y0 - font.size - 2)), f"{box.level} {box.score:.2f}", fill=colour, font=font)
    return np.asarray(picture)
