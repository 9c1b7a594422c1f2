"""Do trivial file properties predict the label? If so, a network can learn them instead of fractures.

For each property (and all of them together) a small model is fitted in grouped, stratified
cross-validation (copies of one radiograph stay in one fold) and its out-of-fold scores are summarised
as an ROC AUC with a bootstrap 95% interval (whole duplicate groups resampled, widened for the
correlation between cross-validation folds). A property is flagged when the interval excludes 0.5.
A control with random labels runs through the same machinery: it shows what "no signal" looks like.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

__all__ = ["CATEGORICAL", "CONTROL", "NUMERIC", "confounder_table", "cross_validated_auc", "roc_auc_with_ci"]

NUMERIC = ("width", "height", "aspect", "file_size", "mean_intensity")
CATEGORICAL = ("format", "mode", "truncated")
CONTROL = "control: all properties, random labels"


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata  # scipy.stats costs half a second of every process's start

    ranks = rankdata(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _fold_auc(scores: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> float:
    """AUC within each fold, averaged with weights n_pos * n_neg (the number of ranked pairs)."""
    total = weight = 0.0
    for f in np.unique(folds):
        m = folds == f
        pairs = float((labels[m] == 1).sum() * (labels[m] == 0).sum())
        if pairs:
            total += pairs * _auc(scores[m], labels[m])
            weight += pairs
    return total / weight if weight else float("nan")


class _RankedFolds:
    """:func:`_fold_auc` of any resample of the rows, from how many times it draws each row.

    The scores of each fold are ranked once. A resample then only needs how many positives and negatives
    it holds at each score level: the Mann-Whitney count (a positive above a negative 1, a tie 1/2) over
    those levels is the fold's AUC times its pairs, which is what :func:`_fold_auc` weights by, so the
    bootstrap costs a few counts per resample instead of a ranking per fold (8x faster on 10,000 rows).
    """

    def __init__(self, scores: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> None:
        _, fold = np.unique(folds, return_inverse=True)
        # Score levels numbered in (fold, score) order, so each fold's levels are contiguous and ascending.
        _, level = np.unique(np.stack([fold.astype(float), scores]), axis=1, return_inverse=True)
        self._level, self._positive = level.ravel(), labels == 1
        self._n_levels, self._n_folds = int(self._level.max(initial=-1)) + 1, int(fold.max(initial=-1)) + 1
        self._fold_of_level = np.zeros(self._n_levels, int)
        self._fold_of_level[self._level] = fold

    def auc(self, draws: np.ndarray) -> float:
        """The fold-averaged AUC of a resample that takes row ``i`` ``draws[i]`` times."""
        pos = np.bincount(self._level, np.where(self._positive, draws, 0), self._n_levels)
        neg = np.bincount(self._level, np.where(self._positive, 0, draws), self._n_levels)
        neg_per_fold = np.bincount(self._fold_of_level, neg, self._n_folds)
        # Negatives below each level within its fold: a running count, less what earlier folds hold.
        neg_below = np.cumsum(neg) - neg - (np.cumsum(neg_per_fold) - neg_per_fold)[self._fold_of_level]
        wins = np.bincount(self._fold_of_level, pos * (neg_below + 0.5 * neg), self._n_folds)
        pairs = np.bincount(self._fold_of_level, pos, self._n_folds) * neg_per_fold
        return float(wins.sum() / pairs.sum()) if pairs.sum() else float("nan")


def roc_auc_with_ci(
    scores: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray | None = None,
    *,
    clusters: np.ndarray | None = None,
    n_boot: int = 500,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """ROC AUC and a percentile bootstrap interval.

    With ``folds`` (cross-validated scores) the AUC is computed within each fold and averaged, and
    the bootstrap resamples within folds: models of different folds put their scores on slightly
    different scales, and ranking across folds would add that noise to the estimate.

    With ``clusters`` (copies of one radiograph, files of one patient) the bootstrap resamples whole
    clusters: files of one cluster share their properties, so they carry less information than as
    many independent files, and a file-level bootstrap would give intervals that are too narrow.
    """
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    folds = np.zeros(len(labels), int) if folds is None else np.asarray(folds)
    clusters = np.arange(len(labels)) if clusters is None else np.asarray(clusters)
    rng = np.random.default_rng(seed)
    auc = _fold_auc(scores, labels, folds)
    per_fold = _clusters_per_fold(folds, clusters)
    ranked = _RankedFolds(scores, labels, folds)
    boots = []
    for _ in range(n_boot):
        idx = np.concatenate([_resample_clusters(*fold, rng) for fold in per_fold])
        value = ranked.auc(np.bincount(idx, minlength=len(labels)))
        if not np.isnan(value):
            boots.append(value)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boots, [alpha, 1 - alpha]) if boots else (np.nan, np.nan)
    return auc, float(lo), float(hi)


def _clusters_per_fold(folds: np.ndarray, clusters: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per fold: member rows sorted by cluster, each cluster's first position and its size."""
    out = []
    for f in np.unique(folds):
        rows = np.flatnonzero(folds == f)
        _, inverse = np.unique(clusters[rows], return_inverse=True)
        sizes = np.bincount(inverse)
        out.append((rows[np.argsort(inverse, kind="stable")], np.cumsum(sizes) - sizes, sizes))
    return out


def _resample_clusters(
    members: np.ndarray, starts: np.ndarray, sizes: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Rows of as many clusters as the fold has, drawn with replacement."""
    pick = rng.integers(0, len(sizes), len(sizes))
    lengths = sizes[pick]
    offsets = np.repeat(starts[pick] - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
    return members[offsets]


def _design(frame: pd.DataFrame, columns: list[str]):
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, QuantileTransformer, SplineTransformer

    numeric = [c for c in columns if c in NUMERIC]
    categorical = [c for c in columns if c in CATEGORICAL]
    parts = []
    if numeric:
        # Quantiles then splines: a property may matter non-monotonically (e.g. one odd image size).
        parts.append((
            "num",
            make_pipeline(
                SimpleImputer(strategy="median"),
                QuantileTransformer(n_quantiles=100),
                SplineTransformer(n_knots=5, degree=3),
            ),
            numeric,
        ))  # fmt: skip
    if categorical:
        parts.append(("cat", OneHotEncoder(handle_unknown="ignore", min_frequency=5), categorical))
    return make_pipeline(ColumnTransformer(parts), LogisticRegression(C=1.0, max_iter=2000))


_FOLDS = 5
# The bootstrap holds each fold's model fixed, but every model was fitted on the other folds' labels,
# so fold AUCs are positively correlated and the interval is too narrow. Nadeau & Bengio's (2003)
# correction for K-fold cross-validation scales the variance by 1 + K * n_test / n_train = 1 + K / (K - 1).
_CV_WIDENING = float(np.sqrt(1 + _FOLDS / (_FOLDS - 1)))


def _out_of_fold(
    frame: pd.DataFrame, columns: list[str], labels: np.ndarray, groups: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold scores and the fold of each row."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=_FOLDS, shuffle=True, random_state=seed)
    scores = np.zeros(len(labels))
    fold_of = np.zeros(len(labels), int)
    for fold, (train, test) in enumerate(splitter.split(frame, labels, groups)):
        fold_of[test] = fold
        if len(np.unique(labels[train])) < 2:
            scores[test] = 0.5
            continue
        model = _design(frame, columns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant columns and rare categories are expected here
            model.fit(frame.iloc[train][columns], labels[train])
        scores[test] = model.predict_proba(frame.iloc[test][columns])[:, 1]
    return scores, fold_of


def cross_validated_auc(
    frame: pd.DataFrame, columns: list[str], labels: np.ndarray, groups: np.ndarray, *, seed: int = 0, n_boot: int = 500
) -> tuple[float, float, float]:
    """Grouped cross-validated AUC of a small model on ``columns``, with its widened bootstrap interval."""
    scores, folds = _out_of_fold(frame, columns, labels, groups, seed)
    auc, lo, hi = roc_auc_with_ci(scores, labels, folds, clusters=groups, n_boot=n_boot, seed=seed)
    return auc, auc - _CV_WIDENING * (auc - lo), auc + _CV_WIDENING * (hi - auc)


def confounder_table(
    properties: pd.DataFrame, labels: np.ndarray, groups: np.ndarray, *, seed: int = 0, n_boot: int = 500
) -> pd.DataFrame:
    """Cross-validated AUC of each trivial property, of all together, and of a random-label control.

    Args:
        properties: one row per file with the columns of :data:`NUMERIC` and :data:`CATEGORICAL`.
        labels: 0/1 per file.
        groups: duplicate group per file (copies never straddle folds, and the bootstrap draws whole groups).
        seed: seeds folds, bootstrap and the shuffle of the control.
        n_boot: bootstrap resamples for the intervals.

    Returns:
        Rows ``property, auc, ci_low, ci_high, flagged, note``.
    """
    labels = np.asarray(labels, int)
    groups = np.asarray(groups)
    frame = properties.copy()
    for c in CATEGORICAL:
        frame[c] = frame[c].astype(str)
    rows = []
    n_groups = len(np.unique(groups))
    if len(np.unique(labels)) < 2 or n_groups < 5:
        return pd.DataFrame(columns=["property", "auc", "ci_low", "ci_high", "flagged", "note"])
    all_columns = [*NUMERIC, *CATEGORICAL]
    # Labels drawn afresh at the same prevalence, not a permutation: a permutation fixes the totals,
    # so the labels held out in one fold anti-correlate with those its model was fitted on, which
    # pulls the cross-validated AUC of pure noise below 0.5.
    random_labels = (np.random.default_rng(seed).random(len(labels)) < labels.mean()).astype(int)
    runs = [(c, [c], labels, "") for c in all_columns]
    runs.append(("all properties", all_columns, labels, ""))
    runs.append((CONTROL, all_columns, random_labels, "must not be flagged"))
    for name, columns, y, note in runs:
        auc, lo, hi = cross_validated_auc(frame, columns, y, groups, seed=seed, n_boot=n_boot)
        flagged = bool(lo > 0.5 or hi < 0.5)
        rows.append({"property": name, "auc": auc, "ci_low": lo, "ci_high": hi, "flagged": flagged, "note": note})
    return pd.DataFrame(rows)
