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


def test_images_come_memory_mapped_from_a_store_that_a_rerun_opens_without_reading_the_arrays(
    sample_root, tmp_path, monkeypatch
):
    table = load_dataset(sample_root)
    first = load_pixels(table, 40, cache=FeatureCache(tmp_path))
    assert isinstance(first.images, np.memmap)
    (store,) = (tmp_path / "pixels").glob("*.npy")
    assert np.array_equal(np.load(store), first.images)

    get_many = FeatureCache.get_many

    def no_arrays(self, kind, keys):
        assert not kind.startswith("pixels"), "read the cached arrays although the store was there"
        return get_many(self, kind, keys)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although stored")

    monkeypatch.setattr(FeatureCache, "get_many", no_arrays)
    monkeypatch.setattr("fracdet.data.pixels._decode", no_decoding)
    second = load_pixels(table, 40, cache=FeatureCache(tmp_path))
    assert np.array_equal(first.images, second.images)
    second.images[0] = 0  # copy-on-write: the caller's array changes, the store does not
    assert np.array_equal(np.load(store), first.images)


def test_a_store_is_written_a_chunk_at_a_time_not_held_in_memory(sample_root, tmp_path, monkeypatch):
    import tracemalloc

    import pandas as pd

    sample = load_dataset(sample_root)
    table = pd.concat([sample] * 8, ignore_index=True)  # a table far larger than one chunk or one file
    table.attrs.update(sample.attrs)
    size = 128
    load_pixels(table, size, cache=FeatureCache(tmp_path))  # every image in the cache
    for path in (tmp_path / "pixels").iterdir():
        path.unlink()
    monkeypatch.setattr("fracdet.data.pixels._CHUNK", 4)
    tracemalloc.start()
    result = load_pixels(table, size, cache=FeatureCache(tmp_path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.images.nbytes > 300 * size * size
    assert peak < result.images.nbytes / 3, (peak, result.images.nbytes)


def test_a_damaged_store_is_written_again(sample_root, tmp_path, caplog):
    table = load_dataset(sample_root)
    clean = np.array(load_pixels(table, 32, cache=FeatureCache(tmp_path)).images)
    (store,) = (tmp_path / "pixels").glob("*.npy")
    data = bytearray(store.read_bytes())
    data[-100:] = bytes(255 - b for b in data[-100:])
    store.write_bytes(bytes(data))
    again = load_pixels(table, 32, cache=FeatureCache(tmp_path))
    assert "failed its checksum" in caplog.text
    assert np.array_equal(again.images, clean)


def test_without_a_cache_or_when_asked_the_images_are_held_in_memory(sample_root, tmp_path):
    table = load_dataset(sample_root)
    stored = load_pixels(table, 32, cache=FeatureCache(tmp_path))
    held = load_pixels(table, 32, cache=FeatureCache(tmp_path / "off", enabled=False))
    asked = load_pixels(table, 32, cache=FeatureCache(tmp_path), in_memory=True)
    assert not isinstance(held.images, np.memmap) and not isinstance(asked.images, np.memmap)
    assert not (tmp_path / "off").exists()
    assert np.array_equal(held.images, stored.images) and np.array_equal(asked.images, stored.images)


def test_only_the_most_recently_used_stores_are_kept(sample_root, tmp_path, monkeypatch):
    monkeypatch.setattr("fracdet.data.pixels.STORES_KEPT", 2)
    table = load_dataset(sample_root)
    for size in (16, 20, 24):
        load_pixels(table, size, cache=FeatureCache(tmp_path))
    kept = sorted(p.name.split("-")[0] for p in (tmp_path / "pixels").glob("*.npy"))
    assert kept == ["pixels20", "pixels24"]
    assert len(list((tmp_path / "pixels").glob("*.blake2b"))) == 2
