"""Would mirror test-time augmentation cut a model's verdict flips? Each radiograph scored plain and mirrored.

    python scripts/tta_flips.py MODEL --data DATASET [--splits splits.csv] [--split val]
        [--out docs/evidence/tta-flips.json]

The shipped int8 default scores without TTA only (its graph holds one forward), so the question is asked of
a model with PyTorch weights (e.g. ``fracatlas-localiser``, the float model it was quantised from): if the
mirror's average moved verdicts much less, a graph with the mirror inside would be worth its doubled time.

Every file of ``--split`` is re-saved as ``fracdet evaluate --stability`` does
(:data:`fracdet.evaluation.stability.VARIANTS`) and each image, original and re-saved, is scored as it is and
mirrored, so three settings come from one scoring: *plain* (the model as it ships), *tta* (the mean of the two
margins, what ``tta=True`` computes) and *mirror* (the mirror alone: is the mirror itself steadier?). Each
setting gets its own *suspicious* threshold (sens90), chosen on the validation originals scored the same way;
a verdict flips when the original and the re-saved file fall on different sides of it. Reported per setting:
validation ROC AUC, the threshold, and per variant the flip rate (95% group-bootstrap interval), the number
of flips and the median, 90th percentile and largest change of the probability
(:func:`fracdet.evaluation.stability.flip_figures`, the yardstick ``fracdet evaluate --stability`` uses).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from fracdet.data import load_dataset
from fracdet.data.split import apply_manifest, split_rows
from fracdet.data.table import absolute_paths
from fracdet.evaluation.stability import flip_figures, resaved
from fracdet.models import load
from fracdet.training.calibrate import choose_thresholds


def scored(model, images: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Margins of every variant's images per setting: ``plain``, ``mirror`` and ``tta`` (their mean)."""
    plain = {k: model.margins(x, tta=False, progress_desc=f"{k}") for k, x in images.items()}
    mirror = {k: model.margins(np.ascontiguousarray(x[:, :, ::-1]), tta=False, progress_desc=f"{k}, mirrored")
              for k, x in images.items()}  # fmt: skip
    return {"plain": plain, "mirror": mirror, "tta": {k: (plain[k] + mirror[k]) / 2 for k in images}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", help="split manifest (default: the model's)")
    parser.add_argument("--split", default="val", help="where flips are counted (thresholds: always val)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    model = load(args.model)
    if model.graph is not None:
        sys.exit(f"{model.name} is a compiled graph, which scores without TTA only: give a model with PyTorch weights")
    table = apply_manifest(load_dataset(args.data), args.splits or str(model.splits_path))
    size = model.preprocess.input_size

    def split_images(split: str, variants: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        rows = split_rows(table, split, needed_for="to measure flips on (val: to choose the thresholds)")
        kept, images = resaved(absolute_paths(rows), size, None if variants else {})
        return rows["label"].to_numpy(int)[kept], rows["group"].astype(str).to_numpy()[kept], images

    labels, groups, images = split_images(args.split, variants=True)
    margins = scored(model, images)
    if args.split == "val":
        val_labels, val_margins = labels, margins
    else:
        val_labels, _, val_images = split_images("val", variants=False)
        val_margins = scored(model, val_images)

    def probability(m: np.ndarray) -> np.ndarray:
        return expit(m.astype(np.float64) / model.temperature)

    results = {"model": f"{model.name} {model.version}", "data": args.data, "split": args.split,
               "images": len(labels), "command": "python scripts/tta_flips.py " + " ".join(sys.argv[1:])}  # fmt: skip
    for setting, per_variant in margins.items():
        threshold = choose_thresholds(val_labels, probability(val_margins[setting]["original"]))["sens90"]
        reference = probability(per_variant["original"])
        row = {"val_auc": float(roc_auc_score(val_labels, probability(val_margins[setting]["original"]))),
               "sens90_threshold": threshold}  # fmt: skip
        row |= flip_figures(reference, {v: probability(m) for v, m in per_variant.items() if v != "original"},
                            threshold, groups)  # fmt: skip
        results[setting] = row
        print(setting, json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
