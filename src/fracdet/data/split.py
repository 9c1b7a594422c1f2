"""Leakage-free splits: grouped so no radiograph crosses splits, stratified by label, seeded.

Groups join every file that must stay together: files of one patient or study (where the layout
knows them) and all exact and near copies of one radiograph. Groups are assigned greedily, largest
first, each to the split whose per-class counts fall furthest short of their targets; with hundreds of
groups this keeps every split's class fractions within a point or two of the whole.

When a better audit finds copies that an existing manifest put on both sides, :func:`repair_splits` mends
that manifest instead of drawing a new one: a new draw would move most files, so that every model trained
on the old training split would meet its own training images in the new test split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fracdet.data.duplicates import DuplicateConfig, Duplicates, find_duplicates
from fracdet.data.neardup import UnionFind
from fracdet.utils.atomic import atomic_file

__all__ = [
    "SPLIT_ORDER",
    "SplitResult",
    "apply_manifest",
    "assign_splits",
    "leave_out_trained_on",
    "make_splits",
    "read_split_manifest",
    "repair_splits",
    "split_groups",
    "split_rows",
]

SPLIT_ORDER = ("train", "val", "test")

log = logging.getLogger(__name__)


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
        with atomic_file(path) as tmp:
            self.manifest.to_csv(tmp, index=False)
        with atomic_file(path.with_suffix(".excluded.csv")) as tmp:
            self.excluded.to_csv(tmp, index=False)
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
    if not (np.isfinite(frac) & (frac > 0)).all():
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
    manifest = pd.DataFrame({
        "path": kept["path"].to_numpy(),
        "label": kept["label"].to_numpy(),
        "group": _group_ids(kept["path"].to_numpy(), groups[keep]),
        "split": splits,
    })  # fmt: skip
    excluded = pd.DataFrame({
        "path": table.loc[~keep, "path"].to_numpy(),
        "label": table.loc[~keep, "label"].to_numpy(),
        "reason": reason[~keep],
    })  # fmt: skip
    return SplitResult(manifest=manifest, excluded=excluded)


def _group_ids(paths: np.ndarray, groups: np.ndarray) -> list[str]:
    """Stable, readable group ids: ``gNNNNN`` numbered by the first path of each group."""
    first_path = pd.Series(paths).groupby(groups).transform("min")
    ids = {p: f"g{k:05d}" for k, p in enumerate(sorted(set(first_path)))}
    return [ids[p] for p in first_path]


def repair_splits(
    table: pd.DataFrame,
    manifest: str | Path | pd.DataFrame,
    *,
    config: DuplicateConfig | None = None,
    duplicates: Duplicates | None = None,
    excluded: pd.DataFrame | None = None,
) -> SplitResult:
    """Mend a manifest whose groups, by today's audit, straddle splits: every such group moves whole to
    the first of its splits in :data:`SPLIT_ORDER` (train before val before test).

    Files only ever move *out of* held-out splits, so the repaired test split is a subset of the old one
    and holds no copy of any file of the old training split: a model trained on the old manifest is
    still tested honestly on the repaired one, and its figures on the old test split can be set beside
    the new. Every other file keeps its split; the files the manifest left out stay out.

    Args:
        table: from :func:`fracdet.data.load_dataset` (the dataset the manifest describes).
        manifest: the manifest to repair (``path``, ``label``, ``split``; a path or a frame).
        config: duplicate search settings.
        duplicates: a precomputed :func:`find_duplicates` result for ``table``.
        excluded: the old manifest's exclusions (``path``, ``reason``), whose reasons are kept; by default
            those written beside a manifest given as a path (``NAME.excluded.csv``, :meth:`SplitResult.write`).

    Returns:
        The repaired manifest (groups renumbered as :func:`make_splits` numbers them; a ``moved_from``
        column names the old split of each moved file, empty otherwise) and the old exclusions.
    """
    if not isinstance(manifest, pd.DataFrame):
        beside = Path(manifest).with_suffix(".excluded.csv")
        if excluded is None and beside.exists():
            excluded = pd.read_csv(beside)
        manifest = read_split_manifest(manifest, needs=("path", "label", "split"))
    unknown = set(manifest["path"]) - set(table["path"])
    if unknown:
        raise ValueError(f"the manifest names {len(unknown)} files not in the dataset, e.g. {sorted(unknown)[0]}")
    dups = duplicates or find_duplicates(table, config)
    groups = pd.Series(split_groups(table, dups), index=table["path"].to_numpy())
    old = manifest.set_index("path")["split"]
    files = pd.DataFrame(
        {"path": manifest["path"], "label": manifest["label"], "group": groups[manifest["path"]].to_numpy()}
    )
    rank = old.map({name: k for k, name in enumerate(SPLIT_ORDER)}).to_numpy()
    if np.isnan(rank.astype(float)).any():
        raise ValueError(f"the manifest has splits other than {SPLIT_ORDER}: {sorted(set(old) - set(SPLIT_ORDER))}")
    first = pd.Series(rank, index=files.index).groupby(files["group"].to_numpy()).transform("min").to_numpy()
    files["split"] = np.asarray(SPLIT_ORDER, dtype=object)[first]
    files["moved_from"] = np.where(first != rank, old.to_numpy(), "")
    files["group"] = _group_ids(files["path"].to_numpy(), files["group"].to_numpy())
    left_out = table[~table["path"].isin(manifest["path"])]
    reasons = {} if excluded is None else dict(zip(excluded["path"], excluded["reason"], strict=True))
    still_out = pd.DataFrame({
        "path": left_out["path"].to_numpy(),
        "label": left_out["label"].to_numpy(),
        "reason": [reasons.get(p, "left out of the manifest") for p in left_out["path"]],
    })  # fmt: skip
    return SplitResult(manifest=files.reset_index(drop=True), excluded=still_out)


def apply_manifest(table: pd.DataFrame, manifest: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Restrict ``table`` to a split manifest's files and take the manifest's ``split`` (and ``group``).

    Metadata columns of the table (region, view, boxes, ...) are kept. Raises ``ValueError`` when the
    manifest names files the dataset does not have (a manifest of another dataset, or a moved folder).
    """
    if not isinstance(manifest, pd.DataFrame):
        manifest = read_split_manifest(manifest)
    _check_columns(manifest, ("path", "split"))
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


def leave_out_trained_on(table: pd.DataFrame, manifest: str | Path | None, *, model: str = "the model") -> pd.DataFrame:
    """``table`` without the files outside its ``train`` split that ``manifest``, the split ``model`` was
    trained on, puts in ``train``.

    Why: scored on its own training files a model shows its memory, not what a new patient gets, and
    thresholds chosen on them sit where no new score does (the shipped model, evaluated on a split drawn from
    the bundled sample, chose 1.000 at every operating point: the sample's validation files were its training
    files). Under the model's own manifest nothing is left out. A file is the same when its path relative to
    the dataset root is, as manifests name files; how many were left out, by split, is added to
    ``attrs["left_out_trained_on"]`` (also when nothing is), and a warning says so.
    """
    counts = dict(table.attrs.get("left_out_trained_on", {}))
    hit = np.zeros(len(table), dtype=bool)
    if manifest is not None and "split" in table:
        trained = set(read_split_manifest(manifest).query("split == 'train'")["path"])
        hit = (table["path"].isin(trained) & table["split"].notna() & (table["split"] != "train")).to_numpy()
        here = table.loc[hit, "split"].value_counts()
        for split, n in here.items():
            counts[str(split)] = counts.get(str(split), 0) + int(n)
        if hit.any():
            named = ", ".join(f"{n} {split}" for split, n in here.items())
            log.warning(
                "left out %s files that %s was trained on (its split manifest puts them in train)", named, model
            )
    out = table[~hit].reset_index(drop=True)
    out.attrs.update(table.attrs)
    out.attrs["left_out_trained_on"] = counts
    return out


def read_split_manifest(path: str | Path, *, needs: tuple[str, ...] = ("path", "split")) -> pd.DataFrame:
    """A split manifest as written by ``fracdet split``, refused by name (``ValueError``) when it is not one:
    an empty file or text that is not UTF-8 (pandas' own errors say so), or a CSV without the ``needs``
    columns (another table passed by mistake), before a ``KeyError`` deep in a merge."""
    manifest = pd.read_csv(path, dtype={"path": str, "split": str, "group": str})
    _check_columns(manifest, needs)
    return manifest


def _check_columns(manifest: pd.DataFrame, needed: tuple[str, ...]) -> None:
    missing = [c for c in needed if c not in manifest.columns]
    if missing:
        raise ValueError(
            f"not a split manifest: it has no {', '.join(missing)} column (`fracdet split` writes one; "
            f"its columns: {', '.join(repr(str(c)[:40]) for c in manifest.columns[:8])})"
        )


def split_rows(table: pd.DataFrame, split: str, *, needed_for: str) -> pd.DataFrame:
    """The ``split`` rows of ``table``, numbered afresh and keeping its attributes (its root); a clear
    ``ValueError`` when there are none, naming what they were ``needed_for``."""
    rows = table[table["split"] == split].reset_index(drop=True)
    rows.attrs.update(table.attrs)
    if rows.empty:
        raise ValueError(f"no {split!r} rows {needed_for}")
    return rows
