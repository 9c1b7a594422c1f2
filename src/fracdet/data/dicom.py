"""DICOM radiographs -> the grey pixels a radiologist sees, with nothing that identifies the patient.

Hospitals keep radiographs as DICOM objects, so a DICOM file is read wherever an image is
(:func:`fracdet.data.decode.decode_image` hands it here): prediction, the web app, evaluation and datasets.

The pixels go through the display pipeline of DICOM PS3.3 C.11 / PS3.4 N.2 (Grayscale Standard Display):

1. the stored values, with *Bits Stored* and *Pixel Representation* respected (pydicom decodes them);
2. the **Modality LUT**: *Rescale Slope/Intercept* or a *Modality LUT Sequence* (pydicom);
3. the **VOI LUT**: a *VOI LUT Sequence* (its first LUT), else the first *Window Center/Width* with its
   *VOI LUT Function* (LINEAR, LINEAR_EXACT, SIGMOID), else the full range the modality output can take;
4. the **presentation**: MONOCHROME1 is displayed inverted, as is a *Presentation LUT Shape* of INVERSE. A
   MONOCHROME1 image is required to say INVERSE (PS3.3 C.8.11.6), so both mean the same one inversion;
5. *Pixel Padding Value* (and *Pixel Padding Range Limit*): padding is displayed black.

The result is float32 in [0, 1], as every other decoder gives. What is refused, with a message that names
the reason and never an identifying attribute: no pixel data (reports, structured reports, presentation
states), several frames, a modality that is not a projection radiograph (:data:`RADIOGRAPH_MODALITIES`,
unless ``force_modality``), colour, malformed or truncated data, and a transfer syntax no installed decoder
reads (the message names the package that would).

Memory is bounded by the pixel limit before any decoder runs, as for every other format. Two DICOM
encodings would otherwise let a few kilobytes claim gigabytes: a *deflated* dataset (PS3.5 A.5) is inflated
here, at most to what the pixel limit allows (pydicom would inflate all of it), and a compressed frame must
declare, in its own JPEG, JPEG-LS or JPEG 2000 header, the size the DICOM header gives (the codecs allocate
what the codestream declares, and one of them aborts the process when that fails).

Identifiers: names, IDs, birth dates, accession numbers and UIDs never appear in a message, a log line or
a table. Where a study or patient must be told apart (per-study summaries, splits grouped by patient),
:func:`keyed_hash` gives a stable pseudonym under a site key (``FRACDET_PHI_KEY``, else a random key made
once in fracdet's configuration folder), so the same patient gets the same group without the ID being
stored, and another site's hashes cannot be matched against ours.

Needs the ``dicom`` extra: ``pip install "fracdet[dicom]"`` (pydicom and permissively licensed decoders:
python-gdcm, pylibjpeg-openjpeg, pyjpegls, pylibjpeg-rle).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import logging
import os
import secrets
import sys
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fracdet.data.containers import Structure, StructureError, walk_structure

__all__ = [
    "DICOM_HINT",
    "RADIOGRAPH_MODALITIES",
    "DicomInfo",
    "codestream_size",
    "decode_dicom",
    "is_dicom",
    "keyed_hash",
    "quiet_pydicom",
    "read_dicom_header",
    "read_dicom_info",
]

DICOM_HINT = 'reading DICOM needs the dicom extra: pip install "fracdet[dicom]"'

#: Projection radiography: computed (CR) and digital (DX) radiography, DR as some devices write it,
#: fluoroscopy (RF), angiography (XA) and "other" (OT: secondary captures of radiographs).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR", "RF", "XA", "OT"})

#: Transfer syntaxes by compression, and the package that decodes each (the licence-clean choice).
_DECODER_PACKAGES = {
    "JPEG Baseline": "python-gdcm (or Pillow)",
    "JPEG Extended": "python-gdcm (or Pillow)",
    "JPEG Lossless": "python-gdcm",
    "JPEG-LS": "pyjpegls (or python-gdcm)",
    "JPEG 2000": "pylibjpeg-openjpeg (or python-gdcm)",
    "RLE": "pylibjpeg-rle",
}

#: Transfer syntaxes whose pixels may have lost information: JPEG baseline and extended, JPEG-LS
#: near-lossless, JPEG 2000 and HTJ2K that are not "lossless only", and the video syntaxes.
_LOSSY_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.93", "1.2.840.10008.1.2.4.203", "1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101",
    "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105",
    "1.2.840.10008.1.2.4.106",
})  # fmt: skip

#: The first group of a DICOM stream without its 128-byte preamble: file meta (0002), or a dataset's
#: identifying (0008) group.
_FIRST_GROUPS = (0x0002, 0x0008)

#: Reads of a file's elements beyond which its header is refused (:class:`_CountedReads`).
_MAX_READS = 200_000
#: What a deflated dataset may inflate to besides its pixels (4 bytes each at most): the rest of its header.
_HEADER_ALLOWANCE = 16 << 20
#: Explicit VR whose length takes 4 bytes after 2 reserved ones (PS3.5 7.1.2); the others take 2.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


class _RefusedError(Exception):
    """Internal: why a file cannot be read, already free of identifiers (turned into an ImageReadError)."""

    def __init__(self, message: str, *, truncated: bool = False, too_large: bool = False) -> None:
        super().__init__(message)
        self.truncated, self.too_large = truncated, too_large


@dataclass(frozen=True)
class DicomInfo:
    """What fracdet keeps of a DICOM header: nothing that identifies the patient.

    Attributes:
        modality: (0008,0060), e.g. ``DX``.
        photometric: ``MONOCHROME1`` or ``MONOCHROME2``.
        bits_stored: (0028,0101).
        transfer_syntax: its name, e.g. ``JPEG 2000 Image Compression (Lossless Only)``.
        study: keyed hash of the Study Instance UID (:func:`keyed_hash`), ``""`` when absent.
        patient: keyed hash of the Patient ID, ``""`` when absent.
        lossy: the pixels went through lossy compression (a lossy transfer syntax, or Lossy Image
            Compression 01 in the header).
    """

    modality: str
    photometric: str
    bits_stored: int
    transfer_syntax: str
    study: str
    patient: str
    lossy: bool


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file (``DICM`` after the 128-byte preamble), or a DICOM stream without preamble or
    file meta, recognised by its first element (group 0002 or 0008, explicit or implicit little endian)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8:
        return False
    group, element = int.from_bytes(data[0:2], "little"), int.from_bytes(data[2:4], "little")
    if group not in _FIRST_GROUPS or element > 0x00FF:
        return False
    vr = data[4:6]
    if vr.isalpha() and vr.isupper():  # explicit VR
        return True
    length = int.from_bytes(data[4:8], "little")  # implicit VR: a plausible first element length
    return length < 1 << 16


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings about invalid values quote the value (a malformed birth date, a name): inside, they
    are not shown, so no identifier reaches a terminal or log. fracdet's own messages say what matters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise ImportError(DICOM_HINT) from exc
    # and its logger repeats those warnings: only its errors get through
    logging.getLogger("pydicom").setLevel(max(logging.getLogger("pydicom").level, logging.ERROR))
    return pydicom


def _parse(data: bytes, *, pixels: bool, max_bytes: int) -> Any:
    """The dataset of ``data``; a deflated one inflated to at most ``max_bytes``."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    try:
        data, deflated = _inflated(data, max_bytes=max_bytes, whole=pixels)
        ds = pydicom.dcmread(_CountedReads(data), force=True, stop_before_pixels=not pixels)
        if deflated is not None:  # as it came: the name in messages, and lossless
            ds.file_meta.TransferSyntaxUID = deflated
        return ds
    except _RefusedError:
        raise
    except InvalidDicomError as exc:
        raise _RefusedError("not a readable DICOM file") from exc
    except EOFError as exc:
        raise _RefusedError("truncated DICOM file (the data ends inside an element)", truncated=True) from exc
    except Exception as exc:  # a damaged header fails in many ways; the message must not echo it
        raise _RefusedError(f"malformed DICOM header ({type(exc).__name__})") from exc


class _CountedReads(io.BytesIO):
    """The file as pydicom reads it, refused after :data:`_MAX_READS` reads. pydicom builds a header element
    by element in Python (about 7 microseconds and 300 bytes each) with a few reads per element, nested ones
    too, so 20 MB of empty elements would take 18 s and a gigabyte; a radiograph's header takes a few hundred
    reads, and the largest of pydicom's own test files 3,597."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self._left = _MAX_READS

    def read(self, size: int | None = -1, /) -> bytes:
        self._left -= 1
        if self._left < 0:
            raise _RefusedError(f"DICOM header too long to read (over {_MAX_READS:,} reads of its elements; a "
                                "radiograph's takes hundreds)")  # fmt: skip
        return super().read(size)


def _meta_start(data: bytes) -> int | None:
    """Where the file meta group (0002) begins: after the preamble and ``DICM``, or at the start of a stream
    without them (pydicom reads both); ``None`` without one."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return 132
    return 0 if data[:2] == b"\x02\x00" else None


def _meta_end(data: bytes, start: int) -> int:
    """Where the file meta group (0002) beginning at ``start`` ends: after its last element, walked as PS3.10
    7.1 writes it (explicit VR little endian), without trusting its group length."""
    offset = start
    while offset + 8 <= len(data) and int.from_bytes(data[offset : offset + 2], "little") == 0x0002:
        vr = data[offset + 4 : offset + 6]
        if vr in _LONG_VRS:
            offset += 12 + int.from_bytes(data[offset + 8 : offset + 12], "little")
        else:
            offset += 8 + int.from_bytes(data[offset + 6 : offset + 8], "little")
    return offset


def _inflated(data: bytes, *, max_bytes: int, whole: bool) -> tuple[bytes, Any]:
    """A deflated Part 10 file as the same file in explicit VR little endian, inflated to at most
    ``max_bytes`` (``whole``: all of it or refused as too large; else as much as the bound allows, enough for
    a header read that stops before the pixels), and its original transfer syntax; other files as they are.
    """
    from pydicom import dcmread
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    if (start := _meta_start(data)) is None:
        return data, None  # a deflated dataset needs its file meta to say so
    end = _meta_end(data, start)
    if DeflatedExplicitVRLittleEndian.encode() not in data[start:end]:  # its transfer syntax, in the file meta
        return data, None
    meta = dcmread(io.BytesIO(data[:end]), force=True).file_meta
    syntax = meta.get("TransferSyntaxUID")
    if syntax is None or not syntax.is_deflated:
        return data, None
    try:
        if whole and _inflated_size(data[end:], stop_after=max_bytes) > max_bytes:
            raise _RefusedError(f"deflated DICOM dataset inflates to more than {max_bytes:,} bytes, beyond what "
                                "the pixel limit allows", too_large=True)  # fmt: skip
        dataset = zlib.decompressobj(-zlib.MAX_WBITS).decompress(data[end:], max_bytes)
    except zlib.error as exc:
        raise _RefusedError("damaged deflated DICOM dataset (it does not inflate)") from exc
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    head = io.BytesIO()
    head.write(data[:start])
    write_file_meta_info(head, meta, enforce_standard=False)
    return head.getvalue() + dataset, syntax


def _inflated_size(deflated: bytes, *, stop_after: int) -> int:
    """How many bytes ``deflated`` inflates to, counted a mebibyte at a time and not kept, up to the first
    count beyond ``stop_after``: a bomb is refused having held a mebibyte, not what it inflates to."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size, rest = 0, deflated
    while size <= stop_after:
        chunk = inflater.decompress(rest, 1 << 20)
        size, rest = size + len(chunk), inflater.unconsumed_tail
        if inflater.eof or not chunk:  # the end (a padding byte to an even length may follow), or no progress
            return size
    return size


def _text(ds: Any, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed value is as good as absent here
        return ""
    return str(value).strip() if value is not None else ""


def _transfer_syntax(ds: Any) -> Any:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:  # no file meta: what pydicom found the stream to be
        return ImplicitVRLittleEndian if getattr(ds, "is_implicit_VR", True) else ExplicitVRLittleEndian
    return syntax


def read_dicom_header(data: bytes, *, name: str = "<bytes>") -> Any:
    """The header of a DICOM file as a pydicom dataset, without its pixels; a deflated one is inflated no
    further than a header may reach (16 MiB), so a few kilobytes cannot claim gigabytes before anything is
    known of them. It holds the file's identifiers: what leaves fracdet goes through :class:`DicomInfo`.

    Raises:
        fracdet.data.decode.ImageReadError: not readable as DICOM.
    """
    try:
        with quiet_pydicom():
            return _parse(data, pixels=False, max_bytes=_HEADER_ALLOWANCE)
    except _RefusedError as exc:
        raise _error(name, exc) from None


def read_dicom_info(data: bytes, *, name: str = "<bytes>") -> DicomInfo:
    """The non-identifying header of a DICOM file, without decoding its pixels.

    Raises:
        fracdet.data.decode.ImageReadError: not readable as DICOM.
    """
    ds = read_dicom_header(data, name=name)
    try:
        with quiet_pydicom():
            return _info(ds)
    except Exception as exc:  # as in decode_dicom: a malformed value fails only when read
        raise _error(name, _malformed(exc)) from None


def _malformed(exc: Exception) -> _RefusedError:
    """Any other failure reading a header's values, named by its type only (its message may quote a value)."""
    return _RefusedError(f"malformed DICOM header ({type(exc).__name__})")


def _info(ds: Any) -> DicomInfo:
    syntax = _transfer_syntax(ds)
    lossy = str(syntax) in _LOSSY_SYNTAXES or _text(ds, "LossyImageCompression") == "01"
    bits = ds.get("BitsStored", None)
    return DicomInfo(
        modality=_text(ds, "Modality").upper(),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        bits_stored=int(bits) if bits is not None else 0,
        transfer_syntax=getattr(syntax, "name", str(syntax)),
        study=keyed_hash(_text(ds, "StudyInstanceUID")),
        patient=keyed_hash(_text(ds, "PatientID")),
        lossy=lossy,
    )


def decode_dicom(
    data: bytes,
    *,
    name: str = "<bytes>",
    max_pixels: int,
    force_modality: bool = False,
) -> tuple[np.ndarray, DicomInfo]:
    """Decode a DICOM radiograph to display pixels: float32 (H, W) in [0, 1], and its :class:`DicomInfo`.

    Args:
        name: how messages name the file (the caller's name; nothing from inside the file is added).
        max_pixels: refuse a header promising more pixels, before decoding.
        force_modality: read a modality outside :data:`RADIOGRAPH_MODALITIES` too.

    Raises:
        fracdet.data.decode.ImageReadError: refused, with the reason (truncated, unsupported, too large).
    """
    try:
        with quiet_pydicom():
            ds = _parse(data, pixels=True, max_bytes=min(4 * max_pixels + _HEADER_ALLOWANCE, sys.maxsize))
            info = _info(ds)
            _check(ds, info, max_pixels=max_pixels, force_modality=force_modality)
            return _display(ds, info), info
    except _RefusedError as exc:
        raise _error(name, exc) from None
    except Exception as exc:  # a value pydicom converts only when read: a list for Rows, an unknown VR, ...
        raise _error(name, _malformed(exc)) from None


def _error(name: str, refused: _RefusedError) -> Exception:
    from fracdet.data.decode import ImageTooLargeError, TruncatedImageError, UnsupportedImageError

    if refused.truncated:
        return TruncatedImageError(f"{name}: {refused}")
    return (ImageTooLargeError if refused.too_large else UnsupportedImageError)(f"{name}: {refused}")


def _check(ds: Any, info: DicomInfo, *, max_pixels: int, force_modality: bool) -> None:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        what = f" ({info.modality})" if info.modality else ""
        raise _RefusedError(f"DICOM object{what} holds no image (no Pixel Data): a report, structured report or "
                       "presentation state has nothing to analyse")  # fmt: skip
    if not force_modality and info.modality not in RADIOGRAPH_MODALITIES:
        shown = info.modality or "none given"
        known = ", ".join(sorted(RADIOGRAPH_MODALITIES))
        raise _RefusedError(f"modality {shown} is not a projection radiograph (reads {known}; force it to read anyway)")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise _RefusedError(f"multi-frame DICOM ({frames} frames): one radiograph per object is analysed")
    if info.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        shown = info.photometric or "none given"
        raise _RefusedError(f"photometric interpretation {shown}: a radiograph is grey (MONOCHROME1 or MONOCHROME2)")
    rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows * columns > max_pixels:
        raise _RefusedError(f"{columns}x{rows} pixels exceeds the limit of {max_pixels:,}", too_large=True)
    if rows == 0 or columns == 0:
        raise _RefusedError("DICOM image has no rows or columns")


def _decoded(ds: Any, info: DicomInfo) -> np.ndarray:
    from pydicom.pixels import get_decoder

    syntax = _transfer_syntax(ds)
    if getattr(syntax, "is_compressed", False):
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:  # a syntax pydicom has no decoder interface for (video, private)
            decoder = None
        if decoder is None or not decoder.is_available:
            package = next((p for k, p in _DECODER_PACKAGES.items() if k in info.transfer_syntax), None)
            hint = f"install {package}, or " if package else ""
            raise _RefusedError(f"no decoder for transfer syntax {info.transfer_syntax} ({hint}"
                           'pip install "fracdet[dicom]")')  # fmt: skip
        if syntax != _RLE:
            _check_codestream(ds, info)
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) is None:  # a bare stream: say what it is
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    try:
        return np.asarray(ds.pixel_array)
    except (EOFError, ValueError, BufferError) as exc:
        text = str(exc).lower()
        truncated = any(s in text for s in ("less than expected", "end of", "truncat", "insufficient", "length"))
        reason = (
            "truncated or damaged pixel data" if truncated else f"cannot decode its pixel data ({type(exc).__name__})"
        )
        raise _RefusedError(f"{reason} ({info.transfer_syntax})", truncated=truncated) from exc
    except Exception as exc:  # each codec fails its own way
        raise _RefusedError(f"cannot decode the pixel data ({type(exc).__name__}, {info.transfer_syntax})") from exc


_RLE = "1.2.840.10008.1.2.5"  # its decoder writes into the size the DICOM header gives: nothing to check


def _check_codestream(ds: Any, info: DicomInfo) -> None:
    """Refuse a compressed frame whose own header declares another size than the DICOM header: the codecs
    allocate what the codestream declares (a 3 KB JPEG-LS frame can ask for gigabytes), and a mismatch
    is damage anyway (pydicom would otherwise keep a corner of the decoded pixels without a word)."""
    from pydicom.encaps import get_frame

    try:
        frame = get_frame(ds.PixelData, 0, number_of_frames=1)
    except Exception as exc:  # the fragments themselves are damaged
        raise _RefusedError(f"damaged encapsulated pixel data ({type(exc).__name__}, {info.transfer_syntax})") from exc
    structure = _codestream_structure(frame)
    try:
        if structure:
            structure.check()  # a JPEG of a thousand scans, or JPEG 2000 of 65,000 tiles, holds its decoder
    except StructureError as exc:
        raise _RefusedError(f"its compressed frame has {exc} ({info.transfer_syntax})") from None
    size = structure.size if structure else None
    if size is None:
        raise _RefusedError(f"its compressed frame has no JPEG, JPEG-LS or JPEG 2000 header ({info.transfer_syntax})")
    rows, columns = int(ds.Rows), int(ds.Columns)
    if size != (columns, rows):
        raise _RefusedError(f"its compressed frame is {size[0]}x{size[1]} pixels but the DICOM header says "
                            f"{columns}x{rows} ({info.transfer_syntax})")  # fmt: skip


def codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(width, height) as a JPEG, JPEG-LS or JPEG 2000 codestream (or JP2 file) declares it in its header,
    before any pixel is decoded; ``None`` when ``frame`` begins with none of them or declares no size."""
    structure = _codestream_structure(frame)
    return structure.size if structure else None


def _codestream_structure(frame: bytes) -> Structure | None:
    """The structure of a JPEG, JPEG-LS or JPEG 2000 frame as decoded (a JP2 file's codestream box); the
    size of anything else is not a codestream's."""
    if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file: the codestream is its jp2c box
        frame = _jp2_codestream(frame)
    structure = walk_structure(frame)
    return structure if structure and structure.format in ("JPEG", "JPEG 2000") else None


def _jp2_codestream(data: bytes) -> bytes:
    """The contiguous codestream box (jp2c) of a JP2 file (ISO 15444-1 I.5), or ``b""``."""
    offset = 0
    while offset + 8 <= len(data):
        length, kind = int.from_bytes(data[offset : offset + 4], "big"), data[offset + 4 : offset + 8]
        start = offset + 8
        if length == 1:  # an 8-byte length follows
            length, start = int.from_bytes(data[offset + 8 : offset + 16], "big"), offset + 16
        elif length == 0:  # to the end of the file
            length = len(data) - offset
        if kind == b"jp2c":
            return data[start : offset + length]
        if length < start - offset:
            return b""
        offset += length
    return b""


def _display(ds: Any, info: DicomInfo) -> np.ndarray:
    """Stored values -> display values in [0, 1], in float32 and in place where it can: a 100 M-pixel
    image costs 4 bytes a pixel beyond its stored values, not the 30 of float64 temporaries."""
    from pydicom.pixels import apply_voi

    stored = _decoded(ds, info)
    if stored.ndim != 2:
        raise _RefusedError(f"expected one grey frame, got pixel data of shape {stored.shape}")
    padding = _padding_mask(ds, stored)
    values = _modality(ds, stored)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        item = ds.VOILUTSequence[0]
        entries = values if values.dtype.kind in "iu" else np.rint(values).astype(np.int64)  # a LUT is indexed
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        display = np.asarray(apply_voi(entries, ds, index=0), np.float32)
        display /= float(2**bits - 1)
    else:
        display = values.astype(np.float32, copy=False)  # the rescaled values, or the stored ones in float32
        if (window := _first_window(ds)) is not None:
            _window(display, *window, function=_text(ds, "VOILUTFunction").upper() or "LINEAR")
        else:
            low, high = _modality_range(ds, stored)
            display -= low
            display /= max(high - low, 1e-12)
    np.clip(display, 0.0, 1.0, out=display)
    if info.photometric == "MONOCHROME1" or _text(ds, "PresentationLUTShape").upper() == "INVERSE":
        np.subtract(1.0, display, out=display)
    if padding is not None:
        display[padding] = 0.0
    return display


def _modality(ds: Any, stored: np.ndarray) -> np.ndarray:
    """The Modality LUT (PS3.3 C.11.1): a lookup table as pydicom applies it, a rescale in float32 (pydicom's
    makes two float64 copies), or the stored values themselves."""
    from pydicom.pixels import apply_modality_lut

    if ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(stored, ds))
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        values = stored.astype(np.float32)
        values *= float(ds.RescaleSlope)
        values += float(ds.RescaleIntercept)
        return values
    return stored


def _first_window(ds: Any) -> tuple[float, float] | None:
    """The first (Window Center, Window Width) pair, or ``None`` (absent, or a width below 1)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None

    from pydicom.multival import MultiValue

    def first(value: Any) -> float:  # Window Center/Width may hold several windows: the first is the default
        return float(value[0]) if isinstance(value, (MultiValue, list, tuple)) else float(value)

    try:
        centre, width = first(ds.WindowCenter), first(ds.WindowWidth)
    except (TypeError, ValueError, IndexError):
        return None
    return (centre, width) if width >= 1 else None


def _window(x: np.ndarray, centre: float, width: float, *, function: str) -> None:
    """PS3.3 C.11.2.1.2-3: the window as a map onto [0, 1], in place."""
    if function == "SIGMOID":
        x -= centre
        x *= -4.0 / width
        with np.errstate(over="ignore"):  # far below the centre: exp overflows to inf, and 1 / inf is 0
            np.exp(x, out=x)
        x += 1.0
        np.reciprocal(x, out=x)
    elif function == "LINEAR_EXACT":
        x -= centre
        x /= width
        x += 0.5
    elif width <= 1:  # LINEAR with width 1 is a threshold: x <= c - 0.5 is the lowest value, above it the highest
        np.greater(x, centre - 0.5, out=x, casting="unsafe")
    else:
        x -= centre - 0.5
        x /= width - 1
        x += 0.5


def _modality_range(ds: Any, stored: np.ndarray) -> tuple[float, float]:
    """The range the modality output can take: the stored range (Bits Stored, Pixel Representation)
    through the Modality LUT. So an image without a window is shown as its bits allow, not stretched."""
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored", 0) or 0) or stored.dtype.itemsize * 8
    if int(ds.get("PixelRepresentation", 0) or 0):
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    ends = np.asarray(apply_modality_lut(np.array([low, high], dtype=np.int64 if low < 0 else np.uint32), ds),
                      np.float64)  # fmt: skip
    return float(ends.min()), float(ends.max())


def _padding_mask(ds: Any, stored: np.ndarray) -> np.ndarray | None:
    """Pixels holding the Pixel Padding Value (up to the Pixel Padding Range Limit, either way round)."""
    if "PixelPaddingValue" not in ds:
        return None
    try:
        value = int(ds.PixelPaddingValue)
        limit = int(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else value
    except (TypeError, ValueError):
        return None
    low, high = min(value, limit), max(value, limit)
    mask = (stored >= low) & (stored <= high)
    return mask if mask.any() else None


# --- pseudonyms --------------------------------------------------------------------------------------------


def _site_key() -> bytes:
    if env := os.environ.get("FRACDET_PHI_KEY"):
        return env.encode()
    folder = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "fracdet"
    path = folder / "phi-key"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        folder.mkdir(parents=True, exist_ok=True)
        key = secrets.token_hex(32).encode()
        try:  # created once, readable by its owner only; a concurrent creator's key wins
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
        return key


def keyed_hash(identifier: str, *, length: int = 16) -> str:
    """A stable pseudonym of ``identifier`` (HMAC-SHA256 under the site key), ``""`` for an empty one.

    The same identifier always gives the same pseudonym on one site, so studies and patients can be grouped;
    the identifier cannot be recovered from it, nor matched by hashing guesses without the key.
    """
    if not identifier:
        return ""
    return hmac.new(_site_key(), identifier.encode(), hashlib.sha256).hexdigest()[:length]
