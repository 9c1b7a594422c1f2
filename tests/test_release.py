"""The shipped models: load on the CPU, are small, travel with their split, and reproduce their model cards.

``fracatlas-default`` (1.1.0 on) is the int8 graph of ``fracatlas-localiser`` (``fracdet quantize``), refitted on
its own outputs: the fastest on a CPU. ``fracatlas-localiser`` (1.0.0, the default before it) is the fracture
localiser fused with the classifier in float: it says whether and where. ``fracatlas-classifier`` (0.3.0, the
default before that) is the paper's kind of model, kept as the baseline.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fracdet.data import load_dataset
from fracdet.data.pixels import load_pixels
from fracdet.data.split import apply_manifest
from fracdet.evaluation import evaluate
from fracdet.inference import Predictor, collect_inputs
from fracdet.inference.quantize import MAX_KERNEL_CHANGE, kernel_change
from fracdet.models import list_releases, load
from fracdet.models.release import REPORTED_LESION_FIGURES, releases_dir
from fracdet.utils.cache import FeatureCache
from tests.conftest import REPO

#: release name -> the task it does
RELEASES = {"fracatlas-default": "localise", "fracatlas-localiser": "localise", "fracatlas-classifier": "classify"}


@pytest.fixture(scope="module", params=list(RELEASES))
def model(request):
    return load(request.param)


def test_each_model_is_released_small_and_calibrated_on_the_committed_split(model):
    assert model.name in list_releases()
    assert (model.graph or releases_dir() / model.name / "model.safetensors").stat().st_size <= 25 * 2**20
    assert model.task == RELEASES[model.name] and model.preprocess.input_size == 320
    assert model.version != "unversioned" and model.meta["selected_on"] == "val"
    assert model.operating_point == "sens90" and 0 < model.threshold < 1 and model.temperature > 0
    shipped = pd.read_csv(model.splits_path)
    committed = pd.read_csv(REPO / "splits" / "fracatlas_seed0.csv")
    assert set(shipped["path"]) == set(committed["path"])
    assert (shipped.set_index("path")["split"] == committed.set_index("path")["split"]).all()


def test_the_localiser_carries_the_released_classifier_and_two_operating_points():
    localiser, classifier = load("fracatlas-localiser"), load("fracatlas-classifier")
    assert localiser.version == "1.0.0" and classifier.version == "0.3.0"
    assert set(localiser.levels) == {"suspicious", "definite"}
    assert localiser.levels["suspicious"] == pytest.approx(localiser.thresholds["sens90"])
    assert localiser.levels["definite"] == pytest.approx(localiser.thresholds["spec95"])
    inside = localiser.module.classifiers[0].state_dict()
    for key, weight in classifier.module.state_dict().items():  # the same float16-stored weights
        assert torch.equal(inside[key], weight), key


def test_the_default_is_the_localisers_int8_graph_and_kept_its_validation_auc():
    default, localiser = load("fracatlas-default"), load("fracatlas-localiser")
    assert default.precision == "int8" and default.module is None
    assert default.meta["graph"]["quantised_from"] == f"fracatlas-localiser {localiser.version}"
    assert default.version.split(".")[:2] == ["1", "1"]
    auc = default.meta["graph"]["val_auc"]
    assert auc["int8"] >= auc["float32"] - 0.005
    assert auc["float32"] == pytest.approx(localiser.meta["fusion_val_auc"]["fused"], abs=2e-3)
    assert set(default.levels) == {"suspicious", "definite"} and default.thresholds != localiser.thresholds


def test_the_model_card_states_the_reported_numbers(model):
    card = (releases_dir() / "README.md").read_text()
    reported = model.meta["reported"]
    assert f"`{model.name}` {model.version}" in card
    assert f"{reported['test']['auc']:.3f}" in card and reported["command"] in card
    for key, figure in reported.get("lesions", {}).items():
        if key != "levels":
            value = figure["value"] if isinstance(figure, dict) else figure
            assert f"{value:.3f}" in card, key


def test_each_model_predicts_the_bundled_sample_on_cpu(model, sample_root):
    table = Predictor(model).predict_files(collect_inputs([sample_root / "images"]))
    readable = table[table["error"].isna()]
    assert len(readable) >= 40
    assert readable["probability"].between(0, 1).all()
    assert set(readable["label"]) <= {"fracture", "no fracture"}


def test_the_int8_default_scores_on_this_cpu_as_its_arithmetic_says(sample_root):
    """ONNX Runtime's integer kernels differ between CPUs (on x86 without VNNI, 1.1.0's uint8 x int8 products
    saturated); the default's graph is quantised so that its fused kernels here stay within
    ``MAX_KERNEL_CHANGE`` of its reference arithmetic, which is the same on every CPU."""
    default = load("fracatlas-default")
    images = load_pixels(load_dataset(sample_root), default.preprocess.input_size).images
    change = kernel_change(default, images)
    assert change["max"] <= MAX_KERNEL_CHANGE, change


@pytest.mark.shared
def test_each_model_reproduces_its_card_on_its_own_test_split(model, shared_data, cache_dir):
    table = apply_manifest(load_dataset(shared_data / "fracatlas"), model.splits_path)
    result = evaluate(model, table, split="test", n_boot=20, cache=FeatureCache(cache_dir))
    reported = model.meta["reported"]
    point = result.points["sens90"]
    assert result.thresholds["sens90"] == pytest.approx(model.threshold, abs=1e-6)
    for metric in ("auc", "sensitivity", "specificity"):
        assert point[metric] == pytest.approx(reported["test"][metric], abs=2e-3), metric
    assert len(result.predictions) == reported["test"]["images"]
    assert np.isfinite(json.loads(json.dumps(result.to_dict()["calibration"]["ece_after"])))
    if model.task == "localise":
        for key in REPORTED_LESION_FIGURES:
            value = result.lesions["all"][key]["value"]
            assert value == pytest.approx(reported["lesions"][key]["value"], abs=2e-3), key
