"""Would the mean of two differently trained models flip fewer verdicts than either? Scored side by side.

    python scripts/ensemble_flips.py MODEL MODEL [MODEL ...] --data DATASET --reference REFERENCE
        [--split val] [--out results.json]

Mirror TTA did not steady the verdicts (``scripts/tta_flips.py``): a re-save leaves the same artefacts in a
radiograph and in its mirror, and one set of weights answers both alike. Networks trained apart alias
differently (the flips follow the sampling grid of their strided layers, docs/STABILITY.md), so what a
re-save does to one model's score may be partly independent of what it does to another's, and their mean
would move less: the paper's ensembles, asked of the flips before any ensemble format is built for them.

Every file of ``--split`` (the models' shared manifest) is re-saved as ``fracdet evaluate --stability`` does
(:data:`fracdet.evaluation.stability.VARIANTS`) and scored by each model, so every setting comes from one
scoring: each model alone, and ``mean`` (the mean of their logit margins, as :class:`fracdet.models.Ensemble`
averages, with its temperature fitted on the validation originals). Each setting gets its own *suspicious*
threshold (sens90), chosen on the validation originals scored the same way; a verdict flips when the original
and the re-saved file fall on either side of it. Per setting: ROC AUC (95% group-bootstrap interval), the
threshold, the small fractures flagged there (the rule's (b)), the files scoring near it, and per variant the
flip rate (interval), flips (and how many of them were near), and the median, 90th percentile and largest
change of the probability; then the rule's checks, as
``scripts/judge_recipe.py`` makes them of one seed: ``REFERENCE`` is the shipped model's validation report on
the models' split (``fracdet evaluate MODEL --split val``), whose AUC less ``--margin`` is the bar (the
bar moves with the split, so it is read, never written here).
Validation unless asked: no test image is needed to decide whether an ensemble is worth building.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from _split_scripts import report
from fracdet.data import load_dataset
from fracdet.data.split import apply_manifest, split_rows
from fracdet.data.table import absolute_paths
from fracdet.evaluation.metrics import group_bootstrap
from fracdet.evaluation.stability import flip_figures, near_threshold, resaved
from fracdet.models import TrainedModel, load
from fracdet.training.calibrate import choose_thresholds, fit_temperature, probabilities
from judge_recipe import MEAN_OF, Seed, judge


def shared_rows(models: list[TrainedModel], data: str, split: str) -> pd.DataFrame:
    """``split``'s rows of ``data`` in the models' manifest; models trained on different splits are refused
    (one could have seen the other's validation images)."""
    manifests = {m.splits_path.read_bytes() for m in models}
    if len(manifests) != 1:
        sys.exit("the models were trained on different split manifests: their mean is not a model of one split")
    table = apply_manifest(load_dataset(data), str(models[0].splits_path))
    return split_rows(table, split, needed_for="to measure flips on (val: to choose the thresholds)")


def setting_figures(margins: dict[str, np.ndarray], temperature: float, val: tuple[np.ndarray, np.ndarray],
                    rows: pd.DataFrame) -> dict:  # fmt: skip
    """AUC, threshold, small fractures flagged and per-variant flips of one setting's margins."""
    labels, groups = rows["label"].to_numpy(int), rows["group"].astype(str).to_numpy()
    val_labels, val_margins = val
    threshold = choose_thresholds(val_labels, probabilities(val_margins, temperature))["sens90"]
    reference = probabilities(margins["original"], temperature)
    auc = group_bootstrap(lambda i: {"auc": float(roc_auc_score(labels[i], reference[i]))}, len(labels), groups=groups)
    small = (labels == 1) & rows["fracture_size"].astype(str).str.startswith("small").to_numpy()
    figures = {"temperature": temperature, "auc": float(roc_auc_score(labels, reference)),
               "auc_ci95": list(auc["auc"]), "sens90_threshold": threshold,
               "small_flagged": int((reference[small] >= threshold).sum()), "small": int(small.sum()),
               "near_threshold": int(near_threshold(reference, threshold).sum())}  # fmt: skip
    resaves = {k: probabilities(m, temperature) for k, m in margins.items() if k != "original"}
    figures |= flip_figures(reference, resaves, threshold, groups)
    mean_flips = float(np.mean([figures[v]["flip_rate"] for v in MEAN_OF if v in figures]))
    figures["mean_flips"] = mean_flips
    return figures


def verdict(name: str, figures: dict, reference: Seed, **bars: float) -> list[str]:
    """judge_recipe's rule applied to one setting, as to a recipe of one seed: its lines, the last pass/fail."""
    variants = [k for k, v in figures.items() if isinstance(v, dict) and "flip_rate" in v]
    setting = Seed(name=name, auc=figures["auc"], small_flagged=figures["small_flagged"], small=figures["small"],
                   flips={v: figures[v]["flip_rate"] for v in variants})  # fmt: skip
    return judge([setting], reference, **bars)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="two or more models trained on one split manifest")
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val", help="where flips are counted (thresholds: always val)")
    parser.add_argument(
        "--reference",
        required=True,
        help="the shipped model's validation metrics.json on the models' split: the rule's bars",
    )
    parser.add_argument("--margin", type=float, default=0.005)
    parser.add_argument("--mean-flips", type=float, default=0.030)
    parser.add_argument("--each-flip", type=float, default=0.02)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if len(args.models) < 2:
        sys.exit("give two or more models: their mean is what is measured")
    reference = Seed.read(args.reference, stability=False)
    bars = {"margin": args.margin, "mean_flips": args.mean_flips, "each_flip": args.each_flip}
    models = [load(name) for name in args.models]
    sizes = {m.preprocess.input_size for m in models}
    rows = shared_rows(models, args.data, args.split)
    val_rows = rows if args.split == "val" else shared_rows(models, args.data, "val")

    def scored(rows: pd.DataFrame, variants: bool) -> tuple[pd.DataFrame, list[dict[str, np.ndarray]]]:
        """Each model's margins of ``rows``' files (re-saved too, with ``variants``) at its own input size."""
        per_size = {size: resaved(absolute_paths(rows), size, None if variants else {}) for size in sorted(sizes)}
        kept = sorted(set.intersection(*(set(k) for k, _ in per_size.values())))
        out = []
        for m in models:
            got, images = per_size[m.preprocess.input_size]
            take = np.searchsorted(got, kept)
            out.append({k: m.margins(x[take], tta=False, progress_desc=f"{m.name}, {k}") for k, x in images.items()})
        return rows.iloc[kept].reset_index(drop=True), out

    rows, margins = scored(rows, variants=True)
    if args.split == "val":
        val_rows, val_margins = rows, margins
    else:
        val_rows, val_margins = scored(val_rows, variants=False)
    val_labels = val_rows["label"].to_numpy(int)
    mean = {k: np.mean([m[k] for m in margins], axis=0) for k in margins[0]}
    mean_val = np.mean([m["original"] for m in val_margins], axis=0)

    settings = {
        f"{model.name} {model.version}": setting_figures(own, model.temperature, (val_labels, val["original"]), rows)
        for model, own, val in zip(models, margins, val_margins, strict=True)
    }
    settings["mean"] = setting_figures(mean, fit_temperature(mean_val, val_labels), (val_labels, mean_val), rows)
    for name, figures in settings.items():
        figures["rule"] = verdict(name, figures, reference, **bars)
    rule = {"reference": f"{reference.name} {reference.auc:.4f}", **bars}
    results = {"command": "python scripts/ensemble_flips.py " + " ".join(sys.argv[1:]), "split": args.split,
               "images": len(rows), "rule": rule, **settings}  # fmt: skip
    report(results, args.out)


if __name__ == "__main__":
    main()
