"""What is fitted on the validation split after training: a temperature and the operating thresholds.

Both are part of the model, not of its evaluation: they are chosen on validation once, stored with the
weights, and then applied unchanged to test images and to patients. The test split never chooses anything.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import expit

from fracdet.models.release import TrainedModel

__all__ = ["OPERATING_POINTS", "calibrate", "choose_thresholds", "fit_temperature", "probabilities"]

#: Named operating points; ``sens90`` is the default: a fracture missed costs more than a second look.
OPERATING_POINTS = ("0.5", "youden", "sens90", "sens95")


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
    sensitivity is at least NN% (the most specific rule that still finds that share of fractures).
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(labels)
    p = np.asarray(scores, np.float64)
    out = {"0.5": 0.5}
    if len(np.unique(y)) < 2:
        return {**out, "youden": 0.5, "sens90": 0.5, "sens95": 0.5}
    fpr, tpr, thr = roc_curve(y, p, drop_intermediate=False)
    thr = np.minimum(thr, 1.0)  # sklearn puts +inf first
    out["youden"] = float(thr[np.argmax(tpr - fpr)])
    for name, target in (("sens90", 0.90), ("sens95", 0.95)):
        out[name] = float(thr[np.argmax(tpr >= target)])
    return out


def calibrate(
    model: TrainedModel,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    point: str = "sens90",
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> TrainedModel:
    """Fit ``model``'s temperature and thresholds on validation images and make ``point`` its operating point.

    Args:
        images: ``(N, H, W)`` uint8 validation images at the model's input size.
        labels: their labels (1 = fracture).
        device: where the model's weights are (training calibrates on its GPU, not the CPU).
    """
    margins = model.margins(images, batch_size=batch_size, device=device)
    model.temperature = fit_temperature(margins, labels)
    model.thresholds = choose_thresholds(labels, probabilities(margins, model.temperature))
    model.operating_point, model.threshold = point, model.thresholds[point]
    return model
