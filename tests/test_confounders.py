"""Confounder check: a property that predicts the label is flagged; a random-label control is not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fracdet.data.confounders import CONTROL, confounder_table, roc_auc_with_ci


def _properties(n: int, rng: np.random.Generator, labels: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({
        "width": np.where(labels == 1, 800, 454) + rng.integers(-20, 20, n),  # a leak: size gives the class away
        "height": rng.integers(300, 600, n),
        "aspect": rng.uniform(0.7, 1.3, n),
        "file_size": rng.integers(20_000, 90_000, n),
        "mean_intensity": rng.uniform(0.2, 0.6, n),
        "format": "JPEG",
        "mode": rng.choice(["L", "RGB"], n),
        "truncated": False,
    })  # fmt: skip


def test_leaking_property_is_flagged_and_noise_is_not():
    rng = np.random.default_rng(1)
    n = 600
    labels = rng.integers(0, 2, n)
    table = confounder_table(_properties(n, rng, labels), labels, np.arange(n), n_boot=200).set_index("property")
    assert table.loc["width", "flagged"] and table.loc["width", "auc"] > 0.95
    assert table.loc["all properties", "flagged"]
    assert not table.loc["height", "flagged"] and not table.loc["file_size", "flagged"]
    assert not table.loc[CONTROL, "flagged"]


def test_auc_interval_contains_the_estimate_and_is_narrower_with_more_data():
    rng = np.random.default_rng(0)
    small_y, big_y = rng.integers(0, 2, 100), rng.integers(0, 2, 4000)
    small = roc_auc_with_ci(small_y + rng.normal(0, 1, 100), small_y, n_boot=200)
    big = roc_auc_with_ci(big_y + rng.normal(0, 1, 4000), big_y, n_boot=200)
    assert small[1] <= small[0] <= small[2] and big[1] <= big[0] <= big[2]
    assert big[2] - big[1] < small[2] - small[1]


def test_copies_of_one_radiograph_widen_the_interval_instead_of_faking_certainty():
    """Forty files of each of 30 radiographs carry the information of about 30 files, not 1,200."""
    rng = np.random.default_rng(2)
    clusters = np.repeat(np.arange(30), 40)
    labels = np.repeat(rng.integers(0, 2, 30), 40)
    scores = np.repeat(rng.normal(0, 1, 30), 40) + rng.normal(0, 0.01, len(labels))  # no signal
    _, file_lo, file_hi = roc_auc_with_ci(scores, labels, n_boot=300)
    auc, lo, hi = roc_auc_with_ci(scores, labels, clusters=clusters, n_boot=300)
    assert hi - lo > 3 * (file_hi - file_lo)
    assert lo < 0.5 < hi and lo <= auc <= hi


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]), st.integers(0, 1), st.integers(0, 3)), min_size=2
    ),
    seed=st.integers(0, 2**16),
)
def test_the_bootstrap_scores_a_resample_by_counts_as_if_its_rows_were_ranked_again(rows, seed):
    """The interval's resamples are scored from how often each row is drawn; ties, folds without both classes
    and resamples without a pair must give what ranking the drawn rows afresh gives."""
    from fracdet.data.confounders import _fold_auc, _RankedFolds

    scores, labels, folds = (np.array(column) for column in zip(*rows, strict=True))
    draws = np.random.default_rng(seed).integers(0, len(rows), len(rows))
    ranked_again = _fold_auc(scores[draws], labels[draws], folds[draws])
    counted = _RankedFolds(scores, labels, folds).auc(np.bincount(draws, minlength=len(rows)))
    assert counted == pytest.approx(ranked_again, abs=1e-12, nan_ok=True)
