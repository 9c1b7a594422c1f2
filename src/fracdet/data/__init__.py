"""Datasets, decoding, audit and leakage-free splits.

Typical use from a notebook::

    from fracdet.data import load_dataset, audit_dataset, make_splits, report_text
    table = load_dataset("path/to/fracatlas")
    print(report_text(audit_dataset(table)))
    make_splits(table, seed=0).write("splits.csv")
"""

from __future__ import annotations

from fracdet.data.audit import AuditReport, audit_dataset
from fracdet.data.decode import (
    ImageReadError,
    ImageTooLargeError,
    TruncatedImageError,
    UnsupportedImageError,
    read_image,
)
from fracdet.data.duplicates import DuplicateConfig, find_duplicates
from fracdet.data.report import report_text, write_html, write_json
from fracdet.data.sources import DatasetLayoutError, load_dataset, load_manifest
from fracdet.data.split import SplitResult, make_splits
from fracdet.data.table import summary

__all__ = [
    "AuditReport",
    "DatasetLayoutError",
    "DuplicateConfig",
    "ImageReadError",
    "ImageTooLargeError",
    "SplitResult",
    "TruncatedImageError",
    "UnsupportedImageError",
    "audit_dataset",
    "find_duplicates",
    "load_dataset",
    "load_manifest",
    "make_splits",
    "read_image",
    "report_text",
    "summary",
    "write_html",
    "write_json",
]
