"""Fit a finished model's validation choices again, on the validation images it will be judged by.

Training fits a localiser's fusion and box edge, the temperature and the thresholds on the validation
pixels it read. A run trained on a pack (:mod:`fracdet.data.pack`: every image re-encoded smaller to travel
to a GPU) fitted them on the pack's pixels, yet it is evaluated on, and would serve, the original files: the
same images, other pixels, other scores. ``fracdet calibrate RUN --data ORIGINALS --out NEW`` (a thin
wrapper) fits them again on the original validation files and writes a new model folder; the weights are
the same, and the first folder is left as it was.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from fracdet.data.pixels import PixelSet, load_pixels
from fracdet.data.split import leave_out_trained_on
from fracdet.models import TrainedModel, save_model
from fracdet.training.calibrate import calibrate
from fracdet.training.checkpoint import RunExistsError, write_json
from fracdet.utils.cache import FeatureCache

__all__ = ["fit_on_val", "recalibrate"]

#: What a recalibrated folder takes from its source as it was: how it was trained and what it was trained on.
_KEPT = ("splits.csv", "config.yaml", "metrics.csv", "curves.png")


def fit_on_val(model: TrainedModel, table: pd.DataFrame, *, cache: FeatureCache | None = None) -> PixelSet:
    """Fit ``model``'s fusion and box edge (a localiser), temperature and thresholds on the ``val`` rows of
    ``table``, in place; returns the validation pixels it read (unreadable files are listed, never fatal).

    Raises:
        ValueError: ``table`` has no validation rows (but those ``model`` was trained on, which are left out),
            or none of them could be read.
    """
    table = leave_out_trained_on(table, model.splits_path, model=model.name)  # thresholds fitted on new files only
    val = table[table["split"] == "val"]
    if val.empty:
        why = " that the model was not trained on" if table.attrs["left_out_trained_on"].get("val") else ""
        raise ValueError(f"the table has no 'val' rows{why} to calibrate on")
    val.attrs.update(table.attrs)
    pixels = load_pixels(val, model.preprocess.input_size, cache=cache, desc="decoding val")
    if not len(pixels.table):
        raise ValueError(f"none of the {len(val)} validation files could be read")
    boxes = None  # a localiser's box edge is fitted to the expert boxes
    if model.task == "localise" and "boxes" in pixels.table:
        boxes = [b if isinstance(b, list) else [] for b in pixels.table["boxes"]]
    point = model.operating_point if model.thresholds else "sens90"  # a model fitted before keeps its choice
    calibrate(model, pixels.images, pixels.table["label"].to_numpy(int), point=point, boxes=boxes, progress=True)
    return pixels


def recalibrate(
    model: TrainedModel, table: pd.DataFrame, out_dir: str | Path, *, cache: FeatureCache | None = None
) -> TrainedModel:
    """Fit ``model`` again on the ``val`` rows of ``table`` and write it, with the same weights, to ``out_dir``.

    Args:
        model: a trained model folder (:func:`fracdet.models.load`), float weights (a compiled graph is
            refitted by ``fracdet quantize``).
        table: the dataset it will be judged on, with its split manifest's ``split`` column.
        out_dir: a new folder: ``model.json`` and ``model.safetensors`` (stored in the source's precision),
            the source's split manifest, config and curves, and ``run.json`` naming ``table``'s data root
            (so ``fracdet evaluate`` reads those files by default).

    Raises:
        RunExistsError: ``out_dir`` already holds a model (nothing is overwritten).
        ValueError: see :func:`fit_on_val`; or ``model`` has no weights to store.
    """
    out = Path(out_dir)
    if (out / "model.json").exists():
        raise RunExistsError(f"{out} already holds a model: choose another --out")
    if model.module is None:
        raise ValueError(f"{model.name} is a compiled graph: `fracdet quantize` fits it on validation itself")
    pixels = fit_on_val(model, table, cache=cache)
    model.meta.pop("name", None)  # named after its new folder, like any run
    save_model(model, out, half=model.meta.get("weights_dtype") == "float16")
    source = model.folder
    for name in _KEPT if source is not None else ():
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    write_json(
        out / "run.json",
        {
            "data_root": table.attrs.get("root"),
            "recalibrated_from": str(source) if source is not None else model.name,
            "input_size": model.preprocess.input_size,
            "images": {"val": len(pixels.table)},
            "skipped": pixels.skipped["path"].tolist(),
        },
    )
    model.folder, model.name = out, out.name
    return model
