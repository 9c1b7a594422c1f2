"""The pixel cache: every image decoded once per size, unreadable files listed instead of fatal."""

from __future__ import annotations

import numpy as np

from fracdet.data import load_dataset
from fracdet.data.pixels import load_pixels, resize_square
from fracdet.utils.cache import FeatureCache


def test_pixels_are_square_uint8_and_unreadable_files_are_listed(sample_root, tmp_path):
    table = load_dataset(sample_root)
    result = load_pixels(table, 48, cache=FeatureCache(tmp_path))
    assert result.images.shape == (len(table) - len(result.skipped), 48, 48)
    assert result.images.dtype == np.uint8
    assert result.skipped["path"].str.contains("IMG0004028").any()
    assert result.skipped["reason"].str.contains("truncated").all()
    assert list(result.table["path"]) == [p for p in table["path"] if p not in set(result.skipped["path"])]


def test_second_load_reads_the_cache(sample_root, tmp_path, monkeypatch):
    table = load_dataset(sample_root)
    cache = FeatureCache(tmp_path)
    first = load_pixels(table, 40, cache=cache)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr("fracdet.data.pixels._decode", no_decoding)
    second = load_pixels(table, 40, cache=cache)
    assert np.array_equal(first.images, second.images)


def test_resize_squashes_the_whole_image_into_the_square():
    tall = np.zeros((300, 100), np.float32)
    tall[:, :50] = 1.0  # left half white
    out = resize_square(tall, 64)
    assert out.shape == (64, 64)
    assert out[:, :30].min() == 255 and out[:, 34:].max() == 0


def test_missing_files_are_skipped_not_fatal(sample_root, tmp_path):
    table = load_dataset(sample_root)
    table.loc[0, "path"] = "images/Fractured/not_there.jpg"
    result = load_pixels(table, 32, cache=FeatureCache(tmp_path))
    assert "images/Fractured/not_there.jpg" in set(result.skipped["path"])
