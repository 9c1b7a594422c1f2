"""From network outputs to what a reader sees: calibrated probabilities, confidence levels and scored boxes.

Two operating points, both chosen on validation, grade every finding:

* **suspicious**: the threshold at which validation sensitivity reaches 0.90 (``sens90``): worth a look;
* **definite**: the threshold at which validation specificity reaches 0.95 (``spec95``): rarely a false alarm.

An image's level is the highest its calibrated probability reaches; a box's level is the highest its own
calibrated probability reaches under the same two thresholds. A localiser's box logit is its image logit
with the map's peak replaced by the box's own peak (:mod:`fracdet.models.localiser`), so the top box always
carries the image's level and weaker regions carry lower ones.

Boxes are read off the fracture map outside the network: every local maximum of the map (strongest
first) grows into the connected region above a fraction of its height (``relative``, fitted on validation
so that the boxes fit the expert boxes: :func:`fracdet.training.calibrate.fit_box_relative`), and that
region's bounding box is the box. A peak whose region holds a stronger box's peak is a shoulder of that
box, not a box of its own. Coordinates are normalised to the whole image (0 to 1), which
holds on the original radiograph too, since images are squashed to the square input, not cropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.special import expit

__all__ = [
    "LEVELS",
    "LEVEL_STYLE",
    "MAX_SHOWN_BOXES",
    "ScoredBox",
    "Scores",
    "box_iou",
    "boxes_from_map",
    "level_of",
    "level_thresholds",
    "scores_from_outputs",
    "shown_boxes",
]

#: Confidence levels, highest first, and the validation operating point that sets each threshold.
LEVELS = (("definite", "spec95"), ("suspicious", "sens90"))
#: Boxes a reader is shown at most per image (those that reach a level).
MAX_SHOWN_BOXES = 3
#: How every output draws a box of each level (line style, RGB colour): the picture, the page, the report.
LEVEL_STYLE = {"definite": ("solid", (255, 64, 64)), "suspicious": ("dashed", (255, 191, 0))}


@dataclass(frozen=True)
class ScoredBox:
    """A suspected fracture: ``(x0, y0, x1, y1)`` in [0, 1] of the image, its calibrated probability and level."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float
    level: str | None

    def to_dict(self) -> dict[str, float | str | None]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


@dataclass
class Scores:
    """What a model says about a batch of images.

    Attributes:
        margins: logit margins ``(N,)`` (before the temperature).
        probabilities: calibrated fracture probabilities ``(N,)``.
        maps: the model's own fracture map, probabilities ``(N, h, w)`` in [0, 1]; ``None`` for a classifier.
        boxes: per image, scored boxes strongest first (up to the asked number, levelled or not); ``None``
            for a classifier.
    """

    margins: np.ndarray
    probabilities: np.ndarray
    maps: np.ndarray | None = None
    boxes: list[list[ScoredBox]] | None = None


def box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def level_thresholds(thresholds: dict[str, float]) -> dict[str, float]:
    """Probability threshold of each level a model has (older models lack ``spec95``: no *definite*).

    *definite* is never below *suspicious*: where validation specificity already reaches 0.95 at the
    suspicious threshold, both are the same.
    """
    out: dict[str, float] = {}
    if "sens90" in thresholds:
        out["suspicious"] = float(thresholds["sens90"])
    if "spec95" in thresholds:
        out["definite"] = max(float(thresholds["spec95"]), out.get("suspicious", 0.0))
    return out


def level_of(probability: float, levels: dict[str, float]) -> str | None:
    """The highest level ``probability`` reaches, or ``None``."""
    for name, _ in LEVELS:
        if name in levels and probability >= levels[name]:
            return name
    return None


def boxes_from_map(
    map_logits: np.ndarray,
    *,
    image_logit: float,
    peak_weight: float,
    temperature: float,
    levels: dict[str, float],
    max_boxes: int = 10,
    relative: float = 0.5,
    floor: float = 1e-3,
    upsample: int = 4,
) -> list[ScoredBox]:
    """Scored boxes from one image's map logits ``(h, w)``, strongest first.

    Args:
        image_logit: the fused image logit the map came with (a margin, before the temperature).
        peak_weight: the fusion weight ``b`` of the map's peak in the image logit.
        temperature: the model's temperature.
        levels: :func:`level_thresholds` of the model.
        max_boxes: at most this many boxes.
        relative: a box is the region above this fraction of its peak's probability.
        floor: peaks below this map probability are not boxes.
        upsample: the map is interpolated this many times finer before regions are drawn (smoother boxes).
    """
    logits = np.asarray(map_logits, np.float32)
    if upsample > 1:
        h, w = logits.shape
        logits = cv2.resize(logits, (w * upsample, h * upsample), interpolation=cv2.INTER_LINEAR)
    prob = expit(logits)
    h, w = prob.shape
    peaks = (ndimage.maximum_filter(prob, size=3, mode="constant") == prob) & (prob >= floor)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-prob[ys, xs], kind="stable")
    global_peak = float(logits.max())
    taken = np.zeros(prob.shape, bool)
    emitted = np.zeros(prob.shape, bool)  # the peaks of the boxes so far
    boxes: list[ScoredBox] = []
    for y, x in zip(ys[order], xs[order], strict=True):
        if taken[y, x]:
            continue
        regions, _ = ndimage.label(prob >= relative * prob[y, x])
        region = regions == regions[y, x]
        taken |= region
        if (region & emitted).any():  # a shoulder of a stronger box
            continue
        emitted[y, x] = True
        rows, cols = np.nonzero(region)
        logit = image_logit - peak_weight * (global_peak - float(logits[y, x]))
        score = float(expit(logit / temperature))
        boxes.append(ScoredBox(float(cols.min() / w), float(rows.min() / h), float((cols.max() + 1) / w),
                               float((rows.max() + 1) / h), score, level_of(score, levels)))  # fmt: skip
        if len(boxes) >= max_boxes:
            break
    return boxes


def shown_boxes(boxes: list[ScoredBox]) -> list[ScoredBox]:
    """The boxes a reader is shown: those that reach a level, strongest first, at most :data:`MAX_SHOWN_BOXES`."""
    return [b for b in boxes if b.level is not None][:MAX_SHOWN_BOXES]


def scores_from_outputs(
    margins: np.ndarray,
    maps: np.ndarray | None,
    *,
    temperature: float,
    thresholds: dict[str, float],
    peak_weight: float,
    max_boxes: int = 10,
    relative: float = 0.5,
) -> Scores:
    """:class:`Scores` from margins and map logits (what :func:`fracdet.models.predict.predict_scores` returns)."""
    probabilities = expit(np.asarray(margins, np.float64) / temperature)
    if maps is None:
        return Scores(margins, probabilities)
    levels = level_thresholds(thresholds)
    boxes = [
        boxes_from_map(m, image_logit=float(z), peak_weight=peak_weight, temperature=temperature, levels=levels,
                       max_boxes=max_boxes, relative=relative)
        for m, z in zip(maps, margins, strict=True)
    ]  # fmt: skip
    return Scores(margins, probabilities, expit(maps).astype(np.float32), boxes)
