"""Every kind of bad upload the server has met or should expect: a 4xx naming the problem, never a 5xx, and
the server healthy afterwards. Then property-based fuzzing of the decoder and of the upload endpoint.

Each row of :data:`CASES` is ``(kind, bytes or a maker, status, words)``: ``status`` is the code the API must
answer, ``words`` must appear in its ``detail``. A row with status 200 is an input that *is* a radiograph,
however unusual its container, and must be read.
"""

from __future__ import annotations

import contextlib
import io
import struct
import zlib
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fracdet.data.decode import ImageReadError, decode_image
from fracdet.models import create_model
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel
from fracdet.serve import ServeConfig, create_app
from tests import structure_files as flood
from tests.conftest import SAMPLE
from tests.dicom_files import deflated, jpeg_frame_of_many_scans, larger_frame, mono2_8bit, write_bytes

RADIOGRAPH = (SAMPLE / "images" / "Fractured" / "IMG0000261.jpg").read_bytes()
GREY = np.asarray(Image.open(io.BytesIO(RADIOGRAPH)).convert("L"))


def saved(array: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunks(*chunks: tuple[bytes, bytes]) -> bytes:
    """A PNG from raw chunks (type, data), with correct CRCs unless the data says otherwise."""
    out = b"\x89PNG\r\n\x1a\n"
    for kind, data in chunks:
        out += struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return out


def ihdr(width: int, height: int, depth: int = 8, colour: int = 0) -> tuple[bytes, bytes]:
    return b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)


rng = np.random.default_rng(0)
CASES: list[tuple[str, bytes | Callable[[], bytes], int, str]] = [
    # nothing, or not an image at all
    ("empty", b"", 400, "empty"),
    ("one byte", b"\x00", 415, "not an image"),
    ("text", b"hello, this is text", 415, "not an image"),
    ("html", b"<!doctype html><html><body>hi</body></html>", 415, "not an image"),
    ("json", b'{"image": "IMG0000261.jpg"}', 415, "not an image"),
    ("pdf", b"%PDF-1.7\n" + b"0" * 500, 415, "not an image"),
    ("zip", b"PK\x03\x04" + b"\x00" * 200, 415, "not an image"),
    ("gzip", b"\x1f\x8b\x08\x00" + b"\x00" * 200, 415, "not an image"),
    ("elf binary", b"\x7fELF" + b"\x00" * 200, 415, "not an image"),
    ("shell script", b"#!/bin/sh\nrm -rf /\n", 415, "not an image"),
    ("random bytes", lambda: rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), 415, "not an image"),
    ("zeros", b"\x00" * 4096, 415, "not an image"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="100" height="100"></svg>', 415, "not an image"),
    ("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", 415, "not an image"),
    ("psd", lambda: saved(GREY, "PNG").replace(b"\x89PNG", b"8BPS", 1), 415, "not an image"),
    ("ico", lambda: saved(Image.fromarray(GREY).resize((64, 64)), "ICO"), 415, "not an image"),
    ("pcx", lambda: saved(GREY, "PCX"), 415, "not an image"),
    ("tga", lambda: saved(GREY, "TGA"), 415, "not an image"),
    ("ppm", lambda: saved(GREY, "PPM"), 415, "not an image"),
    ("dicom", b"\0" * 128 + b"DICM" + b"\0" * 200, 415, "DICOM"),
    (
        "dicom: jpeg-ls frame larger than its header",
        lambda: write_bytes(larger_frame("JPEGLSLossless")(GREY)),
        415,
        "compressed frame is",
    ),
    (
        "dicom: jpeg 2000 frame larger than its header",
        lambda: write_bytes(larger_frame("JPEG2000Lossless")(GREY)),
        415,
        "compressed frame is",
    ),
    (
        "dicom: progressive jpeg frame of 101 scans",
        lambda: write_bytes(jpeg_frame_of_many_scans(GREY)),
        415,
        "more than 100 scans",
    ),
    (
        "dicom: jpeg 2000 frame of 4,097 tiles",
        lambda: flood.in_dicom(flood.j2k_declaring_tiles(4_097)),
        415,
        "tiles in a JPEG 2000",
    ),
    # small valid images padded with structure a decoder walks one piece at a time
    ("jpeg with 1,001 segments", lambda: flood.jpeg_with_segments(1_001), 415, "JPEG marker segments"),
    ("jpeg with 65,537 fill bytes", lambda: flood.jpeg_with_stray_bytes(65_537), 415, "stray bytes"),
    ("progressive jpeg of 101 scans", lambda: flood.progressive_jpeg_with_scans(101), 415, "scans"),
    ("progressive jpeg 10000x10000, 100 scans", lambda: flood.progressive_jpeg_with_scans(100, 10**4), 415, "pixels"),
    ("png with 1,001 chunks", lambda: flood.png_with_chunks(1_001), 415, "PNG chunks"),
    ("png with 1,001 chunks after its data", lambda: flood.png_with_chunks(1_001, after_data=True), 415, "PNG chunks"),
    ("png of 100,001 IDAT chunks", lambda: flood.png_with_data_chunks(100_001), 415, "IDAT"),
    ("gif with 10,001 extension blocks", lambda: flood.gif_with_blocks(10_001), 415, "GIF extension blocks"),
    ("tiff of 100,001 tiles", lambda: flood.tiff_with_tiles(100_001), 415, "strips or tiles"),
    # damaged images
    ("jpeg truncated to 60%", RADIOGRAPH[: int(len(RADIOGRAPH) * 0.6)], 422, "truncated"),
    ("jpeg truncated to 10%", RADIOGRAPH[: int(len(RADIOGRAPH) * 0.1)], 422, "truncated"),
    ("jpeg header only", RADIOGRAPH[:200], 422, "truncated"),
    ("jpeg magic only", b"\xff\xd8\xff", 415, "not an image"),
    ("png truncated", lambda: saved(GREY, "PNG")[:2000], 422, "truncated"),
    ("png magic only", b"\x89PNG\r\n\x1a\n", 415, "not an image"),
    ("png without IDAT", lambda: png_chunks(ihdr(100, 100), (b"IEND", b"")), 415, "cannot decode"),
    (
        "png with garbage IDAT",
        lambda: png_chunks(ihdr(100, 100), (b"IDAT", b"garbage"), (b"IEND", b"")),
        422,
        "truncated",
    ),
    ("png of zero width", lambda: png_chunks(ihdr(0, 100), (b"IEND", b"")), 415, "not an image"),
    ("png bomb (100k x 100k header)", lambda: png_chunks(ihdr(100_000, 100_000), (b"IEND", b"")), 413, "pixels"),
    ("png claiming 30k x 30k", lambda: png_chunks(ihdr(30_000, 30_000), (b"IEND", b"")), 413, "pixels"),
    ("gif truncated", lambda: saved(GREY, "GIF")[:500], 415, "not an image"),
    ("bmp truncated", lambda: saved(GREY, "BMP")[:3000], 422, "truncated"),
    ("tiff truncated", lambda: saved(GREY, "TIFF")[:3000], 422, "truncated"),
    ("webp truncated", lambda: saved(GREY, "WEBP")[:300], 415, "cannot read the image header"),
    ("jpeg with a bad marker in the middle", lambda: RADIOGRAPH[:3000] + b"\xff\xd9" + RADIOGRAPH[3002:], 200, ""),
    # images that cannot be radiographs
    ("1x1 pixel", lambda: saved(np.zeros((1, 1), np.uint8), "PNG"), 422, "too small"),
    ("16x16 pixels", lambda: saved(GREY[:16, :16], "PNG"), 422, "too small"),
    ("a thin strip 2000x10", lambda: saved(np.tile(GREY[:10, :200], (1, 10)), "PNG"), 422, "too small"),
    ("all black", lambda: saved(np.zeros((300, 240), np.uint8), "PNG"), 422, "blank"),
    ("all white", lambda: saved(np.full((300, 240), 255, np.uint8), "PNG"), 422, "blank"),
    ("all mid grey jpeg", lambda: saved(np.full((300, 240), 128, np.uint8), "JPEG"), 422, "blank"),
    ("nearly uniform", lambda: saved((rng.random((300, 240)) * 3 + 100).astype(np.uint8), "PNG"), 422, "blank"),
    ("16-bit all zero", lambda: saved(np.zeros((300, 240), np.uint16), "PNG"), 422, "blank"),
    (
        "float tiff with NaN",
        lambda: saved(np.where(np.eye(200, dtype=bool), np.nan, 0.5).astype(np.float32), "TIFF"),
        422,
        "non-finite",
    ),
    (
        "float tiff with infinity",
        lambda: saved(np.where(np.eye(200, dtype=bool), np.inf, 0.5).astype(np.float32), "TIFF"),
        422,
        "non-finite",
    ),
    ("colour noise", lambda: saved(rng.integers(0, 256, (240, 300, 3), dtype=np.uint8), "PNG"), 422, "colour"),
    (
        "saturated red",
        lambda: saved(
            np.dstack([np.full((200, 200), 255), rng.integers(0, 60, (200, 200)), np.zeros((200, 200))]).astype(
                np.uint8
            ),
            "PNG",
        ),
        422,
        "colour",
    ),
    # radiographs in unusual but valid containers: read
    ("the radiograph as JPEG", RADIOGRAPH, 200, ""),
    ("as PNG", lambda: saved(GREY, "PNG"), 200, ""),
    ("as 16-bit PNG", lambda: saved(Image.fromarray(GREY.astype(np.uint16) * 257), "PNG"), 200, ""),
    ("as BMP", lambda: saved(GREY, "BMP"), 200, ""),
    ("as GIF", lambda: saved(GREY, "GIF"), 200, ""),
    ("as TIFF", lambda: saved(GREY, "TIFF"), 200, ""),
    ("as compressed TIFF", lambda: saved(GREY, "TIFF", compression="tiff_deflate"), 200, ""),
    ("as WebP", lambda: saved(GREY, "WEBP"), 200, ""),
    ("as deflated DICOM", lambda: write_bytes(deflated(GREY)), 200, ""),
    ("as RGB JPEG", lambda: saved(Image.fromarray(GREY).convert("RGB"), "JPEG"), 200, ""),
    ("as RGBA PNG", lambda: saved(Image.fromarray(GREY).convert("RGBA"), "PNG"), 200, ""),
    ("as palette PNG", lambda: saved(Image.fromarray(GREY).convert("P"), "PNG"), 200, ""),
    ("as 1-bit PNG (thresholded)", lambda: saved(Image.fromarray(GREY).convert("1"), "PNG"), 200, ""),
    ("as CMYK JPEG", lambda: saved(Image.fromarray(GREY).convert("CMYK"), "JPEG"), 200, ""),
    ("as progressive JPEG", lambda: saved(GREY, "JPEG", progressive=True), 200, ""),
    ("as JPEG quality 5", lambda: saved(GREY, "JPEG", quality=5), 200, ""),
    ("with trailing garbage", RADIOGRAPH + b"\x00garbage" * 100, 200, ""),
    ("rotated by EXIF", lambda: saved(Image.fromarray(GREY), "JPEG", exif=_exif_rotated()), 200, ""),
    (
        "huge but allowed (4000x3000)",
        lambda: saved(np.asarray(Image.fromarray(GREY).resize((4000, 3000))), "PNG"),
        200,
        "",
    ),
]


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    return exif.tobytes()


@pytest.fixture(scope="module")
def client() -> TestClient:
    module = create_model("paper_cnn", input_size=32).eval()
    model = TrainedModel(module=module, name="test-model", arch="paper_cnn", preprocess=PreprocessCfg(32),
                         threshold=0.3, operating_point="sens90", meta={"version": "0.0-test"})  # fmt: skip
    return TestClient(create_app(model, ServeConfig(max_pixels=100_000_000)), raise_server_exceptions=False)


def test_there_are_at_least_60_kinds():
    assert len({kind for kind, *_ in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize(("kind", "payload", "status", "words"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_upload_gets_a_4xx_naming_the_problem_and_the_server_stays_healthy(client, kind, payload, status,
                                                                                words):  # fmt: skip
    data = payload() if callable(payload) else payload
    response = client.post("/api/v1/predict", files={"file": ("upload.bin", data, "application/octet-stream")})
    assert response.status_code == status, response.text[:300]
    if status != 200:
        assert words in response.json()["detail"]
    assert client.get("/api/v1/health").status_code == 200


def test_no_file_two_files_and_wrong_field_names_are_4xx(client):
    assert client.post("/api/v1/predict").status_code == 422
    assert client.post("/api/v1/predict", files={"image": ("x.jpg", RADIOGRAPH, "image/jpeg")}).status_code == 422
    assert client.post("/api/v1/predict", data={"file": "not a file"}).status_code == 422
    two = [("file", ("a.jpg", RADIOGRAPH, "image/jpeg")), ("file", ("b.jpg", RADIOGRAPH, "image/jpeg"))]
    assert client.post("/api/v1/predict", files=two).status_code == 422
    assert (
        client.post("/api/v1/predict", content=b"raw body", headers={"content-type": "image/jpeg"}).status_code == 422
    )


def test_a_refused_form_names_the_field_but_never_quotes_what_was_sent(client):
    sent = "Doe^Jane PID-0042-7731 " * 100  # a text field where the file should be, holding identifiers
    response = client.post("/api/v1/predict", data={"file": sent})
    assert response.status_code == 422
    assert "Doe^Jane" not in response.text and response.json()["detail"][0]["loc"] == ["body", "file"]


def _form(*parts: tuple[bytes, bytes], end: bool = True) -> bytes:
    """A multipart/form-data body with boundary ``B`` from (part headers, part body) pairs."""
    body = b"".join(b"--B\r\n" + headers + b"\r\n\r\n" + data + b"\r\n" for headers, data in parts)
    return body + (b"--B--\r\n" if end else b"")


FILE_PART = (b'Content-Disposition: form-data; name="file"; filename="x.jpg"\r\nContent-Type: image/jpeg', RADIOGRAPH)
FORM = "multipart/form-data; boundary=B"
FORMS = [
    ("5,000 text fields", FORM, lambda: _form(*[(f'Content-Disposition: form-data; name="f{i}"'.encode(), b"v")
                                               for i in range(5000)], FILE_PART), 400, "Too many fields"),
    ("5,000 file parts", FORM, lambda: _form(*[(f'Content-Disposition: form-data; name="g{i}"; filename="a"'.encode(),
                                                b"v") for i in range(5000)], FILE_PART), 400, "Too many files"),
    ("a part header of 1 MB", FORM, lambda: _form((FILE_PART[0] + b"\r\nX-Long: " + b"a" * (1 << 20), RADIOGRAPH)),
     400, "Invalid multipart"),
    ("5,000 header lines in a part", FORM, lambda: _form((FILE_PART[0] + b"".join(f"\r\nX-{i}: y".encode()
                                                                                  for i in range(5000)), RADIOGRAPH)),
     400, "Invalid multipart"),
    ("5 MB in which the boundary never appears", FORM, lambda: bytes(5 << 20), 400, "Invalid multipart"),
    ("a form cut before its closing boundary", FORM, lambda: _form(FILE_PART, end=False), 422, "file"),
    ("a form without a boundary", "multipart/form-data", lambda: _form(FILE_PART), 400, "Missing boundary"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "content_type", "body", "status", "words"), FORMS, ids=[f[0] for f in FORMS])
def test_a_malformed_form_gets_a_4xx_naming_it_and_the_server_stays_healthy(client, kind, content_type, body, status,
                                                                            words):  # fmt: skip
    """Limits of the form parser itself (Starlette's: 1,000 fields, 1,000 files), kept so by this table."""
    response = client.post("/api/v1/predict", content=body(), headers={"content-type": content_type})
    assert response.status_code == status, response.text[:300]
    assert words in str(response.json()["detail"])
    assert client.get("/api/v1/health").status_code == 200


# --- property-based fuzzing ---------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_the_decoder_either_reads_or_raises_its_own_error_on_any_bytes(data):
    try:
        decoded = decode_image(data, max_pixels=4_000_000)
    except ImageReadError:
        return
    assert decoded.pixels.dtype == np.float32 and decoded.pixels.ndim == 2  # non-finite values: the gate's job


SMALL = np.asarray(Image.fromarray(GREY).resize((48, 40)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from([mono2_8bit, deflated]), edits=st.lists(st.tuples(st.integers(0, 599),
       st.integers(0, 255)), min_size=1, max_size=6))  # fmt: skip
def test_the_dicom_decoder_either_reads_or_raises_its_own_error_on_a_damaged_header(kind, edits):
    data = bytearray(write_bytes(kind(SMALL)))
    for at, value in edits:  # the preamble, file meta and the first elements
        data[at] = value
    with contextlib.suppress(ImageReadError):  # anything else escaping is a 500 in the server
        decode_image(bytes(data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.integers(0, len(RADIOGRAPH)), noise=st.binary(max_size=256), at=st.integers(0, 4000))
def test_a_damaged_radiograph_never_takes_the_server_down(client, prefix, noise, at):
    data = RADIOGRAPH[:prefix]
    data = data[:at] + noise + data[at + len(noise) :]
    response = client.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")})
    assert response.status_code < 500, response.text[:300]
    assert response.status_code == 200 or response.json()["detail"]
