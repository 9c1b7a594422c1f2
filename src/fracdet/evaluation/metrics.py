"""Binary classification metrics with cluster-bootstrap confidence intervals, and calibration error.

Test images are not independent when copies of one radiograph (or one patient's images) sit together in
the test split, so intervals resample whole groups, not single images; with every image its own group
this is the ordinary bootstrap.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import numpy as np
from sklearn.metrics import average_precision_score, cohen_kappa_score, roc_auc_score, roc_curve

__all__ = [
    "METRICS",
    "binary_metrics",
    "bootstrap_interval",
    "bootstrap_intervals",
    "expected_calibration_error",
    "group_bootstrap",
    "reliability_bins",
    "specificity_at_sensitivity",
    "threshold_choice_intervals",
]

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


def specificity_at_sensitivity(labels: np.ndarray, probs: np.ndarray, sensitivity: float) -> float:
    """The best specificity of any threshold that reaches ``sensitivity`` on these images: a point of their ROC.

    Threshold-free like the AUC, it reads the evaluated split's own curve and chooses nothing. Beside the
    specificity at a validation-chosen threshold it separates what the ranking costs from what carrying
    the threshold over from validation costs. ``nan`` unless both classes are present.
    """
    y = np.asarray(labels).astype(int)
    if len(np.unique(y)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(y, np.asarray(probs, np.float64), drop_intermediate=False)
    return float(1.0 - fpr[np.argmax(tpr >= sensitivity - 1e-12)])


def bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(labels, probs)`` over ``n_boot`` resamples of whole groups."""
    y = np.asarray(labels).astype(int)
    p = np.asarray(probs, np.float64)
    values = [statistic(y[idx], p[idx]) for idx in _group_resamples(groups, len(y), n_boot, seed)]
    return _percentiles(values, level)


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
    samples = {m: [] for m in METRICS}
    for idx in _group_resamples(groups, len(y), n_boot, seed):
        values = binary_metrics(y[idx], p[idx], threshold)
        for m in METRICS:
            samples[m].append(values[m])
    return {m: _percentiles(vals, level) for m, vals in samples.items()}


def threshold_choice_intervals(
    val_labels: np.ndarray,
    val_probs: np.ndarray,
    test_labels: np.ndarray,
    test_probs: np.ndarray,
    choose: Callable[[np.ndarray, np.ndarray], dict[str, float]],
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, tuple[float, float]]]:
    """How far each operating point would move had the validation split held other patients.

    :func:`bootstrap_intervals` holds the threshold fixed, yet a threshold such as "sensitivity 0.90 on
    validation" is itself an estimate from about a hundred fractures, and its test specificity moves with
    it. This resamples whole validation groups, re-chooses every threshold with ``choose`` (labels, scores
    -> named thresholds) and applies it to the unchanged test scores.

    Returns:
        per operating point: intervals of the ``threshold`` and of the test ``sensitivity`` and
        ``specificity`` it gives.
    """
    vy, vp = np.asarray(val_labels).astype(int), np.asarray(val_probs, np.float64)
    ty, tp = np.asarray(test_labels).astype(int), np.asarray(test_probs, np.float64)
    samples: dict[str, dict[str, list[float]]] = {}
    for idx in _group_resamples(groups, len(vy), n_boot, seed):
        for name, threshold in choose(vy[idx], vp[idx]).items():
            predicted = tp >= threshold
            point = samples.setdefault(name, {"threshold": [], "sensitivity": [], "specificity": []})
            point["threshold"].append(threshold)
            point["sensitivity"].append(predicted[ty == 1].mean() if (ty == 1).any() else np.nan)
            point["specificity"].append((~predicted[ty == 0]).mean() if (ty == 0).any() else np.nan)
    return {name: {k: _percentiles(v, level) for k, v in point.items()} for name, point in samples.items()}


def group_bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    n: int,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every value of ``statistic(row indices)`` over resamples of whole groups.

    For statistics that are not a function of labels and scores alone (lesion-level figures): the rows
    are drawn exactly as for :func:`bootstrap_intervals` (same generator, same seed, same draws).
    """
    samples: dict[str, list[float]] = {}
    for idx in _group_resamples(groups, n, n_boot, seed):
        for key, value in statistic(idx).items():
            samples.setdefault(key, []).append(value)
    return {key: _percentiles(values, level) for key, values in samples.items()}


def _group_resamples(groups: np.ndarray | None, n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` bootstrap samples, each drawing whole groups with replacement."""
    members = _group_members(groups, n)
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])


def _group_members(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Row indices of each group (every row its own group when ``groups`` is None)."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    _, group_index = np.unique(groups, return_inverse=True)
    return [np.flatnonzero(group_index == g) for g in range(group_index.max() + 1)] if n else []


def _percentiles(values: list[float], level: float) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    alpha = (1 - level) / 2
    return (float(np.quantile(v, alpha)), float(np.quantile(v, 1 - alpha))) if len(v) else (np.nan, np.nan)


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
