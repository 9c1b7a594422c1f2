"""Leakage-free splits: grouped so no radiograph crosses splits, stratified by label, seeded.

Groups join every file that must stay together: files of one patient or study (where the layout
knows them) and all exact and near copies of one radiograph. Groups are assigned greedily, largest
first, each to the split whose per-class counts fall furthest short of their targets; with hundreds of
groups this keeps every split's class fractions within a point or two of the whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fracdet.data.duplicates import DuplicateConfig, Duplicates, find_duplicates
from fracdet.data.neardup import UnionFind

__all__ = ["SPLIT_ORDER", "SplitResult", "apply_manifest", "assign_splits", "make_splits", "split_groups"]

SPLIT_ORDER = ("train", "val", "test")


@dataclass
class SplitResult:
    """A split manifest and what was left out of it.

    Attributes:
        manifest: ``path, label, group, split`` (what ``fracdet train`` and ``evaluate`` take).
        excluded: ``path, label, reason`` for files left out (truncated or unreadable).
    """

    manifest: pd.DataFrame
    excluded: pd.DataFrame

    def write(self, path: str | Path) -> Path:
        """Write the manifest as CSV, and the excluded files beside it (``NAME.excluded.csv``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.manifest.to_csv(path, index=False)
        self.excluded.to_csv(path.with_suffix(".excluded.csv"), index=False)
        return path

    def class_fractions(self) -> pd.DataFrame:
        """Fraction of fractures per split next to the whole: the stratification check."""
        m = self.manifest
        frac = m.groupby("split")["label"].agg(["count", "mean"]).rename(columns={"mean": "fracture_fraction"})
        frac.loc["all"] = [len(m), m["label"].mean()]
        return frac


def split_groups(table: pd.DataFrame, dups: Duplicates) -> np.ndarray:
    """One group id per file: patient/study groups of the layout joined with duplicate groups."""
    n = len(table)
    union = UnionFind(n)
    for column in (table["group"].astype(str), dups.files["near_group"]):
        first: dict = {}
        for k, key in enumerate(column.to_numpy()):
            union.union(first.setdefault(key, k), k)
    return union.labels()


def assign_splits(
    labels: np.ndarray,
    groups: np.ndarray,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    *,
    seed: int = 0,
    names: Sequence[str] = SPLIT_ORDER,
) -> np.ndarray:
    """Assign every group to one split, stratified by label.

    Args:
        labels: 0/1 per file.
        groups: group id per file; a group never straddles splits.
        fractions: target share of each split (normalised to sum to 1).
        seed: shuffles groups of equal size; the same seed gives the same split.
        names: split names, aligned with ``fractions``.

    Returns:
        The split name per file.
    """
    if len(fractions) != len(names):
        raise ValueError(f"{len(fractions)} fractions for {len(names)} splits")
    frac = np.asarray(fractions, float)
    if (frac <= 0).any():
        raise ValueError(f"fractions must be positive, got {list(fractions)}")
    frac = frac / frac.sum()
    labels = np.asarray(labels, int)
    uniq, inverse = np.unique(groups, return_inverse=True)
    pos = np.bincount(inverse, weights=labels, minlength=len(uniq))
    size = np.bincount(inverse, minlength=len(uniq)).astype(float)
    totals = np.array([max((labels == 0).sum(), 1), max((labels == 1).sum(), 1)], float)
    targets = frac[:, None] * totals[None, :]  # (splits, classes)
    counts = np.zeros_like(targets)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(uniq))
    order = order[np.argsort(-size[order], kind="stable")]
    choice = np.empty(len(uniq), int)
    for g in order:
        add = np.array([size[g] - pos[g], pos[g]])
        # Relative shortfall of each split after adding this group; pick the split it helps most.
        after = counts + add[None, :]
        cost = (((after - targets) / totals) ** 2).sum(axis=1) - (((counts - targets) / totals) ** 2).sum(axis=1)
        s = int(np.argmin(cost))
        counts[s] += add
        choice[g] = s
    return np.asarray(names, dtype=object)[choice[inverse]]


def make_splits(
    table: pd.DataFrame,
    *,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    keep_truncated: bool = False,
    config: DuplicateConfig | None = None,
    duplicates: Duplicates | None = None,
) -> SplitResult:
    """Split a sample table into train/val/test without leakage.

    Args:
        table: from :func:`fracdet.data.load_dataset`.
        fractions: train, val, test shares.
        seed: the same seed gives the same manifest.
        keep_truncated: keep truncated files (left out by default: their grey bands are a confounder).
        config: duplicate search settings.
        duplicates: a precomputed :func:`find_duplicates` result for ``table``.
    """
    dups = duplicates or find_duplicates(table, config)
    props = dups.features.props.reindex(dups.files["sha256"]).reset_index(drop=True)
    readable = props["readable"].fillna(False).to_numpy(bool)
    truncated = props["truncated"].fillna(False).to_numpy(bool)
    reason = np.where(~readable, "unreadable", np.where(truncated & ~keep_truncated, "truncated", ""))
    keep = reason == ""
    groups = split_groups(table, dups)
    kept = table[keep]
    splits = assign_splits(kept["label"].to_numpy(), groups[keep], fractions, seed=seed)
    # Stable, readable group ids: numbered by the first path of each group.
    first_path = pd.Series(kept["path"].to_numpy()).groupby(groups[keep]).transform("min")
    ids = {p: f"g{k:05d}" for k, p in enumerate(sorted(set(first_path)))}
    manifest = pd.DataFrame({
        "path": kept["path"].to_numpy(),
        "label": kept["label"].to_numpy(),
        "group": [ids[p] for p in first_path],
        "split": splits,
    })  # fmt: skip
    excluded = pd.DataFrame({
        "path": table.loc[~keep, "path"].to_numpy(),
        "label": table.loc[~keep, "label"].to_numpy(),
        "reason": reason[~keep],
    })  # fmt: skip
    return SplitResult(manifest=manifest, excluded=excluded)


def apply_manifest(table: pd.DataFrame, manifest: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Restrict ``table`` to a split manifest's files and take the manifest's ``split`` (and ``group``).

    Metadata columns of the table (region, view, boxes, ...) are kept. Raises ``ValueError`` when the
    manifest names files the dataset does not have (a manifest of another dataset, or a moved folder).
    """
    if not isinstance(manifest, pd.DataFrame):
        manifest = pd.read_csv(manifest, dtype={"path": str, "split": str, "group": str})
    unknown = set(manifest["path"]) - set(table["path"])
    if unknown:
        raise ValueError(f"the manifest names {len(unknown)} files not in the dataset, e.g. {sorted(unknown)[0]}")
    take = [c for c in ("path", "split", "group") if c in manifest.columns]
    drop = [c for c in take if c != "path" and c in table.columns]
    out = table[table["path"].isin(manifest["path"])].drop(columns=drop).merge(manifest[take], on="path", how="left")
    if "group" not in out:
        out["group"] = out["path"]
    out.attrs.update(table.attrs)
    return out
