"""Print the tables of docs/RESULTS.md from the run folders and evaluation reports that made them.

    python scripts/results_tables.py [--runs runs]

Reads ``runs/*/metrics.csv``, ``runs/*/run.json``, ``runs/*/config.yaml`` (how each model was trained)
and ``runs/eval/*/metrics.json`` (what ``fracdet evaluate`` measured), as written by
``scripts/reproduce_results.sh``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pandas as pd
import yaml


def fmt(point: dict, metric: str) -> str:
    lo, hi = point["ci95"][metric]
    return f"{point[metric]:.3f} [{lo:.3f}, {hi:.3f}]"


def training_table(runs: Path) -> pd.DataFrame:
    rows = []
    for run in sorted(p for p in runs.iterdir() if (p / "metrics.csv").is_file()):
        history = pd.read_csv(run / "metrics.csv")
        config = yaml.safe_load((run / "config.yaml").read_text())
        info = json.loads((run / "run.json").read_text())
        best = history[history["best"].astype(bool)].iloc[-1]
        rows.append(
            {"run": run.name, "model": config["model"], "px": info["input_size"], "seed": config["seed"],
             "epochs run": len(history), "best epoch": int(best["epoch"]),
             "selected on": f"{config['select_on']} {config['monitor']}", "device": info["device"],
             "threads": info["threads"], "train minutes": round(history["seconds"].sum() / 60, 1),
             "train images": info["images"]["train"]}
        )  # fmt: skip
    return pd.DataFrame(rows)


def evaluation_table(evals: Path) -> pd.DataFrame:
    rows = []
    for report in sorted(evals.glob("*/metrics.json")):
        m = json.loads(report.read_text())
        point = m["operating_points"][m["default_operating_point"]]
        half = m["operating_points"]["0.5"]
        rows.append(
            {"report": report.parent.name, "split": m["split"], "images": m["images"], "fractures": m["fractures"],
             "selected on": m["checkpoint_selected_on"], "AUC": fmt(point, "auc"),
             "accuracy @0.5": fmt(half, "accuracy"),
             "sensitivity @sens90": fmt(point, "sensitivity"), "specificity @sens90": fmt(point, "specificity"),
             "AP": fmt(point, "average_precision"),
             "ECE before/after T": f"{m['calibration']['ece_before']:.3f} / {m['calibration']['ece_after']:.3f}"}
        )  # fmt: skip
    return pd.DataFrame(rows)


def seed_table(evals: Path) -> pd.DataFrame:
    """Mean ± sd over training seeds: reports named ``...-seedN-...`` that differ only in N."""
    groups: dict[str, list[dict]] = {}
    for report in sorted(evals.glob("*/metrics.json")):
        if match := re.search(r"-seed\d+", report.parent.name):
            key = report.parent.name.replace(match.group(0), "-seed*")
            groups.setdefault(key, []).append(json.loads(report.read_text()))
    rows = []
    for key, reports in groups.items():
        if len(reports) < 2:
            continue
        points = [m["operating_points"][m["default_operating_point"]] for m in reports]
        row = {"reports": key, "seeds": len(reports)}
        for metric in ("auc", "sensitivity", "specificity", "average_precision"):
            values = pd.Series([p[metric] for p in points])
            row[f"{metric} (mean ± sd)"] = f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
        row["per seed AUC"] = ", ".join(f"{p['auc']:.3f}" for p in points)
        row["per seed specificity"] = ", ".join(f"{p['specificity']:.3f}" for p in points)
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    args = parser.parse_args()
    runs = Path(args.runs)
    print("## Training runs\n")
    print(training_table(runs).to_markdown(index=False))
    print("\n## Evaluations\n")
    print(evaluation_table(runs / "eval").to_markdown(index=False))
    seeds = seed_table(runs / "eval")
    if not seeds.empty:
        print("\n## Across training seeds (operating point sens90, chosen on val)\n")
        print(seeds.to_markdown(index=False))


if __name__ == "__main__":
    main()
