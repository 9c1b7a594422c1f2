"""Ensembles: several runs answer as one (mean logit margin), calibrated on validation, stored and explained
like any trained model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fracdet.cli import main
from fracdet.evaluation import evaluate
from fracdet.evaluation.metrics import binary_metrics
from fracdet.explain import Explainer
from fracdet.models import Ensemble, combine, create_model, get_spec, load
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel
from fracdet.training import train
from fracdet.training.calibrate import probabilities
from fracdet.training.ensemble import build_ensemble
from fracdet.utils.cache import FeatureCache
from tests.conftest import SAMPLE
from tests.test_training import sample_manifest, tiny_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        train(tiny_config(epochs=1, seed=seed), sample_manifest(SAMPLE), root / f"seed{seed}",
              cache=FeatureCache(cache_dir))  # fmt: skip
    return [root / "seed0", root / "seed1"]


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_an_ensemble_answers_with_the_mean_of_its_members_margins(two_runs):
    members = [load(run) for run in two_runs]
    ensemble = combine(members)
    images = random_images(4, 32)
    expected = np.mean([m.margins(images) for m in members], axis=0)
    assert not np.allclose(members[0].margins(images), members[1].margins(images))  # two different networks
    np.testing.assert_allclose(ensemble.margins(images), expected, rtol=1e-5, atol=1e-6)
    assert isinstance(ensemble.module, Ensemble) and ensemble.meta["members"] == [str(r) for r in two_runs]


def test_members_must_share_architecture_preprocessing_and_split_manifest(two_runs, tmp_path):
    a = load(two_runs[0])
    with pytest.raises(ValueError, match="at least two"):
        combine([a])
    other_arch = TrainedModel(module=create_model("resnet18", input_size=32), name="r", arch="resnet18",
                              preprocess=get_spec("resnet18").preprocess)  # fmt: skip
    with pytest.raises(ValueError, match="architecture and preprocessing"):
        combine([a, other_arch])
    moved = tmp_path / "other-split"
    shutil.copytree(two_runs[1], moved)
    manifest = (moved / "splits.csv").read_text().splitlines()
    (moved / "splits.csv").write_text("\n".join([manifest[0], *reversed(manifest[1:])]) + "\n")
    with pytest.raises(ValueError, match="different split manifests"):
        combine([a, load(moved)])


def test_a_built_ensemble_is_calibrated_on_val_and_reloads_as_it_was_saved(two_runs, tmp_path, cache_dir):
    table = sample_manifest(SAMPLE)
    ensemble = build_ensemble([load(r) for r in two_runs], table, tmp_path / "ens", cache=FeatureCache(cache_dir))
    written = {p.name for p in (tmp_path / "ens").iterdir()}
    assert {"model.safetensors", "model.json", "splits.csv", "run.json"} <= written
    reloaded = load(tmp_path / "ens")
    images = random_images(5, 32, seed=3)
    np.testing.assert_allclose(reloaded.margins(images), ensemble.margins(images), rtol=1e-6, atol=1e-6)
    assert reloaded.threshold == ensemble.threshold and reloaded.operating_point == "sens90"
    # the stored sens90 threshold reaches sensitivity 0.90 on the validation images that chose it
    val = evaluate(reloaded, table, split="val", n_boot=10, cache=FeatureCache(cache_dir))
    labels = val.predictions["label"].to_numpy()
    probs = probabilities(val.predictions["margin"].to_numpy(), reloaded.temperature)
    assert binary_metrics(labels, probs, reloaded.threshold)["sensitivity"] >= 0.9
    assert json.loads((tmp_path / "ens" / "run.json").read_text())["data_root"] == str(table.attrs["root"])


def test_half_precision_storage_halves_the_file_and_keeps_the_margins(two_runs, tmp_path, cache_dir):
    table = sample_manifest(SAMPLE)
    full = build_ensemble([load(r) for r in two_runs], table, tmp_path / "full", cache=FeatureCache(cache_dir))
    build_ensemble([load(r) for r in two_runs], table, tmp_path / "half", half=True, cache=FeatureCache(cache_dir))
    sizes = [(tmp_path / name / "model.safetensors").stat().st_size for name in ("full", "half")]
    assert sizes[1] < 0.55 * sizes[0]
    half = load(tmp_path / "half")
    assert half.meta["weights_dtype"] == "float16" and next(half.module.parameters()).dtype == torch.float32
    images = random_images(6, 32, seed=4)
    np.testing.assert_allclose(half.margins(images), full.margins(images), rtol=1e-3, atol=1e-2)


def test_an_ensemble_is_explained_at_every_members_layer_as_the_library_would():
    spec = get_spec("efficientnet_lite0")
    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = create_model("efficientnet_lite0", input_size=96).eval()
        with torch.no_grad():  # heads that vote "fracture" on every channel: the maps cannot be all zero
            weight = module.get_classifier().weight
            weight[1], weight[0] = weight[1].abs(), -weight[0].abs()
        preprocess = PreprocessCfg(96, spec.preprocess.mean, spec.preprocess.std)
        members.append(TrainedModel(module=module, name=f"m{seed}", arch="efficientnet_lite0", preprocess=preprocess))
    ensemble = combine(members)
    images = random_images(3, 96, seed=1)
    fast = Explainer(ensemble)
    assert fast.forward_only
    quick, exact = fast(images), Explainer(ensemble, exact=True)(images)
    np.testing.assert_allclose(quick.margins, ensemble.margins(images), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(quick.margins, exact.margins, rtol=1e-4, atol=1e-5)
    assert quick.heatmaps.max() > 0.9 and quick.heatmaps.std() > 0.05
    np.testing.assert_allclose(quick.heatmaps, exact.heatmaps, atol=2e-3)
    single = Explainer(members[0])(images).heatmaps
    assert not np.allclose(quick.heatmaps, single, atol=1e-2)  # both members count


def test_the_ensemble_command_writes_a_model_and_refuses_a_single_run(two_runs, tmp_path, capsys):
    assert main(["ensemble", *map(str, two_runs), "--out", str(tmp_path / "cli"), "--half"]) == 0
    assert "ensemble of 2 paper_cnn models" in capsys.readouterr().out
    assert load(tmp_path / "cli").meta["weights_dtype"] == "float16"
    with pytest.raises(SystemExit, match="at least two"):
        main(["ensemble", str(two_runs[0]), "--out", str(tmp_path / "one")])
