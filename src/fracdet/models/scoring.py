"""From network outputs to what a reader sees: calibrated probabilities, confidence levels and scored boxes.

Two operating points, both chosen on validation, grade every finding:

* **suspicious**: the threshold at which validation sensitivity reaches 0.90 (``sens90``): worth a look;
* **definite**: the threshold at which validation specificity reaches 0.95 (``spec95``): rarely a false alarm.

A verdict whose probability lies within :data:`BORDERLINE_LOGITS` of the threshold it is read at (the
model's operating threshold: *suspicious* as released) is **borderline** (:func:`borderline`): the same
radiograph re-saved or resized may get the other verdict, and the reader is told so.

An image's level is the highest its calibrated probability reaches; a box's level is the highest its own
calibrated probability reaches under the same two thresholds. A localiser's box logit is its image logit
with the map's peak replaced by the box's own peak (:mod:`fracdet.models.localiser`), so the top box always
carries the image's level and weaker regions carry lower ones.

A localiser's dense output has one channel (the fracture map) or, with a box head, :data:`BOX_CHANNELS`
more: per cell, the box of the fracture the cell lies in (:func:`decode_cell_boxes`). Boxes come out of it
outside the network, so the graph exports with a dynamic batch:

* **map boxes** (one channel): every local maximum of the map (strongest first) grows into the connected
  region above a fraction of its height (``relative``, fitted on validation so that the boxes fit the expert
  boxes: :func:`fracdet.training.calibrate.fit_box_relative`), and that region's bounding box is the box. A
  peak whose region holds a stronger box's peak is a shoulder of that box, not a box of its own.
* **regressed boxes** (a box head): every local maximum of the map is a candidate whose box is the one its
  cell regressed; overlapping candidates are merged by non-maximum suppression (torchvision's ``nms``), as
  in FCOS.

Coordinates are normalised to the whole image (0 to 1), which holds on the original radiograph too, since
images are squashed to the square input, not cropped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from scipy import ndimage
from scipy.special import expit, logit

__all__ = [
    "BORDERLINE_LOGITS",
    "BOX_CHANNELS",
    "LEVELS",
    "LEVEL_STYLE",
    "MAX_SHOWN_BOXES",
    "ScoredBox",
    "Scores",
    "borderline",
    "box_iou",
    "boxes_from_map",
    "decode_cell_boxes",
    "level_of",
    "level_thresholds",
    "scores_from_outputs",
    "shown_boxes",
]

#: Confidence levels, highest first, and the validation operating point that sets each threshold.
LEVELS = (("definite", "spec95"), ("suspicious", "sens90"))
#: Boxes a reader is shown at most per image (those that reach a level).
MAX_SHOWN_BOXES = 3
#: How near its threshold, in logits of the calibrated probability, a verdict is borderline: half a
#: logit takes a threshold of 0.08 to 0.05-0.13. The shipped default's verdicts that changed when validation
#: radiographs were re-saved (JPEG q95/q75, WebP q80, half size) lay this near in 93 of 100 cases, among 115
#: of 604 files (``docs/evidence/export-signature-1.1.1-val.json``; docs/STABILITY.md, *Is it how the files
#: were exported?*).
BORDERLINE_LOGITS = 0.5
#: Channels of a box head per map cell: centre offset ``(dx, dy)`` and log size ``(log w, log h)``, in cells.
BOX_CHANNELS = 4
#: Regressed boxes overlapping a stronger one by more than this IoU are the same finding.
NMS_IOU = 0.3
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


def borderline(probability: float | np.ndarray, threshold: float, *, logits: float = BORDERLINE_LOGITS) -> np.ndarray:
    """Whether calibrated probabilities lie within ``logits`` of ``threshold`` on the logit scale (a boolean
    array, or a 0-d one for a single probability): verdicts a re-saved copy of the radiograph may not keep.

    Why on the logit scale: a re-save moves a score by about as many logits wherever it lies, so the band is
    as wide in risk at a threshold of 0.08 as at 0.5, where a band of probability would not be.
    """
    eps = 1e-12
    p = np.clip(np.asarray(probability, np.float64), eps, 1 - eps)
    return np.abs(logit(p) - logit(np.clip(threshold, eps, 1 - eps))) < logits


def decode_cell_boxes(raw: torch.Tensor) -> torch.Tensor:
    """``(B, 4, h, w)`` box-head outputs -> ``(B, 4, h, w)`` boxes ``(x0, y0, x1, y1)`` in cell units.

    Each cell predicts its fracture's centre as an offset from the cell's own centre and its size on a log
    scale (CenterNet/FCOS-like), so a fracture smaller than a cell, or whose centre lies in another cell,
    is still expressible. Sizes are capped at 64 times the map, so an untrained head cannot overflow.
    """
    h, w = raw.shape[-2:]
    ys = torch.arange(h, device=raw.device, dtype=raw.dtype).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=raw.device, dtype=raw.dtype).view(1, 1, w) + 0.5
    cx, cy = xs + raw[:, 0], ys + raw[:, 1]
    limit = float(np.log(64.0 * max(h, w)))
    half_w, half_h = raw[:, 2].clamp(max=limit).exp() / 2, raw[:, 3].clamp(max=limit).exp() / 2
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=1)


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
    """Scored boxes from one image's map logits ``(h, w)`` or dense output ``(1 + BOX_CHANNELS, h, w)``.

    Strongest first. With a box head, each candidate's box is the one its cell regressed (``relative`` and
    ``upsample`` do not apply); otherwise the box is grown from the map.

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
    dense = np.asarray(map_logits, np.float32)
    if dense.ndim == 3 and dense.shape[0] > 1:
        return _regressed_boxes(dense, image_logit=image_logit, peak_weight=peak_weight, temperature=temperature,
                                levels=levels, max_boxes=max_boxes, floor=floor)  # fmt: skip
    logits = dense.reshape(dense.shape[-2:])
    if upsample > 1:
        h, w = logits.shape
        logits = cv2.resize(logits, (w * upsample, h * upsample), interpolation=cv2.INTER_LINEAR)
    prob = expit(logits)
    h, w = prob.shape
    ys, xs = _local_maxima(prob, floor)
    order = np.argsort(-prob[ys, xs], kind="stable")
    score = _peak_scorer(logits, image_logit, peak_weight, temperature, levels)
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
        boxes.append(score((cols.min() / w, rows.min() / h, (cols.max() + 1) / w, (rows.max() + 1) / h), y, x))
        if len(boxes) >= max_boxes:
            break
    return boxes


def _regressed_boxes(
    dense: np.ndarray,
    *,
    image_logit: float,
    peak_weight: float,
    temperature: float,
    levels: dict[str, float],
    max_boxes: int,
    floor: float,
) -> list[ScoredBox]:
    """Boxes of a box head: the regressed box of each local maximum of the map, after NMS."""
    logits = dense[0]
    h, w = logits.shape
    prob = expit(logits)
    ys, xs = _local_maxima(prob, floor)
    if not len(ys):
        return []
    cells = decode_cell_boxes(torch.from_numpy(dense[None, 1:]))[0].numpy()
    found = cells[:, ys, xs].T / np.array([w, h, w, h], np.float32)
    found = np.clip(found, 0.0, 1.0)
    from torchvision.ops import nms  # torchvision takes a second to import: only box heads need it

    keep = nms(torch.from_numpy(found), torch.from_numpy(prob[ys, xs]), NMS_IOU).numpy()[:max_boxes]
    score = _peak_scorer(logits, image_logit, peak_weight, temperature, levels)
    return [score(found[k], ys[k], xs[k]) for k in keep]


def _local_maxima(prob: np.ndarray, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the map's local maxima (3 x 3) at or above ``floor``: the candidate findings."""
    return np.nonzero((ndimage.maximum_filter(prob, size=3, mode="constant") == prob) & (prob >= floor))


def _peak_scorer(
    logits: np.ndarray, image_logit: float, peak_weight: float, temperature: float, levels: dict[str, float]
):
    """``score(xyxy, y, x) -> ScoredBox``: the box's logit is the image logit with the map's peak replaced by
    the logit at its own peak ``(y, x)``, calibrated by the temperature and levelled."""
    global_peak = float(logits.max())

    def score(xyxy, y: int, x: int) -> ScoredBox:
        probability = float(expit((image_logit - peak_weight * (global_peak - float(logits[y, x]))) / temperature))
        return ScoredBox(*(float(v) for v in xyxy), probability, level_of(probability, levels))

    return score


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
    """:class:`Scores` from margins and dense outputs ``(N, C, h, w)``, the map first.

    These are what :func:`fracdet.models.predict.predict_scores` returns.
    """
    probabilities = expit(np.asarray(margins, np.float64) / temperature)
    if maps is None:
        return Scores(margins, probabilities)
    maps = np.asarray(maps)
    levels = level_thresholds(thresholds)
    boxes = [
        boxes_from_map(m, image_logit=float(z), peak_weight=peak_weight, temperature=temperature, levels=levels,
                       max_boxes=max_boxes, relative=relative)
        for m, z in zip(maps, margins, strict=True)
    ]  # fmt: skip
    return Scores(margins, probabilities, expit(maps[:, 0]).astype(np.float32), boxes)
