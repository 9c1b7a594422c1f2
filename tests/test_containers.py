"""A file's structure is counted before a decoder walks it: a flood of segments, stray bytes, scans, chunks
or blocks is refused by name; everything encoders write, and every radiograph we have, is read."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from fracdet.data.containers import LIMITS, StructureError, StructureLimits, check_structure, walk_structure
from fracdet.data.decode import ImageReadError, UnsupportedImageError, decode_image
from tests import structure_files as flood
from tests.conftest import SAMPLE

#: Each limit, and a file with a given count of what it limits.
BUILDERS: dict[str, Callable[[int], bytes]] = {
    "jpeg_segments": flood.jpeg_with_segments,
    "jpeg_stray_bytes": flood.jpeg_with_stray_bytes,
    "jpeg_scans": flood.progressive_jpeg_with_scans,
    "png_chunks": flood.png_with_chunks,
    "png_data_chunks": flood.png_with_data_chunks,
    "gif_blocks": flood.gif_with_blocks,
    "tiff_pieces": flood.tiff_with_tiles,
}
UNLIMITED = StructureLimits(**dict.fromkeys(LIMITS.__dataclass_fields__))
RADIOGRAPH = SAMPLE / "images" / "Fractured" / "IMG0000261.jpg"


def test_every_limit_has_a_file_that_reaches_it():
    below = {"j2k_tiles", "jpeg_scan_pixels"}  # a JPEG 2000 frame in DICOM; a product of two counts
    assert set(BUILDERS) | below == set(LIMITS.__dataclass_fields__)


def test_a_progressive_jpeg_is_refused_by_the_pixels_its_scans_decode_in_all():
    scans = LIMITS.jpeg_scans  # each scan is decoded over the whole image: 100 of 20 M pixels reach the limit
    width, height = 5_000, LIMITS.jpeg_scan_pixels // (scans * 5_000)
    at_limit = flood.progressive_jpeg_with_scans(scans, width, height)
    assert walk_structure(at_limit).counts["jpeg_scan_pixels"] == LIMITS.jpeg_scan_pixels
    check_structure(at_limit)
    past_it = flood.progressive_jpeg_with_scans(scans, width, height + 1)
    with pytest.raises(UnsupportedImageError, match=f"more than {LIMITS.jpeg_scan_pixels:,} pixels decoded over"):
        decode_image(past_it, name="upload")
    assert walk_structure(flood.jpeg_with_segments(3)).counts["jpeg_scan_pixels"] == 64 * 64  # one scan


def test_a_jpeg_2000_frame_is_read_tile_by_tile_within_the_limit_and_refused_beyond_it():
    tiled = flood.j2k_tiled(128, 96, 16)
    assert walk_structure(tiled).counts == {"j2k_tiles": 48}
    assert walk_structure(tiled).size == (128, 96)  # the DICOM header's size is checked against this
    assert decode_image(flood.in_dicom(tiled)).pixels.shape == (96, 128)
    check_structure(flood.j2k_declaring_tiles(LIMITS.j2k_tiles))
    with pytest.raises(ImageReadError, match=f"more than {LIMITS.j2k_tiles:,} tiles in a JPEG 2000 codestream"):
        decode_image(flood.in_dicom(flood.j2k_declaring_tiles(LIMITS.j2k_tiles + 1)), name="upload.dcm")


@pytest.mark.parametrize("name", BUILDERS)
def test_a_file_at_a_limit_is_read_and_one_past_it_is_refused_by_name(name):
    limit = getattr(LIMITS, name)
    at_limit, past_it = BUILDERS[name](limit), BUILDERS[name](limit + 1)
    assert walk_structure(at_limit, UNLIMITED).counts[name] == limit
    assert decode_image(at_limit).pixels.ndim == 2
    with pytest.raises(UnsupportedImageError, match=f"more than {limit:,} "):
        decode_image(past_it, name="upload")


@pytest.mark.parametrize("name", ["jpeg_segments", "jpeg_stray_bytes", "png_chunks", "png_data_chunks", "gif_blocks"])
def test_a_walk_stops_one_past_its_limit_so_a_flood_costs_no_more_than_the_limit(name):
    small = StructureLimits(**dict.fromkeys(BUILDERS, 10))
    structure = walk_structure(BUILDERS[name](1_000), small)
    assert structure.counts[name] == 11
    assert structure.excess(small).startswith("more than 10 ")


def test_the_words_of_a_refusal_say_what_was_counted():
    with pytest.raises(StructureError, match="more than 100 scans in a progressive JPEG"):
        check_structure(flood.progressive_jpeg_with_scans(101))


def encoded(fmt: str, mode: str = "L", **options) -> bytes:
    grey = np.asarray(Image.open(RADIOGRAPH).convert("L"))
    buffer = io.BytesIO()
    image = Image.fromarray(grey).convert(mode)
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 1
    exif[0x010F] = "camera"
    return exif.tobytes()


#: What encoders write, with the extras cameras and viewers add: all far within the limits.
ENCODED = {
    "baseline JPEG": lambda: RADIOGRAPH.read_bytes(),
    "progressive colour JPEG": lambda: encoded("JPEG", "RGB", progressive=True),
    "optimised JPEG with EXIF and a comment": lambda: encoded(
        "JPEG", optimize=True, exif=_exif(), comment=b"a radiograph"
    ),
    "JPEG with restart markers": lambda: encoded("JPEG", restart_marker_rows=1),
    "JPEG with an ICC profile": lambda: encoded("JPEG", "RGB", icc_profile=b"\0" * 200_000),
    "16-bit PNG with text": lambda: encoded("PNG", "I;16", pnginfo=_png_text()),
    "animated GIF": lambda: _animated_gif(),
    "TIFF in strips": lambda: encoded("TIFF"),
    "deflated 16-bit TIFF": lambda: encoded("TIFF", "I;16", compression="tiff_deflate"),
}


def _png_text():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k in range(20):
        info.add_text(f"key{k}", "value" * 20)
    return info


def _animated_gif() -> bytes:
    grey = Image.open(RADIOGRAPH).convert("L")
    buffer = io.BytesIO()
    grey.save(buffer, "GIF", save_all=True, append_images=[grey.rotate(90)] * 3, loop=0, comment=b"x" * 1000)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ENCODED)
def test_what_encoders_write_is_far_within_the_limits(kind):
    structure = walk_structure(ENCODED[kind](), UNLIMITED)
    assert structure is not None
    for name, count in structure.counts.items():
        assert count <= getattr(LIMITS, name) / 10, (name, count)


def test_every_bundled_radiograph_is_within_the_limits():
    files = [p for p in SAMPLE.rglob("*") if p.suffix.lower() in (".jpg", ".png")]
    assert files
    for path in files:
        check_structure(path.read_bytes())


SOURCES = {
    "jpeg": flood.jpeg_with_segments(20),
    "png": flood.png_with_chunks(20),
    "gif": flood.gif_with_blocks(20),
    "progressive": flood.progressive_jpeg_with_scans(20),
    "tiff": flood.tiff_with_tiles(20),
    "bigtiff": encoded("TIFF", big_tiff=True),
    "jpeg 2000": flood.j2k_tiled(64, 64, 16),
}


@settings(max_examples=200, deadline=None)
@given(
    source=st.sampled_from(sorted(SOURCES)),
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=6),
)
def test_a_damaged_file_is_counted_without_an_error(source, cut, flips):
    """The walk leaves damage to the decoder: truncated or scribbled-on files are counted, never raised on."""
    data = bytearray(SOURCES[source])
    for at, value in flips:
        data[at % len(data)] = value
    structure = walk_structure(bytes(data[: max(cut, 8)]))
    assert structure is None or all(count >= 0 for count in structure.counts.values())
