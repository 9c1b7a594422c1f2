"""Heatmaps: Grad-CAM for every kind of registry model, boxes, overlays, and the localisation scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fracdet.explain import Explainer, box_iou, heatmap_box, localisation_scores, localisation_summary, overlay
from fracdet.models import create_model, get_spec, list_models
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel


def trained(arch: str, size: int) -> TrainedModel:
    spec = get_spec(arch).preprocess
    torch.manual_seed(0)
    module = create_model(arch, input_size=size).eval()
    return TrainedModel(module=module, name=arch, arch=arch, preprocess=PreprocessCfg(size, spec.mean, spec.std))


@pytest.mark.parametrize(("arch", "size"), [("paper_cnn", 64), ("efficientnet_lite0", 64), ("resnet18", 64)])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmaps_come_with_the_same_margins_as_a_plain_forward_pass(arch, size, method):
    model = trained(arch, size)
    images = np.random.default_rng(0).integers(0, 256, (2, size, size), dtype=np.uint8)
    explanation = Explainer(model, method)(images)
    assert explanation.heatmaps.shape == (2, size, size)
    assert explanation.heatmaps.min() >= 0 and explanation.heatmaps.max() <= 1
    np.testing.assert_allclose(explanation.margins, model.margins(images), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", [a for a in list_models() if get_spec(a).task == "classify"])
def test_every_registered_classifier_gets_a_heatmap_at_its_registered_layer(arch):
    model = trained(arch, 64)
    explanation = Explainer(model, exact=True)(np.full((1, 64, 64), 128, np.uint8))
    assert explanation.heatmaps.shape == (1, 64, 64) and np.isfinite(explanation.heatmaps).all()


def test_a_localiser_is_not_explained_by_grad_cam_it_has_its_own_map():
    with pytest.raises(ValueError, match="its own"):
        Explainer(trained("localiser_lite0", 64))


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18", "densenet121"])
def test_forward_only_cam_equals_the_librarys_grad_cam(arch):
    model = trained(arch, 96)
    with torch.no_grad():  # a head that votes "fracture" for every channel: the map cannot be all zero
        weight = model.module.get_classifier().weight
        weight[1], weight[0] = weight[1].abs(), -weight[0].abs()
    images = np.random.default_rng(1).integers(0, 256, (3, 96, 96), dtype=np.uint8)
    fast = Explainer(model)
    assert fast.forward_only
    quick, exact = fast(images), Explainer(model, exact=True)(images)
    np.testing.assert_allclose(quick.margins, exact.margins, rtol=1e-4, atol=1e-5)
    assert quick.heatmaps.max() > 0.9 and quick.heatmaps.std() > 0.05  # a real map, not all zeros
    np.testing.assert_allclose(quick.heatmaps, exact.heatmaps, atol=2e-3)


def test_unknown_cam_method_is_refused():
    with pytest.raises(ValueError, match="unknown CAM method"):
        Explainer(trained("paper_cnn", 32), "lime")


def test_box_surrounds_the_hot_region_that_holds_the_maximum():
    heat = np.zeros((100, 100), np.float32)
    heat[10:20, 60:90] = 0.8  # a second, cooler blob
    heat[50:70, 20:40] = 1.0
    assert heatmap_box(heat) == pytest.approx((0.2, 0.5, 0.4, 0.7))
    assert heatmap_box(np.zeros((10, 10))) is None


def test_overlay_keeps_the_image_size_and_blends():
    image = np.full((40, 50), 100, np.uint8)
    out = overlay(image, np.ones((8, 8), np.float32), opacity=0.0)
    assert out.shape == (40, 50, 3) and (out == 100).all()
    assert (overlay(image, np.ones((8, 8), np.float32), opacity=0.5) != 100).any()


def test_pointing_game_and_iou_against_expert_boxes():
    assert box_iou((0, 0, 0.5, 0.5), (0, 0, 0.5, 0.5)) == pytest.approx(1.0)
    assert box_iou((0, 0, 0.5, 0.5), (0.25, 0, 0.75, 0.5)) == pytest.approx(1 / 3)
    hot_corner = np.zeros((1, 100, 100), np.float32)
    hot_corner[0, 5:15, 5:15] = 1.0
    right = localisation_scores(hot_corner, [[(0.0, 0.0, 0.2, 0.2)]])
    wrong = localisation_scores(hot_corner, [[(0.6, 0.6, 0.9, 0.9)]])
    assert bool(right["hit"].iloc[0]) and right["iou"].iloc[0] == pytest.approx(0.25)
    assert not wrong["hit"].iloc[0] and wrong["iou"].iloc[0] == 0.0
    # the centre baseline hits a box over the centre whatever the heatmap says
    centre = localisation_scores(hot_corner, [[(0.4, 0.4, 0.6, 0.6)]])
    assert bool(centre["centre_hit"].iloc[0]) and not centre["hit"].iloc[0]
    summary = localisation_summary(right)
    assert summary["images"] == 1 and summary["pointing_game"] == 1.0
