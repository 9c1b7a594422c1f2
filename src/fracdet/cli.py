"""The ``fracdet`` command: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("fracdet")


def _duplicate_config(args: argparse.Namespace):
    from fracdet.data import DuplicateConfig

    return DuplicateConfig(near_duplicates=not args.exact_only, cache_dir=args.cache_dir, use_cache=not args.no_cache)


def _with_manifest_splits(table, manifest_path: Path):
    """Restrict ``table`` to a manifest's files and take the manifest's split column."""
    import pandas as pd

    manifest = pd.read_csv(manifest_path, dtype={"path": str, "split": str})
    unknown = set(manifest["path"]) - set(table["path"])
    if unknown:
        raise SystemExit(
            f"error: {manifest_path}: {len(unknown)} paths are not in the dataset, e.g. {sorted(unknown)[0]}"
        )
    attrs = dict(table.attrs)
    table = table[table["path"].isin(manifest["path"])].drop(columns="split").reset_index(drop=True)
    table = table.merge(manifest[["path", "split"]], on="path", how="left")
    table.attrs.update(attrs)
    return table


def cmd_audit(args: argparse.Namespace) -> int:
    from fracdet.data import audit_dataset, load_dataset, report_text, write_html, write_json
    from fracdet.data.report import closest_pairs_montage

    table = load_dataset(args.path)
    if args.splits:
        table = _with_manifest_splits(table, Path(args.splits))
    against = load_dataset(args.against) if args.against else None
    report = audit_dataset(table, against=against, config=_duplicate_config(args), seed=args.seed)
    print(report_text(report))
    if args.json:
        print(f"JSON report: {write_json(report, args.json)}")
    if args.html:
        print(f"HTML report: {write_html(report, args.html)}")
    if args.montage:
        if report.closest_cross_split.empty:
            print("no cross-split pairs to draw (the table has no split column)")
        else:
            Path(args.montage).parent.mkdir(parents=True, exist_ok=True)
            closest_pairs_montage(report).save(args.montage)
            print(f"closest cross-split pairs: {args.montage}")
    if args.strict and (report.has_leakage or report.has_conflicts):
        return 3
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from fracdet.data import audit_dataset, find_duplicates, load_dataset, make_splits, report_text
    from fracdet.data.split import SplitResult

    table = load_dataset(args.path)
    config = _duplicate_config(args)
    dups = find_duplicates(table, config)
    if args.keep_published:
        if table["split"].isna().any():
            raise SystemExit(f"error: {args.path} has no published split for every file")
        report = audit_dataset(table, config=config, seed=args.seed)
        print("\n".join(report_text(report).split("\n")))
        manifest = table[["path", "label", "split"]].assign(group=report.files["near_group"].map("n{:05d}".format))
        result = SplitResult(manifest[["path", "label", "group", "split"]], table.iloc[:0][["path", "label"]])
    else:
        result = make_splits(
            table,
            fractions=args.fractions,
            seed=args.seed,
            keep_truncated=args.keep_truncated,
            duplicates=dups,
        )
    out = result.write(args.out)
    print(f"wrote {out} ({len(result.manifest)} files, {result.manifest['group'].nunique()} groups)")
    if len(result.excluded):
        print(f"left out {len(result.excluded)} files, listed in {out.with_suffix('.excluded.csv')}:")
        print(result.excluded["reason"].value_counts().to_string())
    print(result.class_fractions().to_string(float_format=lambda v: f"{v:.3f}"))
    return 0


def _add_cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir", default=None, help="feature cache folder (default: $FRACDET_CACHE or ~/.cache/fracdet)"
    )
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
    p.add_argument("--exact-only", action="store_true", help="skip the near-duplicate search")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from fracdet import __version__

    parser = argparse.ArgumentParser(prog="fracdet", description="Bone-fracture detection with honest numbers.")
    parser.add_argument("--version", action="version", version=f"fracdet {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("audit", help="find unreadable files, duplicates, leakage, label conflicts, confounders")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument(
        "--splits",
        help="audit this split manifest (paths relative to PATH) instead of the layout's own split",
    )
    p.add_argument("--against", help="a second dataset: report files shared with it")
    p.add_argument("--json", help="write the full report as JSON")
    p.add_argument("--html", help="write a self-contained HTML report")
    p.add_argument("--montage", help="PNG of the closest cross-split pairs not grouped as copies")
    p.add_argument("--strict", action="store_true", help="exit with status 3 when leakage or label conflicts are found")
    _add_cache_options(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("split", help="write a grouped, stratified, leakage-free split manifest")
    p.add_argument("path", help="dataset folder or CSV manifest")
    p.add_argument("--out", required=True, help="manifest CSV to write")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--keep-truncated", action="store_true", help="keep truncated files (left out by default)")
    p.add_argument("--keep-published", action="store_true", help="keep the dataset's own split and report its leakage")
    _add_cache_options(p)
    p.set_defaults(func=cmd_split)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    from fracdet.data import DatasetLayoutError

    try:
        return args.func(args)
    except (FileNotFoundError, DatasetLayoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
