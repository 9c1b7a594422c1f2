"""Binary classification metrics with cluster-bootstrap confidence intervals, and calibration error.

Test images are not independent when copies of one radiograph (or one patient's images) sit together in
the test split, so intervals resample whole groups, not single images; with every image its own group
this is the ordinary bootstrap.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score

__all__ = ["METRICS", "binary_metrics", "bootstrap_intervals", "expected_calibration_error", "reliability_bins"]

#: Metrics reported at a threshold, in report order.
METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "kappa", "auc", "average_precision")


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict[str, float]:
    """Metrics of the rule ``prob >= threshold -> fracture``, plus the threshold-free AUC and AP.

    A metric whose denominator is empty (e.g. sensitivity without fractures) is ``nan``.
    """
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, np.float64)
    pred = (p >= threshold).astype(int)
    tp = int(np.sum((pred == 1) & (y == 1)))
    tn = int(np.sum((pred == 0) & (y == 0)))
    fp = int(np.sum((pred == 1) & (y == 0)))
    fn = int(np.sum((pred == 0) & (y == 1)))
    both = len(np.unique(y)) == 2

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    sens, prec = ratio(tp, tp + fn), ratio(tp, tp + fp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kappa = float(cohen_kappa_score(y, pred)) if len(y) else float("nan")
    return {
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "precision": prec,
        "f1": ratio(2 * prec * sens, prec + sens) if tp else 0.0 if (tp + fn) else float("nan"),
        "kappa": kappa,
        "auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "average_precision": float(average_precision_score(y, p)) if both else float("nan"),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }


def bootstrap_intervals(
    labels: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of :data:`METRICS` over ``n_boot`` resamples of whole groups."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, np.float64)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    _, group_index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)] if len(y) else []
    rng = np.random.default_rng(seed)
    samples = {m: [] for m in METRICS}
    for _ in range(n_boot):
        chosen = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[g] for g in chosen])
        values = binary_metrics(y[idx], p[idx], threshold)
        for m in METRICS:
            samples[m].append(values[m])
    alpha = (1 - level) / 2
    out = {}
    for m, vals in samples.items():
        v = np.asarray(vals, np.float64)
        v = v[~np.isnan(v)]
        out[m] = (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if len(v) else (np.nan, np.nan)
    return out


def reliability_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> list[dict[str, float]]:
    """Equal-width probability bins: count, mean predicted probability, observed fracture rate."""
    y = np.asarray(labels, np.float64)
    p = np.asarray(probs, np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        mask = which == b
        if mask.any():
            rows.append(
                {"low": edges[b], "high": edges[b + 1], "count": int(mask.sum()),
                 "confidence": float(p[mask].mean()), "observed": float(y[mask].mean())}
            )  # fmt: skip
    return rows


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """ECE: the count-weighted mean gap between predicted probability and observed rate over bins."""
    rows = reliability_bins(labels, probs, n_bins)
    total = sum(r["count"] for r in rows)
    return float(sum(r["count"] * abs(r["confidence"] - r["observed"]) for r in rows) / total) if total else np.nan
