"""read_image: every common format and mode, strict about truncation, guarded against bombs."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fracdet.data import ImageTooLargeError, TruncatedImageError, UnsupportedImageError, read_image
from fracdet.data.decode import decode_image

from .images import grey_gradient, jpeg_bytes, save, truncate


def test_jpeg_reads_as_grey_float_in_unit_range(sample_root):
    pixels = read_image(sample_root / "images" / "Fractured" / "IMG0000261.jpg")
    assert pixels.dtype == np.float32 and pixels.ndim == 2
    assert 0.0 <= pixels.min() < pixels.max() <= 1.0


def test_rgb_channels_on_request(sample_root):
    pixels = read_image(sample_root / "images" / "Fractured" / "IMG0000261.jpg", channels="RGB")
    assert pixels.shape[2] == 3


def test_truncated_jpeg_raises_by_default_and_loads_on_request(tmp_path, sample_root):
    data = (sample_root / "images" / "Fractured" / "IMG0000261.jpg").read_bytes()
    path = save(tmp_path / "cut.jpg", truncate(data))
    with pytest.raises(TruncatedImageError, match="truncated"):
        read_image(path)
    decoded = decode_image(path.read_bytes(), allow_truncated=True)
    assert decoded.truncated
    assert decoded.pixels.shape == read_image(sample_root / "images" / "Fractured" / "IMG0000261.jpg").shape


def test_the_bundled_truncated_file_is_detected(sample_root):
    with pytest.raises(TruncatedImageError):
        read_image(sample_root / "images" / "Non_fractured" / "IMG0004028.jpg")


def test_sixteen_bit_png_keeps_its_depth(tmp_path):
    ramp = (np.linspace(0, 65535, 256 * 8).reshape(8, 256)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    pixels = read_image(path)
    assert pixels.max() == pytest.approx(1.0)
    # 2048 distinct 16-bit levels survive; an 8-bit conversion would keep at most 256.
    assert len(np.unique(pixels)) > 256


@pytest.mark.parametrize(("fmt", "mode"), [("GIF", "P"), ("PNG", "RGBA"), ("BMP", "RGB"), ("TIFF", "L"), ("PNG", "LA")])
def test_formats_and_modes_become_grey(tmp_path, fmt, mode):
    base = Image.fromarray((grey_gradient() * 255).astype(np.uint8)).convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    base.save(path, format=fmt)
    pixels = read_image(path)
    assert pixels.shape == (48, 64)
    assert pixels[:, -1].mean() > pixels[:, 0].mean()


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray((grey_gradient((60, 20)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    image.save(path, exif=exif)
    assert read_image(path).shape == (60, 20)


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(ImageTooLargeError, match="exceeds"):
        read_image(path, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\nbroken"])
def test_non_images_get_a_clear_error(tmp_path, data):
    path = save(tmp_path / "x.png", data)
    with pytest.raises(UnsupportedImageError):
        read_image(path)


def test_missing_file_is_a_read_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        read_image(tmp_path / "absent.jpg")


def test_jpeg_helper_round_trips():
    image = Image.fromarray((grey_gradient() * 255).astype(np.uint8))
    assert Image.open(io.BytesIO(jpeg_bytes(image))).size == image.size
