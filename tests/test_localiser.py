"""The fracture localiser: network contract, masks that move with pixels, boxes from the map, fusion,
lesion-level metrics, and the same answer through training, evaluation, prediction, ONNX and the server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from scipy.special import expit
from torchvision import tv_tensors
from torchvision.transforms import v2

from fracdet.data.masks import fracture_mask
from fracdet.evaluation.evaluate import evaluate, write_report
from fracdet.evaluation.lesions import LesionData, average_precision, froc, hits, localised_sensitivity
from fracdet.models import create_model, load, save_model
from fracdet.models.predict import mirror_dense
from fracdet.models.scoring import (
    ScoredBox,
    borderline,
    boxes_from_map,
    decode_cell_boxes,
    level_of,
    level_thresholds,
    shown_boxes,
)
from fracdet.training import load_config, train
from fracdet.training.augment import AugmentedImages, Reencode
from fracdet.training.calibrate import choose_thresholds
from fracdet.training.losses import box_targets, task_loss
from fracdet.utils.cache import FeatureCache
from tests.conftest import REPO, SAMPLE
from tests.test_training import sample_manifest

TINY = ["image_size=64", "epochs=1", "batch_size=8", "pretrained=false"]


@pytest.fixture(scope="module")
def manifest():
    table = sample_manifest(SAMPLE)
    table["split"] = np.where(np.arange(len(table)) % 3 == 1, "test", table["split"])
    return table


@pytest.fixture(scope="module")
def localiser_run(manifest, tmp_path_factory, cache_dir):
    run = tmp_path_factory.mktemp("runs") / "localiser"
    train(load_config(REPO / "configs" / "localiser.yaml", TINY), manifest, run, cache=FeatureCache(cache_dir))
    return run


# --- the network ---------------------------------------------------------------------------------


def test_forward_gives_an_image_logit_and_a_stride_8_map_and_every_parameter_learns():
    model = create_model("localiser_lite0").train()
    x = torch.randn(2, 3, 64, 64)
    image_logit, map_logits = model(x)
    assert image_logit.shape == (2,) and map_logits.shape == (2, 1, 8, 8)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:20, 30:40] = 1
    loss = task_loss((image_logit, map_logits), torch.tensor([1, 0]), masks, class_weight=torch.tensor([0.6, 2.8]))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_a_detector_adds_four_box_channels_per_cell_and_its_box_loss_reaches_every_head():
    model = create_model("detector_lite0").train()
    image_logit, dense = model(torch.randn(2, 3, 64, 64))
    assert image_logit.shape == (2,) and dense.shape == (2, 5, 8, 8)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 10:20, 30:40] = 1
    without_boxes = task_loss((image_logit, dense), torch.tensor([1, 0]), masks, box_weight=0.0)
    loss = task_loss((image_logit, dense), torch.tensor([1, 0]), masks)
    assert loss > without_boxes  # an untrained box head is wrong, and says so
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    assert model.box_head[-1].weight.grad.abs().sum() > 0


def test_a_localiser_needs_its_masks_and_a_side_divisible_by_32():
    model = create_model("localiser_lite0")
    with pytest.raises(ValueError, match="masks"):
        task_loss(model(torch.randn(1, 3, 64, 64)), torch.tensor([1]))
    with pytest.raises(ValueError, match="multiple of 32"):
        load_config(REPO / "configs" / "localiser.yaml", ["image_size=250"])


# --- masks and augmentation ---------------------------------------------------------------------


def test_masks_from_boxes_and_polygons_cover_the_annotation_and_never_vanish():
    box = fracture_mask(100, [[0.1, 0.2, 0.3, 0.5]])
    assert box[20:50, 10:30].all() and box.sum() == 30 * 20
    tiny = fracture_mask(64, [[0.5, 0.5, 0.501, 0.501]])
    assert tiny.sum() >= 1
    triangle = fracture_mask(100, [[0.0, 0.0, 0.0]], [[0.1, 0.1, 0.9, 0.1, 0.1, 0.9]], target="polygon")
    assert triangle[20, 20] == 1 and triangle[80, 80] == 0
    fallback = fracture_mask(100, [[0.1, 0.1, 0.2, 0.2]], [], target="polygon")
    assert fallback.sum() == 100


def test_augmentation_moves_the_mask_with_the_pixels_and_reencoding_leaves_it_alone():
    image = np.zeros((1, 64, 64), np.uint8)
    image[0, 10:20, 5:15] = 255
    dataset = AugmentedImages(image, np.array([1]), v2.RandomHorizontalFlip(1.0),
                              annotations=[([[5 / 64, 10 / 64, 15 / 64, 20 / 64]], [])])  # fmt: skip
    x, label, mask = dataset[0]
    assert label == 1 and isinstance(x, torch.Tensor) and not isinstance(x, tv_tensors.Image)
    assert torch.equal((x[0] > 127).to(torch.uint8), mask)
    assert mask[10:20, 49:59].all() and mask.sum() == 100

    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 64, 64), dtype=np.uint8))
    reencoded, kept = Reencode(p=1.0, quality=(30, 30), rescale=0.5)(tv_tensors.Image(noise), tv_tensors.Mask(mask))
    assert reencoded.shape == noise.shape and not torch.equal(reencoded, noise)
    assert torch.equal(kept, mask)


def test_box_targets_are_each_fractures_extent_after_augmentation_and_the_smallest_owns_shared_cells():
    image = np.zeros((1, 64, 64), np.uint8)
    big, small = [0 / 64, 0 / 64, 32 / 64, 32 / 64], [8 / 64, 8 / 64, 16 / 64, 16 / 64]
    dataset = AugmentedImages(image, np.array([1]), v2.RandomHorizontalFlip(1.0), annotations=[([small, big], [])])
    _, _, mask = dataset[0]
    assert set(torch.unique(mask).tolist()) == {0, 1, 2}  # one number per fracture
    cells, boxes = box_targets(mask[None], (8, 8))
    assert cells[0, :4, 4:].all() and cells.sum() == 16
    assert boxes[0, :, 0, 7].tolist() == [4.0, 0.0, 8.0, 4.0]  # the big one, mirrored, in cells
    assert boxes[0, :, 1, 6].tolist() == [6.0, 1.0, 7.0, 2.0]  # the small one inside it owns its cell


# --- boxes, levels and thresholds ---------------------------------------------------------------


def test_a_detectors_boxes_are_regressed_at_the_maps_peaks_and_one_fracture_gives_one_box():
    dense = np.full((5, 16, 16), -8.0, np.float32)
    dense[1:] = 0.0
    for (row, col), logit in (((4, 4), 3.0), ((4, 7), 2.0), ((12, 12), 0.0)):
        dense[0, row, col] = logit
    dense[1:, 4, 4] = [0.5, 0.0, np.log(6.0), np.log(2.0)]  # centre (5, 4.5), 6 x 2 cells
    dense[1:, 4, 7] = [-2.5, 0.0, np.log(6.0), np.log(2.0)]  # the same fracture, seen from a cell beside it
    levels = {"suspicious": 0.3, "definite": 0.8}
    boxes = boxes_from_map(dense, image_logit=2.0, peak_weight=0.5, temperature=1.0, levels=levels)
    assert len(boxes) == 2  # the second peak's box was suppressed as the same finding
    first, far = boxes
    assert first.xyxy == pytest.approx((2 / 16, 3.5 / 16, 8 / 16, 5.5 / 16))
    assert first.score == pytest.approx(expit(2.0)) and first.level == "definite"  # the top box is the image
    assert far.xyxy == pytest.approx((12 / 16, 12 / 16, 13 / 16, 13 / 16)) and far.level == "suspicious"


def test_a_mirrored_images_boxes_mirror_back():
    raw = torch.randn(1, 4, 6, 9)
    mirrored = decode_cell_boxes(mirror_dense(torch.cat([torch.zeros(1, 1, 6, 9), raw], 1))[:, 1:])
    expected = decode_cell_boxes(raw).flip(3)
    assert torch.allclose(mirrored[:, 0], 9 - expected[:, 2], atol=1e-5)
    assert torch.allclose(mirrored[:, 2], 9 - expected[:, 0], atol=1e-5)
    assert torch.allclose(mirrored[:, 1::2], expected[:, 1::2], atol=1e-5)


def test_boxes_come_from_the_maps_peaks_strongest_first_with_the_top_box_scored_as_the_image():
    logits = np.full((16, 16), -8.0, np.float32)
    logits[2:5, 3:6] = 3.0  # strong
    logits[10:13, 10:14] = 0.0  # weaker
    levels = {"suspicious": 0.3, "definite": 0.8}
    boxes = boxes_from_map(logits, image_logit=2.0, peak_weight=0.5, temperature=1.0, levels=levels, upsample=1)
    assert len(boxes) == 2
    strong, weak = boxes
    assert strong.xyxy == pytest.approx((3 / 16, 2 / 16, 6 / 16, 5 / 16))
    assert weak.xyxy == pytest.approx((10 / 16, 10 / 16, 14 / 16, 13 / 16))
    assert strong.score == pytest.approx(expit(2.0)) and weak.score == pytest.approx(expit(2.0 - 0.5 * 3.0))
    assert (strong.level, weak.level) == ("definite", "suspicious")
    assert shown_boxes([*boxes, ScoredBox(0, 0, 1, 1, 0.1, None)] * 2) == [strong, weak, strong]


@pytest.mark.parametrize("channels", [1, 5], ids=["map boxes", "regressed boxes"])
def test_the_boxes_a_reader_is_shown_are_always_among_the_first_three_so_no_more_need_growing(channels):
    from scipy import ndimage

    from fracdet.models.scoring import MAX_SHOWN_BOXES

    rng = np.random.default_rng(0)
    levels = {"suspicious": 0.3, "definite": 0.8}
    for _ in range(40):
        dense = rng.normal(0, 1, (channels, 24, 24)).astype(np.float32)
        dense[0] = 8 * ndimage.gaussian_filter(dense[0], 2) - 1  # smooth fields with several peaks
        read = {"image_logit": float(rng.normal(0, 2)), "peak_weight": 0.8, "temperature": 1.0, "levels": levels}
        every = boxes_from_map(dense, max_boxes=10, **read)
        assert [b.score for b in every] == sorted((b.score for b in every), reverse=True)
        assert shown_boxes(boxes_from_map(dense, max_boxes=MAX_SHOWN_BOXES, **read)) == shown_boxes(every)


def test_a_shoulder_of_a_stronger_peak_is_not_a_box_of_its_own():
    y, x = np.mgrid[0:32, 0:32]
    blob = 6.0 * np.exp(-((y - 10) ** 2 + (x - 10) ** 2) / 20.0)
    shoulder = 0.3 * np.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 4.0)  # a small bump on the big blob's flank
    logits = (blob + shoulder - 4.0).astype(np.float32)
    boxes = boxes_from_map(logits, image_logit=1.0, peak_weight=1.0, temperature=1.0, levels={}, upsample=1,
                           relative=0.3)  # fmt: skip
    assert len(boxes) == 1 and boxes[0].x0 < 10 / 32 < boxes[0].x1
    tight = boxes_from_map(logits, image_logit=1.0, peak_weight=1.0, temperature=1.0, levels={}, upsample=1,
                           relative=0.8)  # fmt: skip
    assert (tight[0].x1 - tight[0].x0) < (boxes[0].x1 - boxes[0].x0)  # a higher edge draws a tighter box


def test_the_box_edge_is_chosen_on_validation_to_fit_the_expert_boxes(localiser_run):
    from fracdet.training.calibrate import BOX_RELATIVES, fit_box_relative

    model = load(localiser_run)
    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64), dtype=np.uint8)
    boxes = [[[0.1, 0.1, 0.4, 0.4]], [], [[0.5, 0.5, 0.9, 0.7]], [[0.2, 0.6, 0.3, 0.9]]]
    fit = fit_box_relative(model, images, np.array([1, 0, 1, 1]), boxes)
    assert set(fit) == {f"{r:g}" for r in BOX_RELATIVES} and all(0 <= v <= 1 for v in fit.values())
    assert model.box_relative == float(max(fit, key=fit.get))
    assert "box_relative" in json.loads((localiser_run / "model.json").read_text())  # training fitted one


def test_levels_follow_the_validation_thresholds_and_definite_is_never_below_suspicious():
    assert level_thresholds({"sens90": 0.3, "spec95": 0.2}) == {"suspicious": 0.3, "definite": 0.3}
    assert level_thresholds({"sens90": 0.3}) == {"suspicious": 0.3}  # releases before schema 2
    levels = {"suspicious": 0.3, "definite": 0.7}
    assert [level_of(p, levels) for p in (0.1, 0.3, 0.9)] == [None, "suspicious", "definite"]


def test_a_verdict_is_borderline_within_half_a_logit_of_its_threshold_on_either_side():
    """The band evaluation counts flips in (``near_threshold``) is the one the reader is told of."""
    from scipy.special import expit, logit

    assert [bool(borderline(expit(logit(0.08) + d), 0.08)) for d in (-0.6, -0.4, 0.4, 0.6)] == [
        False, True, True, False
    ]  # fmt: skip
    assert not borderline(0.14, 0.08) and borderline(0.52, 0.45)  # a band of logits: narrower in p near 0


def test_spec95_is_the_lowest_threshold_keeping_95_percent_specificity():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(400, int), np.ones(100, int)]
    scores = np.r_[rng.uniform(0, 0.8, 400), rng.uniform(0.3, 1, 100)]
    t = choose_thresholds(labels, scores)["spec95"]
    assert np.mean(scores[labels == 0] < t) >= 0.95
    assert np.mean(scores[labels == 0] < np.max(scores[scores < t])) < 0.95


# --- lesion-level metrics -----------------------------------------------------------------------


def _box(x0, y0, x1, y1, score):
    return ScoredBox(x0, y0, x1, y1, score, "suspicious")


def test_hit_rules_froc_localised_sensitivity_and_map_on_a_hand_made_split():
    expert = [(0.1, 0.1, 0.3, 0.3)]
    boxes = [
        [_box(0.1, 0.1, 0.3, 0.3, 0.9)],  # fractured: exact hit
        [_box(0.6, 0.6, 0.8, 0.8, 0.8), _box(0.12, 0.05, 0.44, 0.5, 0.4)],  # fractured: a miss, then a centre-only hit
        [_box(0.4, 0.4, 0.5, 0.5, 0.7)],  # normal: a false positive
        [],  # normal: nothing
    ]
    data = LesionData.build([1, 1, 0, 0], [0.9, 0.8, 0.7, 0.1], boxes, [expert, expert, [], []])
    assert (
        hits((0.12, 0.05, 0.44, 0.5), expert, "centre").all() and not hits((0.12, 0.05, 0.44, 0.5), expert, "iou").any()
    )
    idx = np.arange(4)
    # false-positive scores (iou rule): 0.8, 0.7, 0.4; at 0.5 FP/image two are allowed: boxes above 0.4 count
    assert froc(data, idx, "iou", (0.25, 0.5, 1.0)) == {"0.25": 0.5, "0.5": 0.5, "1": 0.5}
    assert froc(data, idx, "centre", (0.25, 1.0)) == {"0.25": 0.5, "1": 1.0}
    assert localised_sensitivity(data, idx, 0.5, "iou") == 0.5
    assert localised_sensitivity(data, idx, 0.3, "centre") == 1.0
    assert average_precision(data, idx, fractured_only=True)["map50"] == pytest.approx(0.5, abs=0.01)
    perfect = LesionData.build([1], [0.9], [[_box(*expert[0], 0.9)]], [expert])
    assert average_precision(perfect, np.arange(1))["map50"] == pytest.approx(1.0)


# --- end to end: train, evaluate, predict, export, serve ----------------------------------------


def test_training_writes_a_self_describing_localiser_with_fusion_and_levels(localiser_run):
    meta = json.loads((localiser_run / "model.json").read_text())
    assert (meta["task"], meta["schema_version"], meta["model"]) == ("localise", 2, "localiser_lite0")
    assert set(meta["fusion"]) == {"classifier", "map_peak", "bias"}
    assert meta["fusion"]["classifier"] >= 0 and meta["fusion"]["map_peak"] >= 0
    assert set(meta["fusion_val_auc"]) == {"classifier", "map_peak", "fused"}
    model = load(localiser_run)
    assert model.task == "localise" and set(model.levels) == {"suspicious", "definite"}
    assert model.peak_weight == pytest.approx(meta["fusion"]["map_peak"], abs=1e-6)
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    scores = model.score(images)
    assert scores.maps.shape == (3, 8, 8) and ((scores.maps >= 0) & (scores.maps <= 1)).all()
    assert np.allclose(scores.probabilities, model.predict_proba(images))
    for probability, boxes in zip(scores.probabilities, scores.boxes, strict=True):
        assert boxes and boxes[0].score == pytest.approx(probability, abs=1e-5)  # the top box is the image


def test_a_detector_trains_scores_and_exports_through_the_same_commands(manifest, tmp_path, cache_dir):
    run = tmp_path / "detector"
    train(load_config(REPO / "configs" / "localiser.yaml", [*TINY, "model=detector_lite0"]), manifest, run,
          cache=FeatureCache(cache_dir))  # fmt: skip
    model = load(run)
    assert (model.task, model.arch) == ("localise", "detector_lite0") and "box_relative" not in model.meta
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8)
    scores = model.score(images, tta=True)
    assert scores.maps.shape == (3, 8, 8)
    for probability, boxes in zip(scores.probabilities, scores.boxes, strict=True):
        assert boxes and boxes[0].score == pytest.approx(probability, abs=1e-5)
        assert all(0 <= b.x0 <= b.x1 <= 1 and 0 <= b.y0 <= b.y1 <= 1 for b in boxes)
    pytest.importorskip("onnxruntime")
    from fracdet.inference.onnx import OnnxRuntime, export_onnx

    dense = OnnxRuntime(export_onnx(model, tmp_path / "detector.onnx"), threads=1)(images).dense
    assert dense.shape == (3, 5, 8, 8) and np.allclose(dense, model.outputs(images)[1], atol=1e-3)


def test_a_newer_schema_is_refused_and_a_classifier_release_still_loads(localiser_run, tmp_path):
    meta = json.loads((localiser_run / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps({**meta, "schema_version": 99}))
    with pytest.raises(ValueError, match="newer"):
        load(tmp_path)
    classifier = load("fracatlas-classifier")  # release 0.3.0, written before schema 2
    assert classifier.task == "classify" and "schema_version" not in classifier.meta
    assert set(classifier.levels) == {"suspicious"}


def test_evaluation_reports_lesion_level_figures_with_intervals_and_pictures(localiser_run, manifest, cache_dir,
                                                                             tmp_path):  # fmt: skip
    model = load(localiser_run)
    result = evaluate(model, manifest, split="test", n_boot=20, cache=FeatureCache(cache_dir))
    lesions = result.lesions
    assert set(lesions) >= {"levels", "all", "without_hardware", "subgroups"}
    every = lesions["all"]
    for key in ("froc_iou@1", "froc_centre@0.5", "localised_sensitivity_iou@suspicious",
                "localised_sensitivity_centre@definite", "false_boxes_per_normal@suspicious", "map50_all",
                "map_fractured", "image_auc"):  # fmt: skip
        lo, hi = every[key]["ci95"]
        assert lo <= every[key]["value"] <= hi or np.isnan(every[key]["value"]), key
    assert every["images"] == len(result.predictions)
    write_report(result, tmp_path)
    assert (tmp_path / "froc.png").is_file() and (tmp_path / "boxes.png").is_file()
    assert "Where: the localiser" in (tmp_path / "report.html").read_text()
    shown = json.loads(pd_read(tmp_path)["shown_boxes"].iloc[0])
    assert all(set(b) == {"x0", "y0", "x1", "y1", "score", "level"} for b in shown)


def pd_read(folder):
    import pandas as pd

    return pd.read_csv(folder / "predictions.csv")


def test_onnx_export_has_a_dynamic_batch_and_matches_pytorch(localiser_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from fracdet.inference.onnx import OnnxRuntime, export_onnx

    model = load(localiser_run)
    runtime = OnnxRuntime(export_onnx(model, tmp_path / "localiser.onnx"), threads=1)
    assert runtime.meta["task"] == "localise" and runtime.meta["peak_weight"] == pytest.approx(model.peak_weight)
    for n in (1, 3):
        images = np.random.default_rng(n).integers(0, 255, (n, 64, 64), dtype=np.uint8)
        outputs = runtime(images)
        expected_margins, expected_maps = model.outputs(images)
        assert np.allclose(outputs.margins, expected_margins, atol=1e-3)
        assert np.allclose(outputs.dense, expected_maps, atol=1e-3)


def test_predictor_and_api_give_boxes_levels_and_the_map_and_keep_every_old_field(localiser_run, tmp_path):
    from fracdet.serve import create_app

    model = load(localiser_run)
    client = TestClient(create_app(model))
    data = (SAMPLE / "images" / "Fractured" / "IMG0000261.jpg").read_bytes()
    body = client.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}).json()
    old = {"probability", "label", "threshold", "operating_point", "summary", "box", "model", "latency_ms",
           "timings_ms", "image_png", "heatmap_png"}  # fmt: skip
    assert old <= set(body) and {"boxes", "level", "levels", "heatmap_kind"} <= set(body)
    assert body["heatmap_kind"] == "map" and body["heatmap_png"]
    assert set(body["levels"]) == {"suspicious", "definite"}
    assert all(b["level"] in ("suspicious", "definite") and 0 <= b["x0"] < b["x1"] <= 1 for b in body["boxes"])
    assert len(body["boxes"]) <= 3
    assert client.get("/api/v1/model").json()["task"] == "localise"

    from fracdet.inference import Predictor

    rows = Predictor(model).predict_files([SAMPLE / "images" / "Fractured" / "IMG0000261.jpg"], heatmap_dir=tmp_path)
    assert json.loads(rows["boxes"].iloc[0]) == body["boxes"]
    assert rows["level"].iloc[0] == body["level"]


def test_overlays_draw_definite_boxes_solid_and_suspicious_boxes_dashed():
    from fracdet.explain import draw_boxes

    canvas = np.zeros((100, 100, 3), np.uint8)
    definite, suspicious = (
        ScoredBox(0.1, 0.5, 0.4, 0.9, 0.9, "definite"),
        ScoredBox(0.6, 0.5, 0.9, 0.9, 0.5, "suspicious"),
    )
    drawn = draw_boxes(canvas, [definite, suspicious])
    bottom_solid = drawn[89, 12:38].any(axis=1)  # the definite box's bottom edge
    bottom_dashed = drawn[89, 62:88].any(axis=1)
    assert bottom_solid.all() and 0.2 < bottom_dashed.mean() < 0.9
    assert not draw_boxes(canvas, [ScoredBox(0, 0, 1, 1, 0.1, None)]).any()


def test_save_and_load_round_trip_keeps_the_fusion(localiser_run, tmp_path):
    model = load(localiser_run)
    save_model(model, tmp_path / "copy", half=True)
    again = load(tmp_path / "copy")
    assert torch.allclose(again.module.fusion, model.module.fusion, atol=1e-3)
