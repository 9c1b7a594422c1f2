"""Print the tables of docs/RESULTS.md from the run folders and evaluation reports that made them.

    python scripts/results_tables.py [--runs runs] [--evals runs/eval] [--data ../shared/data/fracatlas]

Reads ``runs/*/metrics.csv``, ``runs/*/run.json``, ``runs/*/config.yaml`` (how each model was trained)
and ``runs/eval/*/metrics.json`` (what ``fracdet evaluate`` measured), as written by
``scripts/reproduce_results.sh``. Prints Markdown. With ``--data`` (FracAtlas), also sensitivity by
fracture size across seeds, joining each report's ``predictions.csv`` to the dataset's expert boxes.
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
             "epochs planned": config["epochs"], "epochs run": len(history), "best epoch": int(best["epoch"]),
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


def seed_groups(evals: Path) -> dict[str, list[Path]]:
    """Report folders named ``...-seedN-...`` that differ only in N, keyed by the name with ``seed*``."""
    groups: dict[str, list[Path]] = {}
    for report in sorted(evals.glob("*/metrics.json")):
        if match := re.search(r"-seed\d+", report.parent.name):
            groups.setdefault(report.parent.name.replace(match.group(0), "-seed*"), []).append(report.parent)
    return {key: folders for key, folders in groups.items() if len(folders) >= 2}


def roc_specificity(report: Path, sensitivity: float = 0.90) -> float:
    """Specificity on the report's own ROC at ``sensitivity``, from its scores (older reports lack the field)."""
    from fracdet.evaluation import specificity_at_sensitivity

    predictions = pd.read_csv(report / "predictions.csv")
    return specificity_at_sensitivity(predictions["label"], predictions["probability"], sensitivity)


def seed_table(evals: Path) -> pd.DataFrame:
    """Mean ± sd over training seeds: reports named ``...-seedN-...`` that differ only in N."""
    rows = []
    for key, folders in seed_groups(evals).items():
        reports = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
        points = [m["operating_points"][m["default_operating_point"]] for m in reports]
        row = {"reports": key, "seeds": len(reports)}
        for metric in ("auc", "sensitivity", "specificity", "average_precision"):
            values = pd.Series([p[metric] for p in points])
            row[f"{metric} (mean ± sd)"] = f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"
        roc = pd.Series([roc_specificity(folder) for folder in folders])
        row["ROC specificity at sens 0.90 (mean ± sd)"] = f"{roc.mean():.3f} ± {roc.std(ddof=1):.3f}"
        row["per seed AUC"] = ", ".join(f"{p['auc']:.3f}" for p in points)
        row["per seed specificity"] = ", ".join(f"{p['specificity']:.3f}" for p in points)
        rows.append(row)
    return pd.DataFrame(rows)


def fracture_size_table(evals: Path, data: Path) -> pd.DataFrame:
    """Per seed group: sensitivity at the val-chosen sens90 threshold and AUC for each fracture size class."""
    from fracdet.data import load_dataset
    from fracdet.data.sources import FRACTURE_SIZES
    from fracdet.evaluation import subgroup_metrics

    columns = ["path", "region", "view", "hardware", "fracture_size"]
    table = load_dataset(data)[columns]
    rows = []
    for key, folders in seed_groups(evals).items():
        per_seed = []
        for folder in folders:
            m = json.loads((folder / "metrics.json").read_text())
            threshold = m["thresholds"][m["default_operating_point"]]
            predictions = pd.read_csv(folder / "predictions.csv")[["path", "label", "probability"]]
            subgroups = subgroup_metrics(predictions.merge(table, on="path", how="left"), threshold)
            per_seed.append(subgroups[subgroups["by"].isin(["fracture_size", "hardware"])].set_index(["by", "value"]))
        mean = pd.concat(per_seed).groupby(level=[0, 1]).mean()
        order = [("fracture_size", name) for _, name in FRACTURE_SIZES] + [("hardware", "no"), ("hardware", "yes")]
        row = {"reports": key, "seeds": len(folders)}
        for by, value in (i for i in order if i in mean.index):
            r = mean.loc[(by, value)]
            name = value if by == "fracture_size" else f"hardware {value}"
            row[f"{name}: n, sens, AUC"] = f"{int(r['fractures'])}, {r['sensitivity']:.3f}, {r['auc']:.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--evals", help="folder of evaluation reports (default: RUNS/eval)")
    parser.add_argument("--data", help="the FracAtlas folder: adds sensitivity by fracture size")
    args = parser.parse_args()
    runs = Path(args.runs)
    evals = Path(args.evals) if args.evals else runs / "eval"
    print("## Training runs\n")
    print(training_table(runs).to_markdown(index=False))
    print("\n## Evaluations\n")
    print(evaluation_table(evals).to_markdown(index=False))
    seeds = seed_table(evals)
    if not seeds.empty:
        print("\n## Across training seeds (operating point sens90, chosen on val)\n")
        print(seeds.to_markdown(index=False))
    if args.data:
        print("\n## By fracture size and surgical hardware (mean over seeds; each size against all normals)\n")
        print(fracture_size_table(evals, Path(args.data)).to_markdown(index=False))


if __name__ == "__main__":
    main()
