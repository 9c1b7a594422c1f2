"""How often a model's verdict changes when a radiograph is re-saved as JPEG (or WebP) at a given quality.

    python scripts/reencode_flips.py MODEL --data DATASET [--splits splits.csv] [--split test] [--quality 75]

Each file of the split is decoded as fracdet decodes it, written back as an 8-bit JPEG (or WebP) at the
quality asked, decoded again, and scored; the verdict at the model's operating threshold is compared with
the verdict on the original file. Prints the share of flipped verdicts (with a 95% group-bootstrap interval)
and the median absolute change of the probability.
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
from PIL import Image

from fracdet.data import ImageReadError, load_dataset, read_image
from fracdet.data.pixels import resize_square
from fracdet.data.split import apply_manifest
from fracdet.data.table import absolute_paths
from fracdet.evaluation.metrics import group_bootstrap
from fracdet.models import load
from fracdet.utils.progress import progress


def reencoded(path, quality: int, fmt: str) -> np.ndarray:
    grey = np.clip(np.rint(read_image(path) * 255), 0, 255).astype(np.uint8)
    if grey.ndim == 3:
        grey = grey.mean(axis=2).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format=fmt, quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), np.float32) / 255.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--splits", help="split manifest (default: the model's)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--format", default="JPEG", choices=["JPEG", "WEBP"])
    args = parser.parse_args()
    model = load(args.model)
    table = apply_manifest(load_dataset(args.data), args.splits or str(model.splits_path))
    rows = table[table["split"] == args.split].reset_index(drop=True)
    rows.attrs.update(table.attrs)
    size = model.preprocess.input_size
    original, changed, groups = [], [], []
    for path, group in progress(list(zip(absolute_paths(rows), rows["group"], strict=True)), desc="re-encoding"):
        try:
            pixels = read_image(path)
        except ImageReadError:  # unreadable files are left out, as everywhere
            continue
        original.append(resize_square(pixels, size))
        changed.append(resize_square(reencoded(path, args.quality, args.format), size))
        groups.append(str(group))
    p0 = model.score(np.stack(original), progress_desc="scoring originals").probabilities
    p1 = model.score(np.stack(changed), progress_desc="scoring re-encoded").probabilities
    flipped = (p0 >= model.threshold) != (p1 >= model.threshold)
    ci = group_bootstrap(lambda idx: {"flip_rate": float(flipped[idx].mean())}, len(flipped),
                         groups=np.asarray(groups), n_boot=1000)["flip_rate"]  # fmt: skip
    print(json.dumps({"model": f"{model.name} {model.version}", "split": args.split, "images": len(flipped),
                      "format": args.format, "quality": args.quality, "threshold": model.threshold,
                      "flip_rate": float(flipped.mean()), "flip_rate_ci95": list(ci),
                      "median_abs_probability_change": float(np.median(np.abs(p1 - p0)))}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
