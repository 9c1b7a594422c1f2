"""Image files -> pixel arrays, strictly: the one place bytes become pixels, for training, audit and inference.

Radiographs arrive as DICOM (:mod:`fracdet.data.dicom`, recognised by its content, with or without a
preamble or a ``.dcm`` name), or as JPEG, PNG (8 or 16 bit), GIF, BMP, TIFF or WebP in any mode; no other
container is opened (:data:`IMAGE_FORMATS`). The pixel limit is fracdet's own (``max_pixels``), checked on the header
before any pixel is decoded; Pillow's smaller built-in guard does not override it. So is the structure of
JPEG, PNG, GIF and TIFF files (:mod:`fracdet.data.containers`): a flood of segments, scans or tiles is
refused before a decoder spends minutes on it. Decoding is strict on
purpose: a truncated JPEG decoded leniently gets a grey band at the bottom, and in FracAtlas only
negatives have one, so a model can learn "grey band = no fracture". Loading such a file must be an
explicit choice (``allow_truncated=True``), never a silent default.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from fracdet.data.containers import StructureError, check_structure
from fracdet.data.dicom import DicomInfo, is_dicom

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "IMAGE_FORMATS",
    "IMAGE_SUFFIXES",
    "DecodedImage",
    "ImageReadError",
    "ImageTooLargeError",
    "TruncatedImageError",
    "UnsupportedImageError",
    "colour_fraction",
    "decode_image",
    "is_image_file",
    "read_file",
    "read_image",
]

#: File names a folder search picks up; a file without a suffix is picked up when its bytes are DICOM.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"})
#: The only containers Pillow may open: its other plugins (EPS hands data to Ghostscript, where installed;
#: PSD, ICO, ...) are attack surface a radiograph never needs.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")
DEFAULT_MAX_PIXELS = 100_000_000  # a 10k x 10k radiograph; anything larger is refused as a bomb
#: The largest file read from disk: far above any radiograph (100 M pixels at 16 bits are 200 MB stored
#: raw), far below what would exhaust memory when a disk image or a video is named like one.
DEFAULT_MAX_FILE_BYTES = 2**30
#: A pixel whose channels differ by more than this (0-255) is coloured (JPEG chroma noise stays well below).
CHROMA = 32

# Pillow's switch for lenient decoding is process-global; the lock keeps a lenient read in one thread
# from making a strict read in another one lenient.
_TRUNCATION_LOCK = threading.Lock()


class ImageReadError(ValueError):
    """An image file cannot be turned into pixels; the message says why."""


class TruncatedImageError(ImageReadError):
    """The file ends before the image data does (a strict decoder raises)."""


class UnsupportedImageError(ImageReadError):
    """The bytes are not an image in a format fracdet reads."""


class ImageTooLargeError(ImageReadError):
    """The header promises more pixels than allowed (a decompression bomb guard), or the file on disk is
    larger than any radiograph (:data:`DEFAULT_MAX_FILE_BYTES`)."""


@dataclass(frozen=True)
class DecodedImage:
    """Pixels plus what the file said about itself.

    Attributes:
        pixels: float32 in [0, 1], shape (H, W) for grey or (H, W, 3) for RGB.
        format: the container format as Pillow names it (``JPEG``, ``PNG``, ...), or ``DICOM``.
        mode: the file's own pixel mode before conversion (``L``, ``I;16``, ``RGB``, ``P``, ...; for DICOM
            its photometric interpretation and bits, e.g. ``MONOCHROME1 12-bit``).
        truncated: the file is truncated and was decoded leniently on request.
        colour_fraction: the share of its pixels that were coloured before it was made grey
            (:func:`colour_fraction`): 0 for a grey radiograph, most of the image for a photograph; ``None``
            unless asked for (``measure_colour``), since only the input gate needs it.
        dicom: a DICOM file's non-identifying header (modality, hashed study, ...), else ``None``.
    """

    pixels: np.ndarray
    format: str
    mode: str
    truncated: bool
    colour_fraction: float | None = None
    dicom: DicomInfo | None = None


def is_image_file(path: Path) -> bool:
    """A file a folder search takes: an image suffix, or no suffix and DICOM bytes (PACS exports often have
    no extension)."""
    if not path.is_file():
        return False
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return True
    if suffix and not suffix[1:].isdigit():  # DICOM files are often named by UID: 1.2.840.....123
        return False
    try:
        with path.open("rb") as fh:
            return is_dicom(fh.read(132))
    except OSError:
        return False


def colour_fraction(im: Image.Image) -> float:
    """Share of an image's pixels that are coloured (chroma, max - min of R, G, B, above :data:`CHROMA`).

    0 for grey modes. A grey radiograph with a red arrow drawn on it scores a few per cent; a photograph most
    of its area. Measured on the image reduced by whole blocks to 256-511 px (each pixel the mean of its
    block): a quarter of the time of a resampled thumbnail, and a coloured area keeps its share.
    """
    if im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return 0.0
    if im.mode not in ("RGB", "RGBA"):  # palette, CMYK, YCbCr...: Pillow reduces RGB
        im = im.convert("RGB")
    factor = max(1, max(im.size) // 256)
    rgb = np.asarray((im.reduce(factor) if factor > 1 else im).convert("RGB"))
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # uint8 planes: element-wise, not a strided reduction
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    return float((chroma > CHROMA).mean())


def _to_float(im: Image.Image, channels: str) -> np.ndarray:
    """Convert any Pillow mode to float32 [0, 1] without losing 16-bit depth."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
        grey = np.clip(arr / peak, 0.0, 1.0).astype(np.float32)
        return grey if channels == "L" else np.repeat(grey[..., None], 3, axis=2)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float32)
        finite = arr[np.isfinite(arr)]  # NaN and infinity stay as they are: the input gate refuses them by name
        lo, hi = float(finite.min(initial=0)), float(finite.max(initial=1))
        grey = (arr - lo) / max(hi - lo, 1e-12)
        return grey if channels == "L" else np.repeat(grey[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Radiographs with alpha are rare; composite on black, the background of a radiograph.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, rgba)
    im = im.convert(channels)
    return np.asarray(im, dtype=np.float32) / 255.0


#: What Pillow's plugins raise on damaged data (beyond OSError, each format has its own ways to fail).
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                   struct.error)  # fmt: skip


def _truncation(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "truncated" in text or "broken data stream" in text


def decode_image(
    data: bytes,
    *,
    channels: str = "L",
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str = "<bytes>",
    measure_colour: bool = False,
    force_modality: bool = False,
) -> DecodedImage:
    """Decode image bytes; see :func:`read_image` for the contract (``measure_colour``: fill
    :attr:`DecodedImage.colour_fraction`; ``force_modality``: read DICOM of any modality)."""
    if channels not in ("L", "RGB"):
        raise ValueError(f"channels must be 'L' or 'RGB', not {channels!r}")
    if not data:
        raise UnsupportedImageError(f"{name}: empty file")
    if is_dicom(data):
        from fracdet.data.dicom import decode_dicom

        pixels, info = decode_dicom(data, name=name, max_pixels=max_pixels, force_modality=force_modality)
        if channels == "RGB":
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        return DecodedImage(pixels, "DICOM", f"{info.photometric} {info.bits_stored}-bit", truncated=False,
                            colour_fraction=0.0 if measure_colour else None, dicom=info)  # fmt: skip
    try:
        check_structure(data)  # before Pillow walks it: a flood of segments, scans or tiles would hold it for minutes
    except StructureError as exc:
        raise UnsupportedImageError(f"{name}: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except UnidentifiedImageError as exc:
            kinds = ", ".join(IMAGE_FORMATS)
            raise UnsupportedImageError(f"{name}: not an image in a supported format ({kinds})") from exc
        except Image.DecompressionBombError as exc:  # twice Pillow's guard: far beyond any radiograph
            raise ImageTooLargeError(f"{name}: too many pixels ({exc})") from exc
        except _DECODER_ERRORS as exc:  # a damaged header: each plugin fails its own way
            if _truncation(exc):
                raise TruncatedImageError(f"{name}: truncated image file ({exc})") from exc
            raise UnsupportedImageError(f"{name}: cannot read the image header ({type(exc).__name__}: {exc})") from exc
    width, height = im.size
    if width * height > max_pixels:
        raise ImageTooLargeError(f"{name}: {width}x{height} pixels exceeds the limit of {max_pixels:,}")
    fmt, mode = im.format or "unknown", im.mode
    truncated = False
    try:
        with _TRUNCATION_LOCK:
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            im.load()
    except _DECODER_ERRORS as exc:
        if not _truncation(exc):
            raise UnsupportedImageError(f"{name}: cannot decode {fmt} data ({type(exc).__name__}: {exc})") from exc
        if not allow_truncated:
            raise TruncatedImageError(f"{name}: truncated {fmt} file ({exc})") from exc
        truncated = True
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        with _TRUNCATION_LOCK:
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                im.load()
            except _DECODER_ERRORS as again:
                raise UnsupportedImageError(f"{name}: cannot decode {fmt} data even leniently ({again})") from again
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
    with contextlib.suppress(*_DECODER_ERRORS):  # a damaged EXIF block must not take the image down with it
        im = ImageOps.exif_transpose(im) or im
    try:
        pixels = _to_float(im, channels)
        colour = colour_fraction(im) if measure_colour else None
    except _DECODER_ERRORS as exc:
        raise UnsupportedImageError(f"{name}: cannot convert {fmt} {mode} pixels ({type(exc).__name__})") from exc
    return DecodedImage(pixels=pixels, format=fmt, mode=mode, truncated=truncated, colour_fraction=colour)


def read_image(
    path: str | Path,
    *,
    channels: str = "L",
    allow_truncated: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image file as float32 pixels in [0, 1].

    DICOM radiographs (as displayed: :mod:`fracdet.data.dicom`), and JPEG, PNG (8 and 16 bit), GIF, BMP and
    TIFF in any mode are read; EXIF orientation is applied; alpha is composited on black.

    Args:
        path: the file.
        channels: ``"L"`` for an (H, W) grey array, ``"RGB"`` for (H, W, 3).
        allow_truncated: decode a truncated file leniently (its missing rows become grey) instead of
            raising :class:`TruncatedImageError`.
        max_pixels: refuse images whose header promises more pixels (decompression bombs).

    Raises:
        ImageReadError: with a subclass naming the reason (truncated, unsupported, too large).
    """
    path = Path(path)
    return decode_image(
        read_file(path), channels=channels, allow_truncated=allow_truncated, max_pixels=max_pixels, name=str(path)
    ).pixels


_NOT_FILES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def read_file(path: str | Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file no larger than ``max_bytes``: what every reader of images on disk uses.

    A named pipe would block its reader until something writes to it, and a device (``/dev/zero`` linked as
    ``scan.jpg``) or a huge file named like an image would be read until memory runs out. So the file is
    opened without blocking, its kind and size are taken from the open descriptor (no race with a rename),
    and no more than ``max_bytes + 1`` bytes are read (a file that grows while it is read is caught too).

    Raises:
        ImageReadError: the file cannot be opened (the system's reason), is not a regular file
            (:class:`UnsupportedImageError`) or is larger than ``max_bytes`` (:class:`ImageTooLargeError`).
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as exc:
        reason = "a link to nothing" if path.is_symlink() else "no such file"
        raise ImageReadError(f"{path}: cannot read file ({reason})") from exc
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    try:
        info = os.fstat(fd)
        kind = next((name for test, name in _NOT_FILES if test(info.st_mode)), None)
        if kind is not None:
            raise UnsupportedImageError(f"{path}: not a file but {kind}")
        too_large = f"{path}: the file is larger than the {max_bytes / 2**20:g} MiB limit"
        if info.st_size > max_bytes:
            raise ImageTooLargeError(too_large)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read file ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise ImageTooLargeError(too_large)
    return data
