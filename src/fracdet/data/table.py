"""The sample table: one row per image file, the common currency of audit, splits and training.

Every dataset layout becomes the same table (a pandas DataFrame) so that the audit and the splitter
never care where the data came from. Paths are relative to the dataset root, stored in
``table.attrs["root"]``; ``table.attrs["layout"]`` names the layout that was recognised.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["COLUMNS", "LABEL_NAMES", "absolute_paths", "new_table", "summary", "validate_table"]

#: Columns every table has; loaders may add metadata columns (region, view, boxes, ...).
COLUMNS = ("path", "label", "group", "split", "patient_id", "study_id", "region", "view")
LABEL_NAMES = {0: "no fracture", 1: "fracture"}


def new_table(rows: list[dict], *, root: Path, layout: str) -> pd.DataFrame:
    """Build a validated table from row dicts; missing standard columns are filled with NA."""
    table = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in table.columns:
            table[column] = pd.NA
    # A file with no better grouping information is its own group.
    table["group"] = table["group"].fillna(table["path"])
    ordered = list(COLUMNS) + [c for c in table.columns if c not in COLUMNS]
    table = table[ordered].sort_values("path", kind="stable").reset_index(drop=True)
    table.attrs.update(root=str(Path(root).resolve()), layout=layout)
    validate_table(table)
    return table


def validate_table(table: pd.DataFrame) -> None:
    """Raise ``ValueError`` when the table breaks the schema (missing columns, bad labels, duplicate paths)."""
    missing = [c for c in ("path", "label", "group") if c not in table.columns]
    if missing:
        raise ValueError(f"sample table lacks columns {missing}")
    bad = ~table["label"].isin([0, 1])
    if bad.any():
        raise ValueError(f"labels must be 0 or 1; {int(bad.sum())} rows are not, e.g. {table.loc[bad, 'path'].iloc[0]}")
    dup = table["path"].duplicated()
    if dup.any():
        raise ValueError(f"{int(dup.sum())} paths occur twice, e.g. {table.loc[dup, 'path'].iloc[0]}")


def absolute_paths(table: pd.DataFrame) -> list[Path]:
    """The rows' files as absolute paths under ``table.attrs['root']``."""
    root = Path(table.attrs["root"])
    return [root / p for p in table["path"]]


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Counts per split and class, with totals: the first thing to look at in any dataset."""
    split = table["split"].fillna("all") if "split" in table else pd.Series("all", index=table.index)
    counts = pd.crosstab(split.rename("split"), table["label"].map(LABEL_NAMES).rename("class"))
    counts["total"] = counts.sum(axis=1)
    counts.loc["total"] = counts.sum(axis=0)
    return counts
