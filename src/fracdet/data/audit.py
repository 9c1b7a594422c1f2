"""The data audit: what is wrong with a dataset before any model sees it.

:func:`audit_dataset` reports counts, unreadable and truncated files, exact and near-duplicate groups,
leakage across splits (and, with ``against``, across datasets), label conflicts and confounders.
Everything is returned as an :class:`AuditReport`; :mod:`fracdet.data.report` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import permutations

import numpy as np
import pandas as pd

from fracdet.data.confounders import confounder_table
from fracdet.data.duplicates import DuplicateConfig, Duplicates, cross_dataset_matches, find_duplicates
from fracdet.data.table import summary

__all__ = ["AuditReport", "audit_dataset", "file_properties"]


@dataclass
class AuditReport:
    """Findings of one audit; every frame lists files by their path relative to the dataset root.

    Attributes:
        dataset: the dataset root.
        layout: the recognised layout.
        files: per file: path, label, split, sha256, exact_group, near_group and file properties.
        counts: files per split and class.
        unreadable: files that cannot be decoded at all, with the reason.
        truncated: files a strict decoder rejects as truncated.
        exact_groups: groups of byte-identical files (two or more files each).
        near_groups: size histogram of near-duplicate groups (one group = one distinct radiograph).
        leakage: per ordered split pair, files of ``split`` with an exact or near copy in ``other``.
        leaked_files: the files behind ``leakage``.
        label_conflicts: groups of identical or near-identical content with different labels, and
            records whose metadata disagrees with their folder.
        confounders: see :func:`fracdet.data.confounders.confounder_table`.
        against: optional cross-dataset matches: files here with a copy in the other dataset.
        closest_cross_split: the most similar pairs of *different* groups in different splits, for a
            person to check that nothing was missed.
        duplicates: the raw duplicate structure (features, pairs), for pictures and the splitter.
    """

    dataset: str
    layout: str
    files: pd.DataFrame
    counts: pd.DataFrame
    unreadable: pd.DataFrame
    truncated: list[str]
    exact_groups: list[list[str]]
    near_groups: pd.DataFrame
    leakage: pd.DataFrame
    leaked_files: pd.DataFrame
    label_conflicts: pd.DataFrame
    confounders: pd.DataFrame
    against: pd.DataFrame | None = None
    against_name: str | None = None
    closest_cross_split: pd.DataFrame = field(default_factory=pd.DataFrame)
    duplicates: Duplicates | None = field(default=None, repr=False)

    @property
    def n_distinct_contents(self) -> int:
        return int(self.files["exact_group"].nunique())

    @property
    def n_distinct_radiographs(self) -> int:
        return int(self.files["near_group"].nunique())

    @property
    def largest_group(self) -> list[str]:
        sizes = self.files["near_group"].value_counts()
        return sorted(self.files.loc[self.files["near_group"] == sizes.index[0], "path"]) if len(sizes) else []

    @property
    def has_leakage(self) -> bool:
        across = self.against is not None and len(self.against) > 0
        return bool(len(self.leaked_files)) or across

    @property
    def has_conflicts(self) -> bool:
        return bool(len(self.label_conflicts))

    def leakage_of(self, manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
        """``(leakage, leaked_files)`` as :attr:`leakage` and :attr:`leaked_files` would be for another split
        of the audited files (``manifest``: ``path`` and ``split``; files it leaves out count in no split).

        The duplicate search does not depend on the split, so checking a new split needs no new search:
        the same groups, another split column.
        """
        files = self.files.drop(columns="split").merge(manifest[["path", "split"]], on="path", how="left")
        return _leakage(files)


def file_properties(table: pd.DataFrame, dups: Duplicates) -> pd.DataFrame:
    """Trivial properties per file (the confounder candidates), from the content features."""
    props = dups.features.props.reindex(dups.files["sha256"]).reset_index(drop=True)
    props.index = table.index
    out = pd.DataFrame(index=table.index)
    out["width"] = props.get("width")
    out["height"] = props.get("height")
    out["aspect"] = out["width"] / out["height"]
    out["file_size"] = dups.files["file_size"].astype(float)
    out["format"] = props.get("format", pd.Series(index=table.index, dtype=object)).fillna("unreadable")
    out["mode"] = props.get("mode", pd.Series(index=table.index, dtype=object)).fillna("unreadable")
    out["mean_intensity"] = props.get("mean_intensity")
    out["truncated"] = props["truncated"].fillna(False).astype(bool)
    out["readable"] = props["readable"].fillna(False).astype(bool)
    out["error"] = props.get("error")
    return out


def _leakage(files: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    splits = list(files["split"].dropna().unique())
    order = {"train": 0, "val": 1, "test": 2}
    splits.sort(key=lambda s: (order.get(s, 9), s))
    rows, leaked = [], []
    for split, other in permutations(splits, 2):
        mine = files[files["split"] == split]
        theirs = files[files["split"] == other]
        exact = mine["exact_group"].isin(set(theirs["exact_group"]))
        near = mine["near_group"].isin(set(theirs["near_group"]))
        rows.append({
            "split": split, "other": other, "files": len(mine),
            "exact_copies_in_other": int(exact.sum()), "near_copies_in_other": int(near.sum()),
        })  # fmt: skip
        for path, is_exact in zip(mine.loc[near, "path"], exact[near], strict=True):
            leaked.append({"split": split, "other": other, "path": path, "kind": "exact" if is_exact else "near"})
    return pd.DataFrame(rows), pd.DataFrame(leaked, columns=["split", "other", "path", "kind"])


def _label_conflicts(files: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for kind, column in (("exact", "exact_group"), ("near", "near_group")):
        labels = files.groupby(column)["label"].nunique()
        for group in labels[labels > 1].index:
            members = files[files[column] == group]
            rows.append(
                {
                    "kind": kind,
                    "paths": sorted(members["path"]),
                    "labels": sorted(members["label"].unique().tolist()),
                }
            )
    if "label_disagrees_with_metadata" in table:
        for _, rec in table[table["label_disagrees_with_metadata"]].iterrows():
            rows.append({
                "kind": "metadata", "paths": [rec["path"]],
                "labels": [int(rec["label"]), int(rec["metadata_label"])],
            })  # fmt: skip
    if rows:
        exact_sets = {tuple(r["paths"]) for r in rows if r["kind"] == "exact"}
        rows = [r for r in rows if not (r["kind"] == "near" and tuple(r["paths"]) in exact_sets)]
    return pd.DataFrame(rows, columns=["kind", "paths", "labels"])


def _closest_cross_split(files: pd.DataFrame, dups: Duplicates, limit: int) -> pd.DataFrame:
    """Most similar candidate pairs that sit in different groups and different splits."""
    if files["split"].isna().all() or dups.pairs.empty:
        return pd.DataFrame()
    roots = files.groupby("exact_group")["near_group"].first()
    splits_of = files.groupby("exact_group")["split"].agg(lambda s: set(s.dropna()))
    path_of = files.groupby("exact_group")["path"].first()
    rows = []
    for pair in dups.pairs.itertuples():
        if pair.i not in roots.index or pair.j not in roots.index or roots[pair.i] == roots[pair.j]:
            continue
        if splits_of[pair.i] and splits_of[pair.j] and splits_of[pair.i] != splits_of[pair.j]:
            rows.append({
                "path_a": path_of[pair.i], "split_a": "/".join(sorted(splits_of[pair.i])),
                "path_b": path_of[pair.j], "split_b": "/".join(sorted(splits_of[pair.j])),
                "similarity": pair.similarity, "inliers": getattr(pair, "inliers", np.nan),
                "mismatch": getattr(pair, "mismatch", np.nan), "i": pair.i, "j": pair.j,
            })  # fmt: skip
        if len(rows) >= limit:  # pairs arrive sorted by similarity
            break
    return pd.DataFrame(rows)


def audit_dataset(
    table: pd.DataFrame,
    *,
    against: pd.DataFrame | None = None,
    config: DuplicateConfig | None = None,
    seed: int = 0,
    closest: int = 50,
) -> AuditReport:
    """Audit a sample table.

    Args:
        table: from :func:`fracdet.data.load_dataset` (its ``split`` column drives the leakage check;
            join a split manifest first to audit that split).
        against: a second table; files here with a copy there are reported.
        config: duplicate search settings.
        seed: seeds the confounder folds and bootstrap.
        closest: how many closest cross-split pairs to keep for inspection.
    """
    config = config or DuplicateConfig()
    dups = find_duplicates(table, config)
    files = pd.concat([table[["path", "label", "split"]], dups.files], axis=1)
    props = file_properties(table, dups)
    files = pd.concat([files, props], axis=1)
    unreadable = files.loc[~files["readable"], ["path", "error"]].reset_index(drop=True)
    truncated = sorted(files.loc[files["truncated"], "path"])
    exact_sizes = files["exact_group"].value_counts()
    exact_groups = sorted(
        sorted(files.loc[files["exact_group"] == g, "path"]) for g in exact_sizes[exact_sizes > 1].index
    )
    near_sizes = files["near_group"].value_counts()
    near_hist = near_sizes.value_counts().sort_index().rename_axis("group_size").reset_index(name="groups")
    leakage, leaked = _leakage(files)
    conflicts = _label_conflicts(files, table)
    readable = files["readable"].to_numpy()
    confounders = confounder_table(
        props[readable],
        files.loc[readable, "label"].to_numpy(),
        files.loc[readable, "near_group"].to_numpy(),
        seed=seed,
    )
    matches = None
    if against is not None:
        other = find_duplicates(against, DuplicateConfig(**{**config.__dict__, "near_duplicates": False}))
        found = cross_dataset_matches(dups, other, config)
        other_path = other.files.assign(path=against["path"].to_numpy()).groupby("exact_group")["path"].first()
        by_content = {}
        for row in found.itertuples():
            by_content.setdefault(row.i, (row.kind, other_path.get(row.j)))
        mask = files["exact_group"].isin(by_content)
        matches = files.loc[mask, ["path", "label", "split", "exact_group"]].copy()
        matches["kind"] = [by_content[g][0] for g in matches["exact_group"]]
        matches["other_path"] = [by_content[g][1] for g in matches["exact_group"]]
        matches = matches.drop(columns="exact_group").reset_index(drop=True)
    return AuditReport(
        dataset=table.attrs.get("root", ""),
        layout=table.attrs.get("layout", ""),
        files=files,
        counts=summary(table),
        unreadable=unreadable,
        truncated=truncated,
        exact_groups=exact_groups,
        near_groups=near_hist,
        leakage=leakage,
        leaked_files=leaked,
        label_conflicts=conflicts,
        confounders=confounders,
        against=matches,
        against_name=against.attrs.get("root") if against is not None else None,
        closest_cross_split=_closest_cross_split(files, dups, closest),
        duplicates=dups,
    )
