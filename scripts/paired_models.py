"""Do models differ on one split by more than chance? Paired intervals of the differences in ranking.

    python scripts/paired_models.py MODEL MODEL [MODEL ...] --data DATASET [--splits splits.csv] [--split val]
        [--sensitivity 0.9] [--bootstrap 1000] [--out results.json]

Every model scores the same images of ``--split`` (the first model's manifest unless ``--splits``); a compiled
(int8) model is scored twice: by this CPU's fused kernels and by its reference arithmetic (nothing fused, what
its integers mean on every CPU, and what a CPU with VNNI computes; :func:`fracdet.inference.quantize.kernel_change`).
For each scoring: the ROC AUC and the specificity at ``--sensitivity`` on the ROC curve (no threshold is
chosen); for every scoring, its differences from the last model as it runs here. All with 95% intervals from
one group bootstrap (copies of one radiograph resampled together; the same draws for every scoring, so the
differences are paired). Why: 1.1.1's validation AUC (0.937) sat below 1.1.0's (0.942, on VNNI) by less
than either one's interval is wide, and only a paired interval says whether the seventh bit of the weights
cost anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from fracdet.data import load_dataset
from fracdet.data.pixels import load_pixels
from fracdet.data.split import apply_manifest, split_rows
from fracdet.evaluation.metrics import group_bootstrap, specificity_at_sensitivity
from fracdet.models import TrainedModel, load
from fracdet.models.compiled import OnnxRuntime, compiled_outputs


def scorings(model: TrainedModel, images: np.ndarray) -> dict[str, np.ndarray]:
    """Margins of ``images`` per scoring of ``model``: as it runs here (first) and, if compiled, in its reference
    arithmetic."""
    label = f"{model.name} {model.version}"
    if model.graph is None:
        return {label: model.margins(images, progress_desc=label)}
    reference = OnnxRuntime(model.graph, spin="never", kernels="reference")
    return {f"{label}, fused": compiled_outputs(model, images, progress_desc=f"{label}, fused").margins,
            f"{label}, reference": compiled_outputs(model, images, runtime=reference,
                                                    progress_desc=f"{label}, reference").margins}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="names or folders; the last is what the others are compared with")
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", help="split manifest (default: the first model's)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--sensitivity", type=float, default=0.9)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    if len(args.models) < 2:
        parser.error("give at least two models to compare")
    models = [load(name) for name in args.models]
    table = apply_manifest(load_dataset(args.data), args.splits or str(models[0].splits_path))
    rows = split_rows(table, args.split, needed_for="to compare the models on")
    pixels = load_pixels(rows, models[0].preprocess.input_size, desc=f"decoding {args.split}")
    labels = pixels.table["label"].to_numpy(int)
    groups = pixels.table["group"].astype(str).to_numpy()
    if len(np.unique(labels)) < 2:
        sys.exit(f"the {args.split} split needs fractured and normal radiographs to compare rankings")
    per_model = [scorings(model, pixels.images) for model in models]
    margins = {label: m for scored in per_model for label, m in scored.items()}
    last = next(iter(per_model[-1]))  # the last model as it runs here

    def statistics(idx: np.ndarray) -> dict[str, float]:
        y = labels[idx]
        out = {}
        for label, m in margins.items():
            out[f"{label}: auc"] = roc_auc_score(y, m[idx])
            out[f"{label}: specificity"] = specificity_at_sensitivity(y, m[idx], args.sensitivity)
        for label in margins:
            if label != last:
                for figure in ("auc", "specificity"):
                    out[f"{label} - {last}: {figure}"] = out[f"{label}: {figure}"] - out[f"{last}: {figure}"]
        return out

    point = statistics(np.arange(len(labels)))
    intervals = group_bootstrap(statistics, len(labels), groups=groups, n_boot=args.bootstrap)
    figures = {k: {"value": float(v), "ci95": [float(x) for x in intervals[k]]} for k, v in point.items()}
    results = {"command": "python scripts/paired_models.py " + " ".join(sys.argv[1:]), "split": args.split,
               "images": len(labels), "fractured": int(labels.sum()), "sensitivity": args.sensitivity,
               "figures": figures}  # fmt: skip
    for key, figure in results["figures"].items():
        print(f"{key:70s} {figure['value']:+.4f} [{figure['ci95'][0]:+.4f}, {figure['ci95'][1]:+.4f}]")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
