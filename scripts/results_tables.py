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


def lever_table(runs: Path, evals: Path) -> pd.DataFrame:
    """The localiser levers side by side, on validation only (where a recipe is chosen; issue 15).

    One row per localiser run with a validation report ``runs/eval/RUN-val``: how it was trained (what
    differs from ``configs/localiser.yaml``), the validation AUC of each part of its image logit (fitted on
    validation, so optimistic for the fused one), the validation localisation figures, and, with a
    ``runs/eval/RUN-val-stability`` report (``--stability``), how often re-saving flips a validation verdict.
    """
    base = yaml.safe_load((Path(__file__).parents[1] / "configs" / "localiser.yaml").read_text())
    rows = []
    for report in sorted(evals.glob("*-val/metrics.json")):
        m = json.loads(report.read_text())
        run = runs / report.parent.name.removesuffix("-val")
        if "lesions" not in m or not (run / "model.json").is_file():
            continue
        meta = json.loads((run / "model.json").read_text())
        trained = Path(meta["members"][0]) if meta.get("fused") else run  # a fused model: its localiser's recipe
        config = yaml.safe_load((trained / "config.yaml").read_text())
        changed = [f"{k}={config[k]}" for k in ("model", "image_size") if config.get(k) != base.get(k)]
        changed += [f"augment.{k}={v}" for k, v in config["augment"].items() if base["augment"].get(k) != v]
        changed += [f"localise.{k}={v}" for k, v in config["localise"].items() if base["localise"].get(k, v) != v]
        if meta.get("fused"):
            changed.insert(0, f"{trained.name} fused with " + ", ".join(m["name"] for m in meta["fused"][1:]))
        parts = meta.get("fusion_val_auc", {})
        extra = [k for k in parts if k not in ("classifier", "map_peak", "fused")]  # a fused model's classifiers
        lesions = m["lesions"]["all"]
        rows.append(
            {"run": run.name, "differs from configs/localiser.yaml": ", ".join(changed) or "-",
             "AUC classifier / map peak / [fused classifiers] / fused": " / ".join(
                 f"{parts.get(k, float('nan')):.3f}" for k in ("classifier", "map_peak", *extra, "fused")),
             "pointing game": f"{m['localisation']['pointing_game']:.3f}",
             "loc. sens. @suspicious (IoU / centre)":
                 f"{lesions['localised_sensitivity_iou@suspicious']['value']:.3f} / "
                 f"{lesions['localised_sensitivity_centre@suspicious']['value']:.3f}",
             "FROC @1 FP (IoU)": f"{lesions['froc_iou@1']['value']:.3f}",
             "mAP50 fractured": f"{lesions['map50_fractured']['value']:.3f}",
             "false boxes / normal @suspicious": f"{lesions['false_boxes_per_normal@suspicious']['value']:.3f}",
             "verdict flips JPEG75 / WebP80 / half": _flips(evals / f"{run.name}-val-stability" / "metrics.json")}
        )  # fmt: skip
    return pd.DataFrame(rows)


LOCALISER_FIGURES = {  # column -> (part of the lesion report, key); image AUC and pointing game are apart
    "localised sens. @suspicious, IoU": "localised_sensitivity_iou@suspicious",
    "localised sens. @suspicious, centre": "localised_sensitivity_centre@suspicious",
    "FROC @1 FP (IoU)": "froc_iou@1",
    "mAP50 fractured": "map50_fractured",
    "false boxes / normal @suspicious": "false_boxes_per_normal@suspicious",
}


def localiser_seed_table(evals: Path) -> pd.DataFrame:
    """A localiser recipe's seeds on one split, each figure on all images and without surgical hardware, with
    the mean and standard deviation over seeds (the issue-15 targets are means of 3 seeds).

    Reads reports named ``NAME-seedK-SPLIT`` that carry lesion figures (``fracdet evaluate`` of a localiser);
    one row per report, then one ``mean ± sd`` row per ``NAME ... SPLIT`` with two or more seeds.
    """
    rows = []
    for report in sorted(evals.glob("*/metrics.json")):
        match = re.fullmatch(r"(.+)-seed(\d+)-(.+)", report.parent.name)
        m = json.loads(report.read_text())
        if not match or not m.get("lesions"):
            continue
        row = {"recipe": match[1], "seed": int(match[2]), "report": match[3], "images": m["images"]}
        for part, suffix in (("all", ""), ("without_hardware", " (no hardware)")):
            figures = m["lesions"].get(part)
            if figures is None:
                continue
            row["image AUC" + suffix] = figures["image_auc"]["value"]
            for column, key in LOCALISER_FIGURES.items():
                row[column + suffix] = figures[key]["value"]
        row["pointing game"] = (m.get("localisation") or {}).get("pointing_game", float("nan"))
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    out = []
    for (recipe, name), group in table.groupby(["recipe", "report"], sort=True):
        out += [
            {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in group.to_dict("records")
        ]
        if len(group) > 1:
            numbers = group.drop(columns=["recipe", "seed", "report", "images"])
            out.append({"recipe": recipe, "seed": f"mean ± sd of {len(group)}", "report": name,
                        "images": group["images"].iloc[0],
                        **{k: f"{numbers[k].mean():.3f} ± {numbers[k].std(ddof=1):.3f}" for k in numbers}})  # fmt: skip
    return pd.DataFrame(out)


def stability_table(evals: Path) -> pd.DataFrame:
    """Reports made with ``--stability`` (``NAME-SPLIT-stability``): the image AUC and, at the model's own
    operating point, the verdict flip rate for each re-saved variant and their mean (issue 16)."""
    rows = []
    for report in sorted(evals.glob("*-stability/metrics.json")):
        m = json.loads(report.read_text())
        variants = (m.get("stability") or {}).get("variants")
        if not variants:
            continue
        flips = {k: variants[k]["flip_rate"] for k in ("jpeg95", "jpeg75", "webp80", "half")}
        mean = (flips["jpeg75"] + flips["webp80"] + flips["half"]) / 3
        rows.append({"report": report.parent.name, "images": m["images"],
                     "AUC": f"{m['operating_points'][m['default_operating_point']]['auc']:.3f}",
                     **{f"flips {k}": f"{v:.3f}" for k, v in flips.items()},
                     "mean flips (jpeg75, webp80, half)": f"{mean:.3f}",
                     "median abs dp, jpeg75": f"{variants['jpeg75']['median_abs_change']:.4f}"})  # fmt: skip
    return pd.DataFrame(rows)


def _flips(report: Path) -> str:
    """Verdict flip rates of a ``--stability`` report, or ``-`` when there is none."""
    if not report.is_file():
        return "-"
    variants = json.loads(report.read_text())["stability"]["variants"]
    return " / ".join(f"{variants[k]['flip_rate']:.3f}" for k in ("jpeg75", "webp80", "half"))


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
    levers = lever_table(runs, evals)
    if not levers.empty:
        print("\n## Localiser levers, on validation (seed 0 each)\n")
        print(levers.to_markdown(index=False))
    localisers = localiser_seed_table(evals)
    if not localisers.empty:
        print("\n## Localiser recipes across seeds (each figure also without surgical hardware)\n")
        print(localisers.to_markdown(index=False))
    stability = stability_table(evals)
    if not stability.empty:
        print("\n## Verdict stability under re-saving (--stability reports)\n")
        print(stability.to_markdown(index=False))
    if args.data:
        print("\n## By fracture size and surgical hardware (mean over seeds; each size against all normals)\n")
        print(fracture_size_table(evals, Path(args.data)).to_markdown(index=False))


if __name__ == "__main__":
    main()
