"""Do a model's verdict flips come from how radiographs were exported, or from where its threshold sits?

    python scripts/export_signature.py MODEL --data DATASET [--split val] [--out FILE.json]
    python scripts/export_signature.py --census --data DATASET

``--census`` only counts, over the whole dataset, the files and the fractured among them per export.

A dataset's files come out of export pipelines, and each leaves its JPEG quality in the file's quantisation
tables. Where the pipeline goes with the label (FracAtlas: most files were saved at quality 89, one in
seven of them fractured; of those saved at 90, 92 or 94, one in five to all), a network can learn the
pipeline's traces instead of the bone, and a re-save, which replaces those traces, would then move scores
systematically. Two questions, answered on validation (no test image is needed):

1. Per export (JPEG quality and colour mode of the file as read): how many files, how many fractured, and
   for every re-saved variant of :data:`fracdet.evaluation.stability.VARIANTS` the mean signed change of
   the calibrated logit (a systematic shift), its median absolute change, the verdict flips at the model's
   threshold, and how many files score within ``--near`` logits of that threshold (where a change of that
   size can flip a verdict). Flips that follow the exports point at the pipeline; flips that follow the
   files near the threshold in every export point at the threshold's place and the size of the changes.
2. Does the score follow the quality itself? Every file is also re-saved as a grey JPEG at each quality the
   split's exports used (at least ``--min-files`` files), and the mean logit change between the lowest and
   the highest of those qualities is reported per export. Were the network reading the quality, it would
   not be near zero.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.special import logit

from _split_scripts import model_and_rows, report, split_parser
from fracdet.data import load_dataset
from fracdet.data.table import absolute_paths
from fracdet.evaluation.stability import NEAR_LOGITS, VARIANTS, reencode, resaved


@functools.cache
def _quality_of_table() -> dict[tuple[int, ...], int]:
    """libjpeg's luminance table at each quality 1-100, as the encoder Pillow links writes it."""
    tables = {}
    for quality in range(1, 101):
        buffer = io.BytesIO()
        Image.new("L", (8, 8)).save(buffer, format="JPEG", quality=quality)
        with Image.open(buffer) as image:
            tables.setdefault(tuple(image.quantization[0]), quality)
    return tables


def read_export(path: str | Path) -> tuple[int | None, str]:
    """The libjpeg quality a file was saved at (from its luminance table; ``None`` for other files) and its mode."""
    with Image.open(path) as image:
        tables = getattr(image, "quantization", None)
        return (_quality_of_table().get(tuple(tables[0])) if tables else None), image.mode


def export_name(quality: int | None, mode: str) -> str:
    """``"q89 RGB"``; ``"other RGB"`` for a file that is not a JPEG or has a table no quality makes."""
    return f"q{quality} {mode}" if quality else f"other {mode}"


def main() -> None:
    parser = split_parser(__doc__, model_optional=True)
    parser.add_argument("--census", action="store_true", help="only count files and fractured per export")
    parser.add_argument("--near", type=float, default=NEAR_LOGITS, help="logits either side of the threshold")
    parser.add_argument("--min-files", type=int, default=10, help="files an export needs for its quality")
    args = parser.parse_args()
    if args.census:
        table = load_dataset(args.data)
        exports = [export_name(*read_export(p)) for p in absolute_paths(table)]
        census = pd.DataFrame({"export": exports, "label": table["label"]})
        counts = census.groupby("export")["label"].agg(files="size", fractured="sum").sort_values("files")
        report({export: {k: int(v) for k, v in row.items()} for export, row in counts[::-1].iterrows()}, None)
        return
    if args.model is None:
        parser.error("a MODEL is needed unless --census")
    model, rows = model_and_rows(args, needed_for="to score")
    paths = list(absolute_paths(rows))
    read = [read_export(p) for p in paths]
    exports = pd.Series([export_name(*r) for r in read])
    counts = pd.Series([quality for quality, _ in read]).value_counts()
    qualities = sorted(int(q) for q, n in counts.items() if n >= args.min_files)
    saved_at = {f"jpeg{q}": functools.partial(reencode, fmt="JPEG", quality=q) for q in qualities}
    kept, images = resaved(paths, model.preprocess.input_size, {**VARIANTS, **saved_at})
    # The verdict compares the calibrated probability with the threshold: in logits, margin / T >= logit(t).
    z = {name: model.margins(stack).astype(np.float64) / model.temperature for name, stack in images.items()}
    cut = float(logit(model.threshold))
    frame = pd.DataFrame({"export": exports[kept].to_numpy(), "label": rows["label"].to_numpy()[kept],
                          "z": z["original"]})  # fmt: skip
    frame["near"] = (frame["z"] - cut).abs() < args.near
    out = {"model": f"{model.name} {model.version}", "split": args.split, "images": len(frame),
           "threshold": model.threshold, "near_logits": args.near, "qualities": qualities, "exports": {}}  # fmt: skip
    for export, part in [*frame.groupby("export"), ("all", frame)]:
        where = part.index.to_numpy()
        figures = {"files": len(part), "fractured": int(part["label"].sum()), "near_threshold": int(part["near"].sum()),
                   "variants": {}}  # fmt: skip
        for name in VARIANTS:
            before, near = part["z"].to_numpy(), part["near"].to_numpy()
            change = z[name][where] - before
            flipped = (z[name][where] >= cut) != (before >= cut)
            figures["variants"][name] = {
                "mean_change": float(change.mean()),
                "median_abs_change": float(np.median(np.abs(change))),
                "flips": int(flipped.sum()),
                "flips_near_threshold": int((flipped & near).sum()),
            }
        if len(qualities) > 1:
            low, high = f"jpeg{qualities[0]}", f"jpeg{qualities[-1]}"
            figures["quality_effect"] = float((z[high][where] - z[low][where]).mean())
        out["exports"][export] = figures
    report(out, args.out)


if __name__ == "__main__":
    main()
