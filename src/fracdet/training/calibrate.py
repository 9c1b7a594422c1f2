"""What is fitted on the validation split after training: a localiser's fusion, a temperature and the thresholds.

All are part of the model, not of its evaluation: they are chosen on validation once, stored with the
weights, and then applied unchanged to test images and to patients. The test split never chooses anything.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit

from fracdet.models.predict import predict_scores
from fracdet.models.release import TrainedModel

__all__ = [
    "BOX_RELATIVES",
    "OPERATING_POINTS",
    "calibrate",
    "choose_thresholds",
    "fit_box_relative",
    "fit_fusion",
    "fit_temperature",
    "probabilities",
]

#: Candidate box edges of a localiser (fraction of a peak's map probability), one chosen on validation.
BOX_RELATIVES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

#: Named operating points; ``sens90`` is the default: a fracture missed costs more than a second look.
#: ``sens90`` and ``spec95`` also set the *suspicious* and *definite* levels (:mod:`fracdet.models.scoring`).
OPERATING_POINTS = ("0.5", "youden", "sens90", "sens95", "spec95")


def probabilities(margins: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Fracture probability from logit margins: ``sigmoid(margin / T)``."""
    return expit(np.asarray(margins, np.float64) / temperature)


def fit_temperature(margins: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` that minimises the negative log-likelihood of ``labels`` (Guo et al., 2017).

    ``T > 1`` softens over-confident probabilities; the ranking, and so the AUC, does not change.
    """
    z = np.asarray(margins, np.float64)
    y = np.asarray(labels, np.float64)
    if len(np.unique(y)) < 2:
        return 1.0

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    result = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def choose_thresholds(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Probability thresholds for each named operating point, from validation labels and scores.

    ``youden`` maximises sensitivity + specificity - 1; ``sensNN`` is the highest threshold whose
    sensitivity is at least NN% (the most specific rule that still finds that share of fractures);
    ``spec95`` is the lowest threshold whose specificity is at least 95% (the most sensitive rule that
    raises few false alarms).
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels)
    p = np.asarray(scores, np.float64)
    out = {"0.5": 0.5}
    if len(np.unique(y)) < 2:
        return {**out, "youden": 0.5, "sens90": 0.5, "sens95": 0.5, "spec95": 0.5}
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # sklearn puts +inf first
    out["youden"] = float(thr[np.argmax(tpr - fpr)])
    for name, target in (("sens90", 0.90), ("sens95", 0.95)):
        out[name] = float(thr[np.argmax(tpr >= target)])
    specific = np.flatnonzero(1 - fpr >= 0.95)  # thresholds fall along the curve: the last is the lowest
    out["spec95"] = float(thr[specific[-1]])
    return out


def fit_fusion(
    model: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, float]:
    """Fit how a localiser's image logit combines its parts, on validation.

    The parts are the classifier head's logit, the map's peak and, for a fused localiser
    (:class:`fracdet.models.FusedLocaliser`), each classifier's margin: ``fusion`` holds their weights
    with the bias third. A logistic regression of the labels on the parts; a negative weight (a part
    arguing against the others) is dropped and the rest refitted. Sets the network's ``fusion`` buffer and
    returns the validation ROC AUC of each part and of the fusion (the fusion lever, measured where it is
    chosen).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    fusion = model.module.fusion
    names = getattr(model.module, "fusion_names", ("classifier", "map_peak", "bias"))

    def part(index: int) -> tuple[np.ndarray, np.ndarray | None]:  # the image logit is then that part alone
        fusion.copy_(torch.eye(len(fusion), dtype=fusion.dtype)[index])
        desc = f"fusion: {names[index]}" if progress else None
        return predict_scores(model.module, images, model.preprocess, batch_size=batch_size, device=device,
                              tta=model.tta, progress_desc=desc)  # fmt: skip

    classifier, maps = part(0)
    features = [classifier, maps[:, 0].reshape(len(maps), -1).max(axis=1)]
    features += [part(index)[0] for index in range(3, len(fusion))]
    columns = [i for i in range(len(fusion)) if i != 2]  # fusion index of each feature (2 is the bias)
    x = np.stack(features, axis=1).astype(np.float64)
    y = np.asarray(labels)
    fusion.copy_(torch.eye(len(fusion), dtype=fusion.dtype)[0])
    if len(np.unique(y)) < 2:
        return {}
    weights, bias = np.zeros(x.shape[1]), 0.0
    keep = list(range(x.shape[1]))
    while keep:
        fit = LogisticRegression(C=100.0).fit(x[:, keep], y)
        if (fit.coef_[0] >= 0).all():
            weights[keep], bias = fit.coef_[0], float(fit.intercept_[0])
            break
        keep = [k for k, w in zip(keep, fit.coef_[0], strict=True) if w > 0]
    else:
        weights[0] = 1.0
    fitted = torch.zeros_like(fusion)
    fitted[columns] = torch.tensor(weights, dtype=fusion.dtype, device=fusion.device)
    fitted[2] = bias
    fusion.copy_(fitted)
    aucs = {names[c]: float(roc_auc_score(y, x[:, k])) for k, c in enumerate(columns)}
    return {**aucs, "fused": float(roc_auc_score(y, x @ weights + bias))}


def fit_box_relative(
    model: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    boxes: list[list[list[float]]],
    *,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Choose where a localiser's boxes end: the edge that makes its strongest box fit the expert boxes best.

    Over the validation images with expert boxes, the mean IoU of the strongest box with its best-matching
    expert box, for each edge in :data:`BOX_RELATIVES`; the best is stored as ``model.meta["box_relative"]``.
    Returns the mean IoU of every candidate (what the choice saw).
    """
    from fracdet.models.scoring import box_iou, boxes_from_map

    keep = [i for i, (y, b) in enumerate(zip(labels, boxes, strict=True)) if y == 1 and b]
    if not keep or getattr(model.module, "box_head", None) is not None:  # a box head regresses its boxes
        return {}
    margins, maps = model.outputs(images[keep], batch_size=batch_size, device=device)
    fit = {}
    for relative in BOX_RELATIVES:
        ious = []
        for k, i in enumerate(keep):
            found = boxes_from_map(maps[k], image_logit=float(margins[k]), peak_weight=0.0, temperature=1.0,
                                   levels={}, max_boxes=1, relative=relative)  # fmt: skip
            ious.append(max((box_iou(found[0].xyxy, tuple(e)) for e in boxes[i]), default=0.0) if found else 0.0)
        fit[f"{relative:g}"] = float(np.mean(ious))
    model.meta["box_relative"] = float(max(fit, key=fit.get))
    return fit


def calibrate(
    model: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    point: str = "sens90",
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    boxes: list[list[list[float]]] | None = None,
    progress: bool = False,
) -> TrainedModel:
    """Fit ``model``'s fusion and box edge (a localiser), temperature and thresholds on validation.

    Args:
        images: ``(N, H, W)`` uint8 validation images at the model's input size.
        labels: their labels (1 = fracture).
        device: where the model's weights are (training calibrates on its GPU, not the CPU).
        boxes: the expert boxes of each image (normalised ``x0, y0, x1, y1``), for a localiser's box edge.

    ``point`` becomes the operating point. ``progress``: a progress bar per pass over the images.
    """
    if getattr(model.module, "fusion", None) is not None:
        model.meta["fusion_val_auc"] = fit_fusion(model, images, labels, batch_size=batch_size, device=device,
                                                  progress=progress)  # fmt: skip
        if boxes is not None:
            model.meta["box_relative_val_iou"] = fit_box_relative(model, images, labels, boxes, batch_size=batch_size,
                                                                  device=device)  # fmt: skip
    margins = model.margins(images, batch_size=batch_size, device=device,
                            progress_desc="calibrating" if progress else None)  # fmt: skip
    model.temperature = fit_temperature(margins, labels)
    model.thresholds = choose_thresholds(labels, probabilities(margins, model.temperature))
    model.operating_point, model.threshold = point, model.thresholds[point]
    return model
