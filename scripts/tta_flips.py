"""Would test-time augmentation cut a model's verdict flips? Each radiograph scored as it is and in other views.

    python scripts/tta_flips.py MODEL --data DATASET [--splits splits.csv] [--split val] [--views mirror|shift]
        [--out docs/evidence/tta-flips.json]

``--views mirror`` (the default) asks it of the mirror image; it needs a model with PyTorch weights (e.g.
``fracatlas-localiser``), since a graph scores one view and a graph with the mirror inside would have to earn
its doubled time. ``--views shift`` asks it of the image moved by one pixel right, down and both at the
model's input size (the rows and columns uncovered repeat the edge, as :class:`fracdet.training.augment.Shift`
moves stability training's copy): four meetings of the network's sampling grids, whose mean would move less
under a re-save if what a re-save does to the score were the noise of one grid (aliasing, docs/STABILITY.md);
any model, the shipped int8 graph included, since the views are made before it.

Every file of ``--split`` is re-saved as ``fracdet evaluate --stability`` does
(:data:`fracdet.evaluation.stability.VARIANTS`) and each image, original and re-saved, is scored in every view,
so three settings come from one scoring: *plain* (the model as it ships), the other views alone (their mean:
is another view itself steadier?) and *tta* (the mean of every view's margin, plain included). Each setting
gets its own *suspicious* threshold (sens90), chosen on the validation originals scored the same way; a
verdict flips when the original and the re-saved file fall on different sides of it. Reported per setting:
validation ROC AUC, the threshold, and per variant the flip rate (95% group-bootstrap interval), the number
of flips and the median, 90th percentile and largest change of the probability
(:func:`fracdet.evaluation.stability.flip_figures`, the yardstick ``fracdet evaluate --stability`` uses).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score
from torchvision import tv_tensors

from fracdet.data import load_dataset
from fracdet.data.split import apply_manifest, split_rows
from fracdet.data.table import absolute_paths
from fracdet.evaluation.stability import flip_figures, resaved
from fracdet.models import load
from fracdet.training.augment import Shift
from fracdet.training.calibrate import choose_thresholds


def moved(images: np.ndarray, down: int, right: int) -> np.ndarray:
    """``(N, H, W)`` images moved by whole pixels, the rows and columns uncovered repeating the edge."""
    return np.stack([Shift(max(down, right)).transform(tv_tensors.Image(torch.from_numpy(image[None])),
                                                        {"down": down, "right": right})[0].numpy()
                     for image in images])  # fmt: skip


VIEWS: dict[str, list[Callable[[np.ndarray], np.ndarray]]] = {
    "mirror": [lambda x: np.ascontiguousarray(x[:, :, ::-1])],
    "shift": [functools.partial(moved, down=d, right=r) for d, r in ((0, 1), (1, 0), (1, 1))],
}


def scored(model, images: dict[str, np.ndarray], views: str) -> dict[str, dict[str, np.ndarray]]:
    """Margins of every variant's images per setting: ``plain``, ``views`` (the other views' mean) and ``tta``
    (the mean of all)."""
    plain = {k: model.margins(x, tta=False, progress_desc=k) for k, x in images.items()}
    others = {k: [model.margins(view(x), tta=False, progress_desc=f"{k}, {views} {n + 1}")
                  for n, view in enumerate(VIEWS[views])] for k, x in images.items()}  # fmt: skip
    return {"plain": plain, views: {k: np.mean(m, axis=0) for k, m in others.items()},
            "tta": {k: np.mean([plain[k], *others[k]], axis=0) for k in images}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", help="split manifest (default: the model's)")
    parser.add_argument("--split", default="val", help="where flips are counted (thresholds: always val)")
    parser.add_argument("--views", choices=sorted(VIEWS), default="mirror", help="what each image is averaged with")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    model = load(args.model)
    if model.graph is not None and args.views == "mirror":
        sys.exit(f"{model.name} is a compiled graph, which scores one view: give a model with PyTorch weights")
    table = apply_manifest(load_dataset(args.data), args.splits or str(model.splits_path))
    size = model.preprocess.input_size

    def split_images(split: str, variants: bool) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        rows = split_rows(table, split, needed_for="to measure flips on (val: to choose the thresholds)")
        kept, images = resaved(absolute_paths(rows), size, None if variants else {})
        return rows["label"].to_numpy(int)[kept], rows["group"].astype(str).to_numpy()[kept], images

    labels, groups, images = split_images(args.split, variants=True)
    margins = scored(model, images, args.views)
    if args.split == "val":
        val_labels, val_margins = labels, margins
    else:
        val_labels, _, val_images = split_images("val", variants=False)
        val_margins = scored(model, val_images, args.views)

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
