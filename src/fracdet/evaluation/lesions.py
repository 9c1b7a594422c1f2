"""Lesion-level evaluation of a localiser: are its boxes on the expert's fractures, and how many are false?

Every measure is taken on the evaluated split *with its normal images*, since a localiser that draws boxes
on normal radiographs costs readers time, and every interval is a 95% bootstrap over groups of copies:

* **FROC**: the fraction of expert fractures hit by a box against the false-positive boxes per image, as
  the box threshold falls; read at 0.5, 1 and 2 false positives per image. A box that hits no expert box is
  a false positive; further boxes on an already-hit fracture are neither.
* **box mAP** at IoU 0.5 and averaged over 0.5:0.95 (COCO), by ``torchmetrics``' MeanAveragePrecision, on
  all images and on fractured images only (the protocol of published FracAtlas numbers).
* **localised sensitivity** at each operating point: the fraction of fractured images that are flagged
  *and* show a box (at most :data:`~fracdet.models.scoring.MAX_SHOWN_BOXES`, each reaching the point's
  threshold) that hits an expert box.
* **false-positive boxes per normal image** at each operating point (boxes shown on images without fracture).

A box *hits* an expert box under two rules, both reported: ``iou`` (IoU >= 0.25) and ``centre`` (the
predicted box's centre lies inside the expert box).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fracdet.evaluation.metrics import group_bootstrap
from fracdet.models.scoring import MAX_SHOWN_BOXES, ScoredBox, box_iou

__all__ = ["FP_RATES", "HIT_RULES", "IOU_HIT", "LesionData", "hits", "lesion_metrics", "lesion_table"]

Box = tuple[float, float, float, float]
#: Hit rules (see the module docstring) and the IoU a box needs under ``iou``.
HIT_RULES = ("iou", "centre")
IOU_HIT = 0.25
#: False positives per image at which the FROC curve is read.
FP_RATES = (0.5, 1.0, 2.0)


def hits(box: Box, experts: list[Box], rule: str) -> np.ndarray:
    """Which ``experts`` the predicted ``box`` hits under ``rule`` (``iou`` or ``centre``)."""
    if rule == "iou":
        return np.array([box_iou(box, e) >= IOU_HIT for e in experts], bool)
    if rule == "centre":
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        return np.array([e[0] <= cx <= e[2] and e[1] <= cy <= e[3] for e in experts], bool)
    raise ValueError(f"hit rule must be one of {', '.join(HIT_RULES)}, not {rule!r}")


@dataclass
class LesionData:
    """Per evaluated image: label, calibrated probability, predicted boxes (strongest first), expert boxes.

    ``lesion_best[rule][i]``: per expert box of image ``i``, the highest score of a predicted box that hits
    it (``-inf`` if none); ``fp_scores[rule][i]``: scores of the predicted boxes that hit no expert box.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    boxes: list[list[ScoredBox]]
    experts: list[list[Box]]
    groups: np.ndarray | None
    lesion_best: dict[str, list[np.ndarray]]
    fp_scores: dict[str, list[np.ndarray]]

    @classmethod
    def build(cls, labels, probabilities, boxes, experts, groups=None) -> LesionData:
        best: dict[str, list[np.ndarray]] = {r: [] for r in HIT_RULES}
        false: dict[str, list[np.ndarray]] = {r: [] for r in HIT_RULES}
        for predicted, expert in zip(boxes, experts, strict=True):
            for rule in HIT_RULES:
                top = np.full(len(expert), -np.inf)
                misses = []
                for box in predicted:
                    hit = hits(box.xyxy, expert, rule)
                    if hit.any():
                        top[hit] = np.maximum(top[hit], box.score)
                    else:
                        misses.append(box.score)
                best[rule].append(top)
                false[rule].append(np.asarray(misses, np.float64))
        return cls(np.asarray(labels, int), np.asarray(probabilities, np.float64), boxes, experts,
                   None if groups is None else np.asarray(groups), best, false)  # fmt: skip

    def __len__(self) -> int:
        return len(self.labels)


def froc(data: LesionData, idx: np.ndarray, rule: str, rates: tuple[float, ...] = FP_RATES) -> dict[str, float]:
    """Lesion sensitivity at each false-positive rate per image, on images ``idx`` (repeats allowed)."""
    lesions = np.concatenate([data.lesion_best[rule][i] for i in idx]) if len(idx) else np.zeros(0)
    false = np.sort(np.concatenate([data.fp_scores[rule][i] for i in idx]))[::-1] if len(idx) else np.zeros(0)
    out = {}
    for rate in rates:
        allowed = int(np.floor(rate * len(idx) + 1e-9))
        if not len(lesions):
            out[f"{rate:g}"] = float("nan")
        elif allowed >= len(false):
            out[f"{rate:g}"] = float(np.mean(np.isfinite(lesions)))
        else:  # boxes strictly above the (allowed + 1)-th highest false-positive score
            out[f"{rate:g}"] = float(np.mean(lesions > false[allowed]))
    return out


def froc_curve(data: LesionData, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """``(false positives per image, lesion sensitivity)`` over every box threshold, for plotting."""
    lesions = np.concatenate(data.lesion_best[rule]) if len(data) else np.zeros(0)
    false = np.concatenate(data.fp_scores[rule]) if len(data) else np.zeros(0)
    thresholds = np.unique(np.concatenate([lesions[np.isfinite(lesions)], false]))[::-1]
    fp = np.array([(false >= t).sum() / len(data) for t in thresholds])
    sens = np.array([(lesions >= t).mean() if len(lesions) else np.nan for t in thresholds])
    return fp, sens


def _shown(boxes: list[ScoredBox], threshold: float) -> list[ScoredBox]:
    return [b for b in boxes if b.score >= threshold][:MAX_SHOWN_BOXES]


def localised_sensitivity(data: LesionData, idx: np.ndarray, threshold: float, rule: str) -> float:
    """Share of fractured images in ``idx`` flagged at ``threshold`` with a shown box hitting an expert box."""
    found = [data.probabilities[i] >= threshold
             and any(hits(b.xyxy, data.experts[i], rule).any() for b in _shown(data.boxes[i], threshold))
             for i in idx if data.labels[i] == 1]  # fmt: skip
    return float(np.mean(found)) if found else float("nan")


def false_boxes_per_normal(data: LesionData, idx: np.ndarray, threshold: float) -> float:
    """Mean number of boxes shown at ``threshold`` on the images without fracture in ``idx``."""
    counts = [len(_shown(data.boxes[i], threshold)) for i in idx if data.labels[i] == 0]
    return float(np.mean(counts)) if counts else float("nan")


def average_precision(data: LesionData, idx: np.ndarray, *, fractured_only: bool = False) -> dict[str, float]:
    """COCO box mAP at IoU 0.5 (``map50``) and over 0.5:0.95 (``map``), by torchmetrics, on images ``idx``."""
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    preds, targets = [], []
    for i in idx:
        if fractured_only and data.labels[i] != 1:
            continue
        boxes = data.boxes[i]
        preds.append({"boxes": torch.tensor([b.xyxy for b in boxes], dtype=torch.float32).reshape(-1, 4) * 1000,
                      "scores": torch.tensor([b.score for b in boxes], dtype=torch.float32),
                      "labels": torch.zeros(len(boxes), dtype=torch.int64)})  # fmt: skip
        expert = data.experts[i]
        targets.append({"boxes": torch.tensor(expert, dtype=torch.float32).reshape(-1, 4) * 1000,
                        "labels": torch.zeros(len(expert), dtype=torch.int64)})  # fmt: skip
    if not any(len(t["boxes"]) for t in targets):
        return {"map50": float("nan"), "map": float("nan")}
    metric.update(preds, targets)
    result = metric.compute()
    return {"map50": float(result["map_50"]), "map": float(result["map"])}


def _headline(data: LesionData, levels: dict[str, float]) -> Callable[[np.ndarray], dict[str, float]]:
    """The statistics of :func:`lesion_metrics` on a set of image indices, flat, for the bootstrap."""

    def statistic(idx: np.ndarray) -> dict[str, float]:
        out: dict[str, float] = {}
        for rule in HIT_RULES:
            out.update({f"froc_{rule}@{k}": v for k, v in froc(data, idx, rule).items()})
            for level, threshold in levels.items():
                out[f"localised_sensitivity_{rule}@{level}"] = localised_sensitivity(data, idx, threshold, rule)
        for level, threshold in levels.items():
            out[f"false_boxes_per_normal@{level}"] = false_boxes_per_normal(data, idx, threshold)
        return out

    return statistic


def _with_map(data: LesionData) -> Callable[[np.ndarray], dict[str, float]]:
    def statistic(idx: np.ndarray) -> dict[str, float]:
        every = average_precision(data, idx)
        fractured = average_precision(data, idx, fractured_only=True)
        return {"map50_all": every["map50"], "map_all": every["map"],
                "map50_fractured": fractured["map50"], "map_fractured": fractured["map"]}  # fmt: skip

    return statistic


def lesion_metrics(
    data: LesionData, levels: dict[str, float], *, n_boot: int = 1000, n_boot_map: int = 200, seed: int = 0
) -> dict[str, dict[str, float | list[float]]]:
    """Every lesion-level figure with its 95% group-bootstrap interval: ``{name: {"value", "ci95"}}``.

    Args:
        levels: probability threshold of each level (``suspicious``, ``definite``), chosen on validation.
        n_boot_map: resamples for the mAP intervals (each recomputes COCO mAP, so fewer by default).
    """
    everything = np.arange(len(data))
    out: dict[str, dict[str, float | list[float]]] = {}
    for statistic, resamples in ((_headline(data, levels), n_boot), (_with_map(data), n_boot_map)):
        values = statistic(everything)
        intervals = group_bootstrap(statistic, len(data), groups=data.groups, n_boot=resamples, seed=seed)
        out.update({k: {"value": v, "ci95": list(intervals[k])} for k, v in values.items()})
    return out


def lesion_table(data: LesionData, levels: dict[str, float], frame: pd.DataFrame) -> pd.DataFrame:
    """Per fractured image: flagged and localised (both rules) at each level, beside ``frame``'s subgroup columns."""
    rows = []
    for i in np.flatnonzero(data.labels == 1):
        row = {}
        for level, threshold in levels.items():
            row[f"flagged@{level}"] = bool(data.probabilities[i] >= threshold)
            for rule in HIT_RULES:
                row[f"localised_{rule}@{level}"] = localised_sensitivity(data, np.array([i]), threshold, rule) == 1.0
        rows.append(row)
    return pd.concat([frame.iloc[np.flatnonzero(data.labels == 1)].reset_index(drop=True), pd.DataFrame(rows)],
                     axis=1)  # fmt: skip
