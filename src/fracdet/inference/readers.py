"""Input files -> grey pixels, for prediction: the one place new formats (DICOM next) plug in.

A reader is chosen by looking at the bytes, not the file name, so a mislabelled upload is still read
correctly or refused with a message that says what it is.
"""

from __future__ import annotations

import glob
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fracdet.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    DecodedImage,
    UnsupportedImageError,
    decode_image,
)

__all__ = ["INPUT_SUFFIXES", "collect_inputs", "read_input", "read_input_image", "register_reader"]

Reader = Callable[[bytes, str, int], np.ndarray]
_READERS: list[tuple[Callable[[bytes], bool], Reader]] = []

#: File suffixes a folder search picks up.
INPUT_SUFFIXES = set(IMAGE_SUFFIXES)


def register_reader(sniff: Callable[[bytes], bool], reader: Reader, suffixes: Iterable[str] = ()) -> None:
    """Add a reader tried before the raster-image decoder when ``sniff(data)`` is true."""
    _READERS.insert(0, (sniff, reader))
    INPUT_SUFFIXES.update(suffixes)


def _is_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _dicom_not_yet(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    raise UnsupportedImageError(f"{name}: DICOM files are not read yet; export the image as PNG or JPEG")


register_reader(_is_dicom, _dicom_not_yet, suffixes=(".dcm",))  # picked up, then refused by name


def read_input(data: bytes, name: str = "<upload>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Grey float32 pixels in [0, 1] from the bytes of any supported file (strict: truncation is an error)."""
    return read_input_image(data, name, max_pixels=max_pixels).pixels


def read_input_image(data: bytes, name: str = "<upload>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Like :func:`read_input`, with what the file said about itself (format, mode, colour fraction)."""
    for sniff, reader in _READERS:
        if sniff(data):
            return DecodedImage(reader(data, name, max_pixels), "DICOM", "L", truncated=False, colour_fraction=0.0)
    return decode_image(data, channels="L", max_pixels=max_pixels, name=name, measure_colour=True)


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, every image under a folder (recursively), and glob patterns, in order, once each.

    Raises:
        FileNotFoundError: an input matches nothing.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in INPUT_SUFFIXES)
        elif path.exists():
            matches = [path]
        else:
            # a pattern such as xrays/**/*.png (pathlib's glob does not take absolute patterns)
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())  # noqa: PTH207
        if not matches:
            raise FileNotFoundError(f"no input files at {item}")
        found.update(dict.fromkeys(matches))
    return list(found)
