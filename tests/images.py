"""Images made by the tests: copies, rotations, crops and defects of a real radiograph."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def rotated_crop(image: Image.Image, degrees: float, crop: float = 0.08) -> Image.Image:
    """Rotate about the centre (black corners), then crop ``crop`` of each side: a typical augmented copy."""
    rotated = image.convert("L").rotate(degrees, resample=Image.Resampling.BICUBIC, fillcolor=0)
    w, h = rotated.size
    dx, dy = int(w * crop), int(h * crop)
    return rotated.crop((dx, dy, w - dx, h - dy))


def truncate(data: bytes, keep: float = 0.6) -> bytes:
    return data[: int(len(data) * keep)]


def save(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def grey_gradient(size: tuple[int, int] = (64, 48)) -> np.ndarray:
    w, h = size
    return np.tile(np.linspace(0, 1, w, dtype=np.float32), (h, 1))
