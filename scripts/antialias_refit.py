"""Does the low-pass alone steady a trained model? Its own weights, rebuilt anti-aliased, fitted again on val.

    python scripts/antialias_refit.py MODEL --data DATASET --out FOLDER
    fracdet evaluate FOLDER --split val --stability --no-heatmaps

:func:`fracdet.models.rebuilt` puts MODEL's weights, unchanged, into networks with a binomial low-pass before
each subsampling (``antialias``, :mod:`fracdet.models.backbones`); the input is not blurred. The networks
then compute a little otherwise than they were trained to, so the fusion, temperature and thresholds are
fitted again on the validation files of MODEL's own manifest, as ``fracdet calibrate`` fits them
(:func:`fracdet.training.recalibrate.recalibrate`), and the result is written to FOLDER. Evaluated on
validation beside MODEL, it says how many of the verdict flips the low-pass removes, and what it costs in
AUC, before any training with it (``antialias: true`` in a training config). MODEL needs PyTorch weights:
for a compiled release, pass the float model it names.
"""

from __future__ import annotations

import argparse

from fracdet.data import load_dataset
from fracdet.data.split import apply_manifest
from fracdet.models import load, rebuilt
from fracdet.training.recalibrate import recalibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="the dataset of MODEL's manifest (its original files)")
    parser.add_argument("--out", required=True, help="a new model folder")
    args = parser.parse_args()
    model = load(args.model)
    if model.splits_path is None:
        parser.error(f"{args.model} carries no split manifest to find its validation files in")
    steady = rebuilt(model, antialias=True)
    steady = recalibrate(steady, apply_manifest(load_dataset(args.data), str(model.splits_path)), args.out)
    print(f"{model.label}, anti-aliased and fitted again on validation: {steady.folder} (temperature "
          f"{steady.temperature:.3f}, {steady.operating_point} threshold {steady.threshold:.3f})")  # fmt: skip
    if fusion := steady.meta.get("fusion_val_auc"):
        print("val AUC of each part and fused: " + ", ".join(f"{k} {v:.3f}" for k, v in fusion.items()))


if __name__ == "__main__":
    main()
