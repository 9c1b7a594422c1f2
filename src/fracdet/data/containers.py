"""Bounded walks of a JPEG, PNG, GIF or TIFF file's structure (or a JPEG 2000 codestream's), before any
decoder sees its bytes.

A small valid file can keep a decoder busy for minutes with structure rather than pixels. Pillow parses
the segments of JPEG, PNG and GIF files and the strips or tiles of uncompressed TIFF files in Python, one
at a time, and skips stray bytes between JPEG markers one by one; libjpeg decodes every scan of a
progressive JPEG over the whole image; OpenJPEG sets up every tile of a JPEG 2000 codestream. So 50 MB of
empty JPEG comments, PNG chunks, GIF blocks or fill bytes each took 12-63 s to read, a TIFF of a million
2 x 2 tiles (8 MB) 10 s, a DICOM frame of JPEG 2000 in 65,025 tiles (2.5 MB) 11 s, and a 94 KB
progressive JPEG of 1,000 scans 17 s (``python benchmarks/structure_floods.py``; the libjpeg-turbo
authors call the last "LJT-01-003" and advise a limit on scans). In a server each such upload holds an
inference worker (one per core) that long, past the timeout for some, and a timed-out decode cannot be
stopped.

Each walk here reads headers only, stops one past its limit and says what it counted. The limits are
far beyond what encoders write (the largest counts in FracAtlas, the multiregion set and the bundled
sample are in docs/RELIABILITY.md) and far below what costs a decoder noticeable time.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["LIMITS", "Structure", "StructureError", "StructureLimits", "check_structure", "walk_structure"]


class StructureError(ValueError):
    """A file's structure goes past a limit; the message names the count and the limit."""


@dataclass(frozen=True)
class StructureLimits:
    """The most of each structure a file may have before it is refused (``None``: count without limit).

    Attributes:
        jpeg_segments: marker segments before a JPEG's first scan (APPn, COM, tables, frame header);
            encoders write about ten, a camera's EXIF, ICC profile and thumbnail a few more.
        jpeg_stray_bytes: fill and junk bytes between those segments (Pillow skips them one at a time).
        jpeg_scans: scans up to the end of the image; baseline JPEG has one, libjpeg's progressive
            scripts six (grey) to ten (colour). Each is decoded over the whole image.
        jpeg_scan_pixels: scans times the pixels of the image, what libjpeg decodes in all: 100 scans of
            100 M pixels, each count within its own limit, held a decoder for 10.5 s; 2 G allows 20 scans at
            the pixel limit, or 100 scans of 20 M pixels (2.1 s).
        png_chunks: PNG chunks other than image data (text, colour, gamma, EXIF ...).
        png_data_chunks: image-data (IDAT) chunks: an encoder writes one per 8-64 KiB of compressed data.
        gif_blocks: extension blocks and their sub-blocks before a GIF's first image.
        tiff_pieces: strips or tiles of a TIFF's first image. Pillow reads uncompressed ones one at a time in
            Python; encoders cut an image into pieces of 8 KiB or more (about 25,000 for 100 M 16-bit pixels),
            and a tile is at least 16 x 16 pixels.
        j2k_tiles: tiles of a JPEG 2000 codestream (a DICOM frame): OpenJPEG decodes each with its own
            set-up. Encoders write one tile, or tiles of 256 pixels a side and more (1,526 for 100 M pixels).
    """

    jpeg_segments: int | None = 1_000
    jpeg_stray_bytes: int | None = 65_536
    jpeg_scans: int | None = 100
    jpeg_scan_pixels: int | None = 2_000_000_000
    png_chunks: int | None = 1_000
    png_data_chunks: int | None = 100_000
    gif_blocks: int | None = 10_000
    tiff_pieces: int | None = 100_000
    j2k_tiles: int | None = 4_096


#: The limits fracdet applies to every file it decodes.
LIMITS = StructureLimits()
#: What each count is, in words, for messages and reports.
_WORDS = {
    "jpeg_segments": "JPEG marker segments before its first scan",
    "jpeg_stray_bytes": "stray bytes between JPEG markers",
    "jpeg_scans": "scans in a progressive JPEG",
    "jpeg_scan_pixels": "pixels decoded over the scans of a JPEG (scans x width x height)",
    "png_chunks": "PNG chunks other than image data",
    "png_data_chunks": "PNG image-data (IDAT) chunks",
    "gif_blocks": "GIF extension blocks before its first image",
    "tiff_pieces": "strips or tiles in a TIFF image",
    "j2k_tiles": "tiles in a JPEG 2000 codestream",
}
#: Start-of-frame markers of JPEG (ISO 10918-1 B.1.1.3: C0-CF but DHT C4, JPG C8, DAC CC) and JPEG-LS (F7).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
#: Markers without a length (ISO 10918-1 B.1.1.2): TEM and the restart markers.
_BARE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS, _EOI = 0xDA, b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_OFFSETS = (273, 324)  # StripOffsets, TileOffsets (TIFF 6.0): one value per piece


@dataclass(frozen=True)
class Structure:
    """What a walk counted.

    Attributes:
        format: ``JPEG`` (JPEG-LS too), ``PNG``, ``GIF``, ``TIFF`` or ``JPEG 2000``.
        counts: each count by its :class:`StructureLimits` name; a count past its limit stopped the walk
            there (it is then the limit plus one, and later counts are partial).
        size: (width, height) as the header declares it, before any pixel is decoded: a JPEG's frame header
            when the walk reached one before the first scan, a JPEG 2000 codestream's SIZ segment.
    """

    format: str
    counts: dict[str, int]
    size: tuple[int, int] | None = None

    def excess(self, limits: StructureLimits = LIMITS) -> str | None:
        """The first count over its limit, in words, or ``None``."""
        for name, count in self.counts.items():
            limit = getattr(limits, name)
            if limit is not None and count > limit:
                return f"more than {limit:,} {_WORDS[name]}"
        return None

    def check(self, limits: StructureLimits = LIMITS) -> None:
        """Raise :class:`StructureError` when a count is over its limit."""
        if excess := self.excess(limits):
            raise StructureError(f"{excess}: no encoder writes that many, and each costs the decoder time")


def walk_structure(data: bytes, limits: StructureLimits = LIMITS) -> Structure | None:
    """Count the structure of a JPEG (or JPEG-LS), PNG, GIF or TIFF file or a JPEG 2000 codestream;
    ``None`` for any other bytes.

    The walk never raises on damage: where the structure stops making sense it stops counting and leaves
    the verdict to the decoder.
    """
    if data[:2] == b"\xff\xd8":
        return _walk_jpeg(data, limits)
    if data[:8] == _PNG_SIGNATURE:
        return _walk_png(data, limits)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _walk_gif(data, limits)
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return _walk_tiff(data)
    if data[:4] == b"\xff\x4f\xff\x51" and len(data) >= 40:  # SOC then SIZ (ISO 15444-1 A.5.1)
        return _walk_j2k(data)
    return None


def check_structure(data: bytes, limits: StructureLimits = LIMITS) -> None:
    """Raise :class:`StructureError` when a file has more of some structure than ``limits`` allow."""
    if structure := walk_structure(data, limits):
        structure.check(limits)


def _over(count: int, limit: int | None) -> bool:
    return limit is not None and count > limit


def _walk_jpeg(data: bytes, limits: StructureLimits) -> Structure:
    segments = stray = scans = 0
    size = None
    offset, end = 2, len(data)
    while offset + 2 <= end:
        if data[offset] != 0xFF or data[offset + 1] in (0x00, 0xFF):  # junk, or fill before a marker
            stray += 1
            offset += 1
            if _over(stray, limits.jpeg_stray_bytes):
                break
            continue
        marker = data[offset + 1]
        if marker in _BARE_MARKERS:
            offset += 2
            continue
        if marker == _SOS:
            eoi = data.find(_EOI, offset)  # entropy-coded data stuffs 0xFF, so markers are real markers
            scans = data.count(b"\xff\xda", offset, eoi if eoi >= 0 else end)
            break
        segments += 1
        if _over(segments, limits.jpeg_segments) or offset + 4 > end:
            break
        if marker in _SOF_MARKERS and size is None and offset + 9 <= end:
            height, width = struct.unpack_from(">HH", data, offset + 5)
            size = (width, height) if width and height else None  # a height of 0 comes later (DNL): unknown
        offset += 2 + int.from_bytes(data[offset + 2 : offset + 4], "big")
    counts = {"jpeg_segments": segments, "jpeg_stray_bytes": stray, "jpeg_scans": scans}
    counts["jpeg_scan_pixels"] = scans * size[0] * size[1] if size else 0  # no size before a scan: Pillow refuses it
    return Structure("JPEG", counts, size)


def _walk_png(data: bytes, limits: StructureLimits) -> Structure:
    chunks = data_chunks = 0
    offset, end = len(_PNG_SIGNATURE), len(data)
    while offset + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, offset)
        if kind == b"IDAT":
            data_chunks += 1
            if _over(data_chunks, limits.png_data_chunks):
                break
        else:
            chunks += 1
            if _over(chunks, limits.png_chunks) or kind == b"IEND":
                break
        offset += 12 + length
    return Structure("PNG", {"png_chunks": chunks, "png_data_chunks": data_chunks})


def _walk_gif(data: bytes, limits: StructureLimits) -> Structure:
    blocks = 0
    offset, end = 13, len(data)
    if end >= 13 and data[10] & 0x80:  # a global colour table follows the screen descriptor
        offset += 3 << ((data[10] & 0x07) + 1)
    while offset < end and data[offset] == 0x21 and not _over(blocks, limits.gif_blocks):  # an extension
        blocks += 1
        offset += 2  # introducer and label
        while offset < end and data[offset] and not _over(blocks, limits.gif_blocks):  # its sub-blocks
            blocks += 1
            offset += 1 + data[offset]
        offset += 1  # the block terminator
    return Structure("GIF", {"gif_blocks": blocks})


def _walk_tiff(data: bytes) -> Structure:
    """The pieces of the first image: the count of its strip or tile offsets, read from its directory."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")  # BigTIFF: 8-byte counts and offsets
    entry, count_format, value_format = (20, "Q", "Q") if big else (12, "H", "I")
    pieces = 0
    try:
        (first,) = struct.unpack_from(order + ("Q" if big else "I"), data, 8 if big else 4)
        (entries,) = struct.unpack_from(order + count_format, data, first)
        start = first + struct.calcsize(count_format)
        for k in range(min(entries, (len(data) - start) // entry)):
            tag, _, count = struct.unpack_from(order + "HH" + value_format, data, start + k * entry)
            if tag in _TIFF_OFFSETS:
                pieces = max(pieces, count)
    except struct.error:  # a directory past the end of the file: the decoder will say so
        pass
    return Structure("TIFF", {"tiff_pieces": pieces})


def _walk_j2k(data: bytes) -> Structure:
    """The image size and the tiles a JPEG 2000 codestream's SIZ segment lays over the image (ISO 15444-1
    B.3): the image spans (x0, y0) to (width, height) on the reference grid."""
    width, height, x0, y0, tile_width, tile_height, tile_x, tile_y = struct.unpack_from(">8I", data, 8)
    tiles = 0
    if tile_width and tile_height and width > tile_x and height > tile_y:
        tiles = -(-(width - tile_x) // tile_width) * -(-(height - tile_y) // tile_height)
    size = (width - x0, height - y0) if width > x0 and height > y0 else None
    return Structure("JPEG 2000", {"j2k_tiles": tiles}, size)
