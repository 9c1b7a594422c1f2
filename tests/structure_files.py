"""Small valid images padded with structure: many JPEG segments, stray bytes or scans, PNG chunks, GIF
blocks, TIFF tiles. The tests build them just past and just within fracdet's limits; ``benchmarks/structure_floods.py``
builds them at the size of an upload, to time what they cost a decoder without the limits."""

from __future__ import annotations

import io
import itertools
import re
import struct
import zlib

import numpy as np
from PIL import Image


def _image(side: int = 64) -> np.ndarray:
    """A grey test pattern (not noise: it compresses, so padding dominates the file)."""
    grey = np.zeros((side, side), np.uint8)
    grey[::3] = 200
    grey[:, ::5] = 90
    return grey


def _saved(array: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def jpeg_with_segments(count: int) -> bytes:
    """A JPEG with ``count`` marker segments before its first scan: its own (JFIF, tables, frame header)
    and empty comments (COM, 4 bytes each) before them."""
    jpeg = _saved(_image(), "JPEG")
    own, offset = 0, 2
    while jpeg[offset + 1] != 0xDA:  # a Pillow-written JPEG: segment after segment up to its scan
        own += 1
        offset += 2 + int.from_bytes(jpeg[offset + 2 : offset + 4], "big")
    return jpeg[:2] + b"\xff\xfe\x00\x02" * (count - own) + jpeg[2:]


def jpeg_with_stray_bytes(count: int) -> bytes:
    """A JPEG with ``count`` fill bytes (0xFF, which ISO 10918-1 allows before any marker) after its SOI."""
    jpeg = _saved(_image(), "JPEG")
    return jpeg[:2] + b"\xff" * count + jpeg[2:]


def progressive_jpeg_with_scans(count: int, width: int = 64, height: int | None = None) -> bytes:
    """A flat progressive JPEG whose smallest scan is repeated until it has ``count`` scans: every scan is
    decoded over the whole image, and a flat image's scans are a few dozen bytes each."""
    flat = np.full((height or width, width), 128, np.uint8)
    jpeg = _saved(flat, "JPEG", progressive=True, quality=50)
    starts = [m.start() for m in re.finditer(b"\xff\xda", jpeg)]
    scans = [jpeg[a:b] for a, b in zip(starts, [*starts[1:], len(jpeg) - 2], strict=True)]
    smallest = min(scans[1:], key=len)
    return jpeg[: starts[0]] + b"".join(scans) + smallest * (count - len(scans)) + b"\xff\xd9"


def png_with_chunks(count: int, *, after_data: bool = False) -> bytes:
    """A PNG with ``count`` chunks in all other than image data: empty private ones (``prVt``) before or
    after its IDAT, besides IHDR and IEND."""
    png = _saved(_image(), "PNG")
    filler = png_chunk(b"prVt", b"") * (count - 2)
    at = png.index(b"IEND") - 4 if after_data else 8 + 25  # after IHDR, or before IEND
    return png[:at] + filler + png[at:]


def png_with_data_chunks(count: int) -> bytes:
    """A PNG whose compressed image data is split into ``count`` IDAT chunks (a legal PNG)."""
    side = 64
    while True:
        rows = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
        stream = zlib.compress(b"".join(b"\0" + row.tobytes() for row in rows), 0)
        if len(stream) >= count:
            break
        side *= 2
    bounds = np.linspace(0, len(stream), count + 1).astype(int)
    idat = b"".join(png_chunk(b"IDAT", stream[a:b]) for a, b in itertools.pairwise(bounds))
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + idat + png_chunk(b"IEND", b"")


def gif_with_blocks(count: int) -> bytes:
    """A GIF with one comment extension of ``count - 1`` one-byte sub-blocks before its image."""
    gif = _saved(_image(), "GIF")
    at = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)
    return gif[:at] + b"\x21\xfe" + b"\x01x" * (count - 1) + b"\x00" + gif[at:]


def tiff_with_tiles(count: int, side: int = 16) -> bytes:
    """An uncompressed grey TIFF cut into ``count`` tiles of ``side`` x ``side`` pixels (TIFF 6.0 asks for
    multiples of 16; Pillow reads any) in one row, each pointing at the same bytes: 8 bytes a tile."""
    width, tile = side * count, bytes(k % 256 for k in range(side * side))
    entries = [(256, 4, 1, width), (257, 4, 1, side), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (277, 3, 1, 1), (322, 3, 1, side), (323, 3, 1, side), (324, 4, count, 8 + len(tile)),
               (325, 4, count, 8 + len(tile) + 4 * count)]  # fmt: skip
    directory = 8 + len(tile) + 8 * count
    return (b"II*\0" + struct.pack("<I", directory) + tile + struct.pack("<I", 8) * count
            + struct.pack("<I", len(tile)) * count + struct.pack("<H", len(entries))
            + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0")  # fmt: skip


def j2k_tiled(width: int, height: int, tile: int) -> bytes:
    """A lossless JPEG 2000 codestream cut into tiles of ``tile`` pixels a side (OpenJPEG, through Pillow)."""
    grey = np.resize(_image(), (height, width))
    return _saved(grey, "JPEG2000", tile_size=(tile, tile), irreversible=False, no_jp2=True)


def j2k_declaring_tiles(count: int) -> bytes:
    """A one-tile JPEG 2000 codestream whose SIZ segment is rewritten to lay ``count`` tiles of 16 x 16 over
    it (its size is the nearest-to-square grid of them): what the tile count is read from, quickly built.
    Damaged for a decoder, so only for files refused before decoding."""
    rows = max(k for k in range(1, int(count**0.5) + 1) if count % k == 0)
    codestream = bytearray(j2k_tiled(16 * (count // rows), 16 * rows, 16 * max(count // rows, rows)))
    codestream[24:32] = struct.pack(">II", 16, 16)  # XTsiz, YTsiz (ISO 15444-1 A.5.1)
    return bytes(codestream)


def in_dicom(codestream: bytes) -> bytes:
    """A JPEG 2000 codestream as the frame of a DICOM radiograph of its size (JPEG 2000 Lossless)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from tests.dicom_files import _dataset, write_bytes

    width, height = struct.unpack_from(">II", codestream, 8)
    ds = _dataset(np.zeros((height, width), np.uint8), bits=8)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    return write_bytes(ds)
