"""Kept verdict-stability reports drawn side by side: per re-save, each model's flips and median change.

    python scripts/flips_figure.py NAME=REPORT [NAME=REPORT ...] --out flips.png [--title TITLE]

A ``REPORT`` is a ``metrics.json`` of ``fracdet evaluate --stability`` (its ``stability``), or a setting of a
``scripts/ensemble_flips.py`` JSON written as ``FILE#SETTING`` (``#mean``: the models' mean). Drawn from the
files kept in ``docs/evidence``, so the comparisons docs/STABILITY.md tabulates come as pictures without
scoring anything again (:func:`fracdet.evaluation.plots.plot_stability_compared`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fracdet.evaluation.plots import plot_stability_compared
from fracdet.evaluation.stability import VARIANTS


def read_report(spec: str) -> dict:
    """``verdict_stability``'s shape from a metrics.json or an ensemble_flips setting (``FILE#SETTING``)."""
    file, _, setting = spec.partition("#")
    data = json.loads(Path(file).read_text())
    if not setting:
        if not data.get("stability"):
            raise SystemExit(f"{file}: no verdict stability in it (evaluated without --stability?)")
        return data["stability"]
    if setting not in data:
        choices = [k for k, v in data.items() if isinstance(v, dict) and "sens90_threshold" in v]
        raise SystemExit(f"{file}: no setting {setting!r}; it has {choices}")
    figures = data[setting]
    variants = {v: figures[v] for v in VARIANTS if v in figures}
    return {"threshold": figures["sens90_threshold"], "images": data["images"], "variants": variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+", metavar="NAME=REPORT")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="verdict flips under re-saves, side by side")
    args = parser.parse_args()
    results = {}
    for item in args.reports:
        name, sep, spec = item.partition("=")
        if not sep:
            raise SystemExit(f"{item}: write NAME=REPORT")
        results[name] = read_report(spec)
    print(plot_stability_compared(results, Path(args.out), title=args.title))


if __name__ == "__main__":
    main()
