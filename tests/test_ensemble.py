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


# --- a localiser fused with classifiers ---------------------------------------------------------------


def tiny_pair(seed: int = 0) -> tuple[TrainedModel, TrainedModel]:
    """An untrained 64-px localiser and a 96-px classifier with the same normalisation."""
    torch.manual_seed(seed)
    spec = get_spec("localiser_lite0").preprocess
    localiser = TrainedModel(module=create_model("localiser_lite0").eval(), name="loc", arch="localiser_lite0",
                             preprocess=PreprocessCfg(64, spec.mean, spec.std))  # fmt: skip
    classifier = TrainedModel(module=create_model("efficientnet_lite0").eval(), name="cls", arch="efficientnet_lite0",
                              preprocess=PreprocessCfg(96, spec.mean, spec.std), meta={"version": "9.9.9"})  # fmt: skip
    return localiser, classifier


def test_a_fused_localiser_adds_each_classifiers_margin_to_its_own_parts_and_keeps_its_map():
    import torch.nn.functional as F  # noqa: N812

    from fracdet.models import FusedLocaliser
    from fracdet.models.predict import logit_margin, normalise

    localiser, classifier = tiny_pair()
    fused = combine([localiser, classifier])
    assert isinstance(fused.module, FusedLocaliser) and fused.task == "localise"
    assert fused.preprocess.input_size == 96 and fused.meta["fused"][1]["name"] == "cls 9.9.9"
    weights = torch.tensor([0.5, 0.3, -0.1, 0.7])
    fused.module.fusion.copy_(weights)
    images = random_images(3, 96)
    margins, maps = fused.outputs(images)
    x = normalise(torch.from_numpy(images).unsqueeze(1), fused.preprocess)
    with torch.no_grad():
        small = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        head, dense = localiser.module(small)  # its own fusion was reset to the head alone
        margin = logit_margin(classifier.module(x))
    expected = 0.5 * head + 0.3 * dense[:, 0].flatten(1).amax(1) - 0.1 + 0.7 * margin
    np.testing.assert_allclose(margins, expected.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(maps, dense.numpy(), rtol=1e-4, atol=1e-4)
    assert maps.shape == (3, 1, 8, 8)  # the localiser's stride-8 map of its own 64-px input
    with torch.no_grad():
        parts = fused.module.fusion_inputs(x)
    assert parts.shape == (3, 4) and torch.equal(parts[:, 2], torch.ones(3))
    np.testing.assert_allclose((parts @ weights).numpy(), margins, rtol=1e-4, atol=1e-4)


def test_a_fused_localiser_is_fitted_on_val_and_reloads_and_exports_as_it_was_saved(tmp_path, cache_dir):
    localiser, classifier = tiny_pair(seed=1)
    table = sample_manifest(SAMPLE)
    fused = build_ensemble([localiser, classifier], table, tmp_path / "fused", cache=FeatureCache(cache_dir))
    meta = json.loads((tmp_path / "fused" / "model.json").read_text())
    assert list(meta["fusion"]) == ["classifier", "map_peak", "bias", "cls 9.9.9"]
    assert all(meta["fusion"][k] >= 0 for k in ("classifier", "map_peak", "cls 9.9.9"))
    assert set(meta["fusion_val_auc"]) == {"classifier", "map_peak", "cls 9.9.9", "fused"}
    assert "box_relative" in meta and set(fused.levels) == {"suspicious", "definite"}
    reloaded = load(tmp_path / "fused")
    images = random_images(2, 96, seed=5)
    again, before = reloaded.score(images), fused.score(images)
    np.testing.assert_allclose(again.probabilities, before.probabilities, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.maps, before.maps, rtol=1e-5, atol=1e-6)
    assert [b.score for b in again.boxes[0]] == pytest.approx([b.score for b in before.boxes[0]], abs=1e-5)
    pytest.importorskip("onnxruntime")
    from fracdet.inference.onnx import OnnxRuntime, export_onnx

    outputs = OnnxRuntime(export_onnx(reloaded, tmp_path / "fused.onnx"), threads=1)(images)
    expected_margins, expected_maps = reloaded.outputs(images)
    np.testing.assert_allclose(outputs.margins, expected_margins, atol=1e-3)
    np.testing.assert_allclose(outputs.dense, expected_maps, atol=1e-3)


def test_a_fused_localiser_holds_one_localiser_and_members_that_normalise_alike():
    localiser, classifier = tiny_pair()
    with pytest.raises(ValueError, match="one localiser"):
        combine([localiser, tiny_pair(seed=2)[0], classifier])
    other = TrainedModel(module=classifier.module, name="imagenet", arch="efficientnet_lite0",
                         preprocess=PreprocessCfg(96, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))  # fmt: skip
    with pytest.raises(ValueError, match="mean and std"):
        combine([localiser, other])


# --- a fused localiser fine-tuned whole -------------------------------------------------------------


def fused_tuning(start, **overrides):
    from fracdet.training import load_config
    from tests.conftest import REPO

    settings = {"image_size": 96, "epochs": 2, "batch_size": 8, "pretrained": "false", "init_from": str(start),
                "stability.weight": 1, **overrides}  # fmt: skip
    return load_config(REPO / "configs" / "localiser.yaml", [f"{k}={v}" for k, v in settings.items()])


@pytest.fixture(scope="module")
def fused_start(tmp_path_factory):
    """An untrained fused model whose fusion weighs every part (a part weighed 0 gets no gradient)."""
    from fracdet.models import save_model

    fused = combine(list(tiny_pair(seed=1)), name="start")
    fused.module.fusion.copy_(torch.tensor([0.5, 0.3, 0.1, 0.7]))
    return save_model(fused, tmp_path_factory.mktemp("fused") / "start")


def test_a_fused_model_fine_tuned_whole_trains_every_part_and_is_refitted_on_val(fused_start, tmp_path, cache_dir):
    from fracdet.models import FusedLocaliser
    from fracdet.training.calibrate import fit_fusion

    manifest, cache = sample_manifest(SAMPLE), FeatureCache(cache_dir)
    result = train(fused_tuning(fused_start), manifest, tmp_path / "tuned", cache=cache)
    assert "train_score_change" in result.history  # the stability loss, on the fused image logit
    start, tuned = load(fused_start), load(tmp_path / "tuned")
    assert isinstance(tuned.module, FusedLocaliser) and tuned.preprocess == start.preprocess
    assert tuned.meta["fused"] == start.meta["fused"] and tuned.meta["init_from"] == str(fused_start)
    before, after = start.module.state_dict(), tuned.module.state_dict()
    for part in ("localiser.", "classifiers.0."):  # end to end: both networks learned
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part) and "weight" in k)
    # The fusion and thresholds were fitted on validation to the trained weights, not carried over.
    val = manifest[manifest["split"] == "val"]
    val.attrs.update(manifest.attrs)
    from fracdet.data.pixels import load_pixels

    pixels = load_pixels(val, tuned.preprocess.input_size, cache=cache)
    fitted = tuned.module.fusion.clone()
    fit_fusion(tuned, pixels.images, pixels.table["label"].to_numpy(int))
    torch.testing.assert_close(tuned.module.fusion, fitted, atol=1e-5, rtol=1e-4)
    assert set(tuned.meta["fusion_val_auc"]) == {"classifier", "map_peak", "cls 9.9.9", "fused"}


def test_a_fused_fine_tune_starts_from_its_weights_stops_and_resumes_as_one(fused_start, tmp_path, cache_dir):
    manifest, cache = sample_manifest(SAMPLE), FeatureCache(cache_dir)
    still = train(fused_tuning(fused_start, **{"optimizer.lr": 1e-12}), manifest, tmp_path / "still", cache=cache)
    before, after = load(fused_start).module, load(still.out_dir).module
    moved = {k: (before.state_dict()[k] - v).abs().max().item() for k, v in after.named_parameters()}
    assert max(moved.values()) < 1e-3  # only batch-norm statistics moved
    config = fused_tuning(fused_start)
    train(config, manifest, tmp_path / "resumed", cache=cache, stop_after=1)
    halfway = load(tmp_path / "resumed" / "checkpoints" / "last.pt")  # before model.json: described by run.json
    assert type(halfway.module) is type(before) and halfway.preprocess.input_size == 96
    resumed = train(config, manifest, tmp_path / "resumed", cache=cache, resume=True)
    whole = train(config, manifest, tmp_path / "whole", cache=cache)
    np.testing.assert_allclose(resumed.history["val_auc"], whole.history["val_auc"])
    with pytest.raises(ValueError, match="set image_size: 96"):
        train(fused_tuning(fused_start, image_size=64), manifest, tmp_path / "x", cache=cache)


# --- a fused localiser trained as one, from ImageNet weights -------------------------------------------


def fused_from_imagenet(**overrides):
    from fracdet.training import load_config
    from tests.conftest import REPO

    settings = {"model": "localiser_lite0", "fused.classifiers": "[efficientnet_lite0]", "fused.sizes": "[64, 96]",
                "image_size": "null", "epochs": 1, "batch_size": 8, "stability.weight": 1, **overrides}  # fmt: skip
    return load_config(REPO / "configs" / "localiser.yaml", [f"{k}={v}" for k, v in settings.items()])


def test_a_fused_config_names_a_localiser_classifiers_and_one_side_each():
    from fracdet.training import ConfigError

    config = fused_from_imagenet()
    assert config.input_size == 96 and config.fused.sizes == [64, 96]  # read at the largest part's side
    for overrides, problem in [
        ({"fused.sizes": "[64]"}, "must hold 2 sides"),
        ({"fused.sizes": "[48, 96]"}, "multiple of 32"),
        ({"image_size": 64}, "image_size must be 96"),
        ({"fused.classifiers": "[localiser_lite1]"}, "not a classifier"),
        ({"fused.classifiers": "[resnet18]"}, "normalises its input otherwise"),
        ({"fused.classifiers": "efficientnet_lite0"}, "must be a list"),
        ({"model": "efficientnet_lite0"}, "is not one"),
        ({"init_from": "fracatlas-localiser"}, "set one of them"),
        ({"fused.classifiers": "[]"}, "fused.sizes needs fused.classifiers"),
        ({"fused.classifiers": "[]", "fused.sizes": "[]", "fused.part_weight": 1}, "name fused.classifiers"),
    ]:
        with pytest.raises(ConfigError, match=problem):
            fused_from_imagenet(**overrides)


def test_a_part_the_fusion_weighs_zero_still_learns_from_its_own_loss():
    from fracdet.training.losses import task_loss

    localiser, classifier = tiny_pair()
    fused = combine([localiser, classifier]).module.train()
    x, labels = torch.randn(4, 3, 96, 96), torch.tensor([0, 1, 1, 0])
    masks = torch.zeros(4, 96, 96, dtype=torch.long)
    masks[1:3, 20:40, 30:50] = 1
    outputs = fused(x)
    assert len(outputs) == 3 and outputs[2].shape == (4, 2)  # in training: the head's and the classifier's logits
    assert len(fused.eval()(x)) == 2  # as it answers: the fused logit and the map
    fused.train()
    stem = fused.classifiers[0].conv_stem.weight  # the fusion weighs the classifier 0 until it is fitted
    for part_weight, learns in [(0.0, False), (1.0, True)]:
        stem.grad = None
        task_loss(fused(x), labels, masks, part_weight=part_weight).backward()
        assert bool(stem.grad is not None and stem.grad.abs().sum() > 0) is learns
    head, margin = outputs[2][:, 0], outputs[2][:, 1]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.stack([head, margin], 1),
                                                                    labels.float()[:, None].expand(4, 2))  # fmt: skip
    extra = task_loss(outputs, labels, masks, part_weight=2.0) - task_loss(outputs, labels, masks)
    torch.testing.assert_close(extra, 2.0 * expected)


def test_a_fused_model_trained_as_one_starts_from_imagenet_weights_and_is_fitted_on_val(tmp_path, cache_dir):
    from fracdet.models import FusedLocaliser

    manifest, cache = sample_manifest(SAMPLE), FeatureCache(cache_dir)
    config = fused_from_imagenet(**{"fused.part_weight": 1, "optimizer.lr": 1e-12})
    train(config, manifest, tmp_path / "run", cache=cache, stop_after=1)
    halfway = load(tmp_path / "run" / "checkpoints" / "last.pt")  # before model.json: described by run.json
    assert isinstance(halfway.module, FusedLocaliser) and halfway.preprocess.input_size == 96
    torch.testing.assert_close(halfway.module.fusion, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))  # parts alike
    imagenet = create_model("efficientnet_lite0", pretrained=True).conv_stem.weight
    torch.testing.assert_close(halfway.module.classifiers[0].conv_stem.weight, imagenet)  # lr 1e-12: unmoved
    assert halfway.module.localiser.state_dict().keys() == create_model("localiser_lite0").state_dict().keys()

    result = train(config, manifest, tmp_path / "run", cache=cache, resume=True)
    trained = load(result.out_dir)
    assert [(p["model"], p["input_size"], p["name"]) for p in trained.meta["fused"]] == [
        ("localiser_lite0", 64, "localiser_lite0"), ("efficientnet_lite0", 96, "efficientnet_lite0")]  # fmt: skip
    assert set(trained.meta["fusion_val_auc"]) == {"classifier", "map_peak", "efficientnet_lite0", "fused"}
    assert not torch.allclose(trained.module.fusion, halfway.module.fusion)  # refitted on validation
    margins, maps = trained.outputs(random_images(2, 96))
    assert margins.shape == (2,) and maps.shape[0] == 2
