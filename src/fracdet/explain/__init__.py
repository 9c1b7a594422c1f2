"""Explain: Grad-CAM heatmaps, overlays, boxes drawn by level, and how well heatmaps find the expert-marked fractures.

from fracdet.explain import Explainer, overlay
explanation = Explainer(fracdet.models.load("fracatlas-localiser"))(images)   # margins + heatmaps
"""

from __future__ import annotations

from fracdet.explain.cam import CAM_METHODS, Explainer, Explanation, heatmap_box, heatmaps_from_cams, overlay
from fracdet.explain.draw import draw_boxes
from fracdet.explain.localisation import box_iou, evaluate_localisation, localisation_scores, localisation_summary

__all__ = [
    "CAM_METHODS",
    "Explainer",
    "Explanation",
    "box_iou",
    "draw_boxes",
    "evaluate_localisation",
    "heatmap_box",
    "heatmaps_from_cams",
    "localisation_scores",
    "localisation_summary",
    "overlay",
]
