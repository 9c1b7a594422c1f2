"""The shipped model: loads on the CPU, is small, travels with its split, and reproduces its model card."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fracdet.data import load_dataset
from fracdet.data.split import apply_manifest
from fracdet.evaluation import evaluate
from fracdet.inference import Predictor, collect_inputs
from fracdet.models import list_releases, load
from fracdet.models.release import releases_dir
from fracdet.utils.cache import FeatureCache
from tests.conftest import REPO

NAME = "fracatlas-default"


@pytest.fixture(scope="module")
def model():
    return load(NAME)


def test_the_default_model_is_released_small_and_calibrated(model):
    assert NAME in list_releases()
    assert (releases_dir() / NAME / "model.safetensors").stat().st_size <= 25 * 2**20
    assert model.arch == "efficientnet_lite2" and model.preprocess.input_size == 320 and model.version != "unversioned"
    assert model.operating_point == "sens90" and 0 < model.threshold < 1 and model.temperature > 0
    assert model.meta["selected_on"] == "val"
    shipped = pd.read_csv(model.splits_path)
    committed = pd.read_csv(REPO / "splits" / "fracatlas_seed0.csv")
    assert set(shipped["path"]) == set(committed["path"])
    assert (shipped.set_index("path")["split"] == committed.set_index("path")["split"]).all()


def test_the_model_card_states_the_reported_numbers(model):
    card = (releases_dir() / "README.md").read_text()
    reported = model.meta["reported"]["test"]
    assert f"{reported['auc']:.3f}" in card
    assert model.meta["reported"]["command"] in card


def test_the_default_model_predicts_the_bundled_sample_on_cpu(model, sample_root):
    predictor = Predictor(model)
    table = predictor.predict_files(collect_inputs([sample_root / "images"]))
    readable = table[table["error"].isna()]
    assert len(readable) >= 40
    assert readable["probability"].between(0, 1).all()
    assert set(readable["label"]) <= {"fracture", "no fracture"}


@pytest.mark.shared
def test_the_default_model_reproduces_its_card_on_its_own_test_split(model, shared_data, cache_dir):
    table = apply_manifest(load_dataset(shared_data / "fracatlas"), model.splits_path)
    result = evaluate(model, table, split="test", n_boot=20, cache=FeatureCache(cache_dir))
    reported = model.meta["reported"]["test"]
    point = result.points["sens90"]
    assert result.thresholds["sens90"] == pytest.approx(model.threshold, abs=1e-6)
    for metric in ("auc", "sensitivity", "specificity"):
        assert point[metric] == pytest.approx(reported[metric], abs=2e-3), metric
    assert len(result.predictions) == reported["images"]
    assert np.isfinite(json.loads(json.dumps(result.to_dict()["calibration"]["ece_after"])))
