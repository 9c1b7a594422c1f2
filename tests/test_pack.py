"""Packs: a compact copy of a dataset that keeps every path, label, group and split, so a run trained on
the copy is evaluated on the originals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from fracdet.cli import main
from fracdet.data import load_dataset
from fracdet.data.pack import pack_dataset
from fracdet.data.pixels import load_pixels
from fracdet.data.split import apply_manifest
from fracdet.data.table import absolute_paths
from fracdet.evaluation import evaluate
from fracdet.models import load
from fracdet.training import choose_thresholds, fit_temperature, probabilities, train
from fracdet.utils.cache import FeatureCache
from tests.test_training import sample_manifest, tiny_config

COLUMNS = ["path", "label", "group", "split", "region", "view"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from tests.conftest import SAMPLE

    table = sample_manifest(SAMPLE)
    out = tmp_path_factory.mktemp("pack") / "sample-128"
    return table, pack_dataset(table, out, size=128)


def test_a_pack_lists_every_readable_file_with_its_label_group_split_and_metadata(packed):
    table, result = packed
    assert list(result.skipped["path"]) == ["images/Non_fractured/IMG0004028.jpg"]  # the truncated file
    copy = load_dataset(result.manifest)
    readable = table[~table["path"].isin(result.skipped["path"])].reset_index(drop=True)
    assert copy[COLUMNS].astype(str).equals(readable[COLUMNS].astype(str))
    assert result.images == len(copy) and json.loads((result.root / "PACK.json").read_text())["images"] == len(copy)


def test_a_pack_keeps_the_expert_boxes_and_polygons_a_localiser_trains_on(packed):
    table, result = packed
    copy = load_dataset(result.manifest).set_index("path")
    original = table.set_index("path").loc[copy.index]
    assert (original["boxes"].map(len) > 0).any()
    for column in ("boxes", "polygons"):
        assert list(copy[column]) == list(original[column])  # JSON keeps every float exactly


def test_packed_images_are_shrunk_never_enlarged_and_smaller_on_disk(packed):
    table, result = packed
    copy = load_dataset(result.manifest)
    for original, small in zip(absolute_paths(table.set_index("path").loc[copy["path"]].reset_index()),
                               absolute_paths(copy), strict=True):  # fmt: skip
        with Image.open(original) as a, Image.open(small) as b:
            assert b.format == "WEBP"  # (WebP has no grey mode: readers convert its RGB to grey)
            upright = ImageOps.exif_transpose(a).size  # packed pixels are upright: EXIF orientation applied
            assert min(b.size) == min(128, min(upright))
            assert abs(b.size[0] / b.size[1] - upright[0] / upright[1]) < 0.02  # aspect ratio kept
    original_bytes = sum(p.stat().st_size for p in absolute_paths(table))
    assert result.bytes < original_bytes / 4


def test_a_model_sees_nearly_the_same_pixels_from_the_pack(packed, tmp_path):
    table, result = packed
    copy = load_dataset(result.manifest)
    small = load_pixels(copy, 64, cache=FeatureCache(tmp_path))
    original = load_pixels(table.set_index("path").loc[copy["path"]].reset_index().pipe(_with_attrs, table), 64,
                           cache=FeatureCache(tmp_path))  # fmt: skip
    difference = np.abs(small.images.astype(float) - original.images.astype(float)).mean()
    assert difference < 2.0  # grey levels of 255
    assert 0 < result.mean_abs_error < 2.0


def test_only_the_chosen_splits_are_packed(packed, tmp_path):
    table, _ = packed
    result = pack_dataset(table, tmp_path / "val-only", size=64, fmt="jpeg", splits=["val"])
    copy = load_dataset(result.manifest)
    assert set(copy["split"]) == {"val"} and len(copy) == (table["split"] == "val").sum()
    with Image.open(absolute_paths(copy)[0]) as im:
        assert im.format == "JPEG"


def test_a_run_trained_on_the_pack_is_evaluated_on_the_original_files(packed, tmp_path, cache_dir):
    table, result = packed
    run = tmp_path / "run"
    train(tiny_config(epochs=1), load_dataset(result.manifest), run, cache=FeatureCache(cache_dir))
    originals = apply_manifest(load_dataset(table.attrs["root"]), run / "splits.csv")
    measured = evaluate(load(run), originals, split="val", n_boot=10, cache=FeatureCache(cache_dir))
    assert len(measured.predictions) == (load_dataset(result.manifest)["split"] == "val").sum()
    # the run's own manifest has no test rows (none were packed): the command says how to bring them back
    with pytest.raises(SystemExit, match="pass --splits with the full manifest"):
        main(["evaluate", str(run), "--data", str(table.attrs["root"]), "--split", "test", "--no-heatmaps"])


def test_a_run_trained_on_the_pack_is_fitted_again_on_the_original_validation_files(packed, tmp_path, cache_dir,
                                                                                     capsys):  # fmt: skip
    table, result = packed
    run, refit, root = tmp_path / "run", tmp_path / "refit", str(table.attrs["root"])
    train(tiny_config(epochs=1), load_dataset(result.manifest), run, cache=FeatureCache(cache_dir))
    report = ["--split", "val", "--no-heatmaps", "--bootstrap", "10", "--out"]
    main(["evaluate", str(run), "--data", root, *report, str(tmp_path / "before")])
    assert "temperature and thresholds were fitted on the validation files of" in capsys.readouterr().out

    assert main(["calibrate", str(run), "--data", root, "--out", str(refit)]) == 0
    originals = apply_manifest(load_dataset(root), run / "splits.csv")
    val = originals[originals["split"] == "val"].pipe(_with_attrs, originals)
    pixels = load_pixels(val, load(run).preprocess.input_size, cache=FeatureCache(cache_dir))
    labels, margins = pixels.table["label"].to_numpy(int), load(refit).margins(pixels.images)
    np.testing.assert_array_equal(margins, load(run).margins(pixels.images))  # the same weights
    temperature = fit_temperature(margins, labels)
    assert load(refit).temperature == pytest.approx(temperature)
    assert load(refit).thresholds == pytest.approx(choose_thresholds(labels, probabilities(margins, temperature)))
    assert load(refit).thresholds != pytest.approx(load(run).thresholds)  # the pack's pixels chose others

    # the new folder reads the originals by default, and nothing is left to refit
    main(["evaluate", str(refit), *report, str(tmp_path / "after")])
    assert "were fitted on the validation files" not in capsys.readouterr().out
    assert json.loads((tmp_path / "after" / "metrics.json").read_text())["thresholds"] == load(refit).thresholds
    with pytest.raises(SystemExit, match="already holds a model"):
        main(["calibrate", str(run), "--data", root, "--out", str(refit)])


def test_bad_pack_arguments_are_refused(packed, tmp_path):
    table, _ = packed
    with pytest.raises(ValueError, match="unknown format"):
        pack_dataset(table, tmp_path / "x", fmt="gif")
    with pytest.raises(ValueError, match="quality"):
        pack_dataset(table, tmp_path / "x", quality=0)
    with pytest.raises(ValueError, match="no rows"):
        pack_dataset(table, tmp_path / "x", splits=["test"])


def _with_attrs(frame, source):
    frame.attrs.update(source.attrs)
    return frame


def test_gpu_runs_script_trains_runs_side_by_side_from_a_pack_and_bundles_them_in_half_precision(packed, tmp_path):
    import subprocess
    import sys
    import tarfile

    _, result = packed
    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(repo / "scripts" / "gpu_runs.py"), "--data", str(result.manifest), "--out", str(out),
         "--runs-dir", str(tmp_path / "runs"), "--config", str(repo / "configs" / "paper.yaml"),
         "--only", "gpu-seed1", "lever-no-balance-seed0", "--parallel", "2", "--fit-epochs",
         "--set", "image_size=32", "--set", "epochs=1"],
        capture_output=True, text=True, timeout=600, cwd=repo,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fit-epochs: training images/s with all 2 sharing the device" in done.stdout
    assert (out / "lever-no-balance-seed0.tar.gz").is_file()
    assert "balance: none" in (tmp_path / "runs" / "lever-no-balance-seed0" / "config.yaml").read_text()
    with tarfile.open(out / "gpu-seed1.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    back = load(tmp_path / "back" / "gpu-seed1")
    trained = load(tmp_path / "runs" / "gpu-seed1")
    assert back.meta["weights_dtype"] == "float16" and back.arch == "paper_cnn"
    assert back.threshold == trained.threshold
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(back.margins(images), trained.margins(images), rtol=1e-2, atol=1e-2)


def test_a_bundle_over_the_file_limit_of_the_trip_back_comes_in_parts_that_join_to_it(tmp_path, monkeypatch):
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gpu_runs", repo / "scripts" / "gpu_runs.py")
    gpu_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_runs)
    monkeypatch.setattr(gpu_runs, "MAX_FILE", 1000)
    whole = np.random.default_rng(0).bytes(2500)
    (tmp_path / "small.tar.gz").write_bytes(whole[:1000])
    assert gpu_runs._split(tmp_path / "small.tar.gz") == [tmp_path / "small.tar.gz"]  # at the limit: one file
    (tmp_path / "run.tar.gz").write_bytes(whole)
    parts = gpu_runs._split(tmp_path / "run.tar.gz")
    assert [p.name for p in parts] == ["run.tar.gz.0", "run.tar.gz.1", "run.tar.gz.2"]
    assert not (tmp_path / "run.tar.gz").exists() and max(p.stat().st_size for p in parts) == 1000
    assert b"".join(p.read_bytes() for p in parts) == whole
