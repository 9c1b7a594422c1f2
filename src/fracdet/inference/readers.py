"""Input files -> grey pixels, for prediction, through the data layer's one decoder.

A file is recognised by its bytes, not its name (:func:`fracdet.data.decode.decode_image`), so a mislabelled
upload is still read correctly or refused with a message that says what it is, and a DICOM file is read
here exactly as training and evaluation read it.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fracdet.data.decode import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, DecodedImage, decode_image, is_image_file

__all__ = ["collect_inputs", "read_input", "read_input_image"]


def read_input(
    data: bytes, name: str = "<upload>", *, max_pixels: int = DEFAULT_MAX_PIXELS, force_modality: bool = False
) -> np.ndarray:
    """Grey float32 pixels in [0, 1] from the bytes of any supported file (strict: truncation is an error)."""
    return read_input_image(data, name, max_pixels=max_pixels, force_modality=force_modality).pixels


def read_input_image(
    data: bytes, name: str = "<upload>", *, max_pixels: int = DEFAULT_MAX_PIXELS, force_modality: bool = False
) -> DecodedImage:
    """Like :func:`read_input`, with what the file said about itself (format, mode, colour fraction, and a
    DICOM file's non-identifying header). ``force_modality``: read DICOM that is not a projection radiograph."""
    return decode_image(data, channels="L", max_pixels=max_pixels, name=name, measure_colour=True,
                        force_modality=force_modality)  # fmt: skip


def collect_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, every image under a folder (recursively; DICOM without a suffix too), and glob
    patterns, in order, once each.

    What is named like an image but is not a readable file (a broken link, a named pipe, a link to a device)
    is listed too, so that its row says what it is rather than it vanishing from the results;
    :func:`fracdet.data.decode.read_file` refuses it without blocking.

    Raises:
        FileNotFoundError: an input matches nothing.
    """
    found: dict[Path, None] = {}
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if is_image_file(p) or _named_like_image(p))
        elif path.exists():
            matches = [path]
        else:
            # a pattern such as xrays/**/*.png (pathlib's glob does not take absolute patterns)
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if not Path(p).is_dir())  # noqa: PTH207
        if not matches:
            raise FileNotFoundError(f"no input files at {item}")
        found.update(dict.fromkeys(matches))
    return list(found)


def _named_like_image(path: Path) -> bool:
    """An image's suffix on something that is no folder (it may be no regular file: never opened here)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.is_dir()
