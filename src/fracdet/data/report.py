"""Render an :class:`~fracdet.data.audit.AuditReport` as text (terminal), JSON (pipelines) and HTML (people)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from fracdet.data.audit import AuditReport
from fracdet.data.montage import pair_montage
from fracdet.utils.atomic import atomic_write_text

__all__ = ["closest_pairs_montage", "report_dict", "report_text", "write_html", "write_json"]


def report_dict(report: AuditReport) -> dict:
    """A JSON-ready summary of every finding (file lists included)."""
    leakage = report.leakage.to_dict("records")
    return {
        "dataset": report.dataset,
        "layout": report.layout,
        "files": len(report.files),
        "counts": {str(k): {str(c): int(v) for c, v in row.items()} for k, row in report.counts.iterrows()},
        "unreadable": report.unreadable.to_dict("records"),
        "truncated": report.truncated,
        "distinct_contents": report.n_distinct_contents,
        "distinct_radiographs": report.n_distinct_radiographs,
        "exact_duplicate_groups": report.exact_groups,
        "near_duplicate_group_sizes": {int(r.group_size): int(r.groups) for r in report.near_groups.itertuples()},
        "largest_group": report.largest_group,
        "leakage": leakage,
        "leaked_files": report.leaked_files.to_dict("records"),
        "label_conflicts": report.label_conflicts.to_dict("records"),
        "confounders": report.confounders.to_dict("records"),
        "against": None
        if report.against is None
        else {"dataset": report.against_name, "matches": report.against.to_dict("records")},
        "closest_cross_split_pairs": report.closest_cross_split.drop(columns=["i", "j"], errors="ignore").to_dict(
            "records"
        ),
        "has_leakage": report.has_leakage,
        "has_conflicts": report.has_conflicts,
    }


def write_json(report: AuditReport, path: str | Path) -> Path:
    return atomic_write_text(path, json.dumps(report_dict(report), indent=2, default=str))


def _leakage_lines(report: AuditReport) -> list[str]:
    lines = []
    for row in report.leakage.itertuples():
        if row.near_copies_in_other:
            lines.append(
                f"  {row.split:>5} -> {row.other:<5}: {row.exact_copies_in_other}/{row.files} files have a "
                f"byte-identical copy in {row.other}, {row.near_copies_in_other}/{row.files} an exact or near copy"
            )
    return lines


def report_text(report: AuditReport, *, examples: int = 5) -> str:
    """The audit as a terminal report."""
    out = [f"fracdet audit of {report.dataset} (layout: {report.layout}, {len(report.files)} files)", ""]
    out += ["Counts", report.counts.to_string(), ""]
    out.append(f"Unreadable files: {len(report.unreadable)}")
    out += [f"  {r.path}: {r.error}" for r in report.unreadable.head(examples).itertuples()]
    out.append(f"Truncated files (a strict decoder raises): {len(report.truncated)}")
    out += [f"  {p}" for p in report.truncated[:examples]] + (["  ..."] if len(report.truncated) > examples else [])
    n_exact_files = sum(len(g) for g in report.exact_groups)
    out += [
        "",
        f"Exact duplicates: {len(report.exact_groups)} groups of byte-identical files ({n_exact_files} files)",
    ]
    out += [f"  {', '.join(g)}" for g in report.exact_groups[:examples]]
    out.append(
        f"Near duplicates: {len(report.files)} files are {report.n_distinct_contents} distinct contents and "
        f"{report.n_distinct_radiographs} distinct radiographs"
    )
    hist = ", ".join(f"{r.group_size}:{r.groups}" for r in report.near_groups.itertuples())
    out.append(f"  group-size histogram (size:groups): {hist}")
    largest = report.largest_group
    out.append(f"  largest group: {len(largest)} files, e.g. {', '.join(largest[:3])}")
    out += ["", "Leakage across splits"]
    leak = _leakage_lines(report)
    out += leak or (
        ["  no split column"] if report.leakage.empty else ["  none: no copy of a file is in another split"]
    )
    if report.against is not None:
        kinds = report.against["kind"].value_counts()
        out += [
            "",
            f"Shared with {report.against_name}: {len(report.against)} files here have a copy there "
            f"({int(kinds.get('exact', 0))} byte-identical, {int(kinds.get('near', 0))} near)",
        ]
        if report.against["split"].notna().any():
            per_split = report.against["split"].value_counts()
            out.append("  per split: " + ", ".join(f"{k} {v}" for k, v in per_split.items()))
    out += ["", f"Label conflicts: {len(report.label_conflicts)}"]
    for row in report.label_conflicts.head(2 * examples).itertuples():
        out.append(f"  {row.kind}: {', '.join(row.paths[:4])} labels {row.labels}")
    out += ["", "Confounders: cross-validated AUC of trivial properties for the label (95% CI)"]
    for row in report.confounders.itertuples():
        flag = "FLAGGED" if row.flagged else "ok"
        out.append(f"  {row.property:<42} {row.auc:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]  {flag}")
    verdict = []
    if report.has_leakage:
        verdict.append("LEAKAGE")
    if report.has_conflicts:
        verdict.append("LABEL CONFLICTS")
    out += [
        "",
        "Verdict: " + (" and ".join(verdict) + " found" if verdict else "no leakage, no label conflicts"),
    ]
    return "\n".join(out)


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _histogram_png(report: AuditReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    sizes = report.near_groups["group_size"].to_numpy()
    ax.bar(range(len(sizes)), report.near_groups["groups"])  # one bar per size seen, sizes as tick labels
    ax.set_xticks(range(len(sizes)), [str(s) for s in sizes], rotation=90, fontsize=6)
    ax.set_xlabel("files per distinct radiograph")
    ax.set_ylabel("groups")
    ax.set_yscale("log")
    ax.set_title("Near-duplicate group sizes")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def closest_pairs_montage(report: AuditReport, *, limit: int = 50):
    """A picture of the closest cross-split pairs that the audit did *not* call copies."""
    feats = report.duplicates.features
    shas = list(feats.props.index)
    pairs = [
        (
            feats.thumbnails.get(shas[r.i]),
            feats.thumbnails.get(shas[r.j]),
            f"{r.split_a}:{Path(r.path_a).name} | {r.split_b}:{Path(r.path_b).name}\n"
            f"cos {r.similarity:.3f}, inliers {r.inliers}, mismatch {_grey_levels(r.mismatch)}",
        )
        for r in report.closest_cross_split.head(limit).itertuples()
    ]
    return pair_montage(pairs, columns=5, title=f"{len(pairs)} closest cross-split pairs not grouped as copies")


def write_html(report: AuditReport, path: str | Path) -> Path:
    """A self-contained HTML page (images inlined; no external resources)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = html.escape(report_text(report, examples=20))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fracdet audit</title>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<style>body{font-family:sans-serif;margin:1em;max-width:1200px}pre{white-space:pre-wrap;font-size:13px}"
        "img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style>",
        f"</head><body><h1>Audit of {html.escape(report.dataset)}</h1>",
        f"<img alt='group sizes' src='data:image/png;base64,{_histogram_png(report)}'>",
        "<h2>Confounders</h2>",
        report.confounders.to_html(index=False, float_format=lambda v: f"{v:.3f}"),
    ]
    if not report.leakage.empty:
        parts += ["<h2>Leakage across splits</h2>", report.leakage.to_html(index=False)]
    if not report.closest_cross_split.empty:
        parts += [
            "<h2>Closest cross-split pairs not grouped</h2>",
            f"<img alt='closest pairs' src='data:image/png;base64,{_png(closest_pairs_montage(report))}'>",
        ]
    parts += ["<h2>Full report</h2>", f"<pre>{text}</pre>", "</body></html>"]
    return atomic_write_text(path, "\n".join(parts))


def _grey_levels(mismatch: float) -> str:
    """A pair's mismatch for a caption: grey levels, or "not measured" (too few keypoints or shared pixels)."""
    return f"{mismatch:.1f}" if math.isfinite(mismatch) else "not measured"
