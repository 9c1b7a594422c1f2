"""Assemble finished runs into one ensemble model folder, calibrated on their shared validation split.

``fracdet ensemble RUN RUN ... --out DIR`` is a thin wrapper. The folder it writes is a trained-model
folder like a run's (``model.safetensors``, ``model.json``, ``splits.csv``, ``run.json``), so it can be
evaluated, served and released like a single model.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fracdet.models import TrainedModel, combine, save_model
from fracdet.training.checkpoint import write_json
from fracdet.training.recalibrate import fit_on_val
from fracdet.utils.cache import FeatureCache

__all__ = ["build_ensemble"]

log = logging.getLogger(__name__)


def build_ensemble(
    models: Sequence[TrainedModel],
    table: pd.DataFrame,
    out_dir: str | Path,
    *,
    half: bool = False,
    cache: FeatureCache | None = None,
) -> TrainedModel:
    """Combine trained models, fit the ensemble on ``val`` (a localiser's fusion and box edge, then the
    temperature and thresholds), write ``out_dir``.

    Args:
        models: trained on one split manifest (:func:`fracdet.models.load` of run folders or releases).
        table: the dataset with that manifest's ``split`` column; only its ``val`` rows are read.
        half: store the weights as float16 (see :func:`fracdet.models.save_model`).

    Raises:
        ValueError: see :func:`fracdet.models.combine` and :func:`fracdet.training.recalibrate.fit_on_val`.
    """
    ensemble = combine(models, name=Path(out_dir).name)
    pixels = fit_on_val(ensemble, table, cache=cache)
    out = save_model(ensemble, out_dir, half=half)
    if manifest := models[0].splits_path:
        shutil.copy2(manifest, out / "splits.csv")
    write_json(
        out / "run.json",
        {
            "data_root": table.attrs.get("root"),
            "members": ensemble.meta["members"],
            "input_size": ensemble.preprocess.input_size,
            "images": {"val": len(pixels.table)},
            "skipped": pixels.skipped["path"].tolist(),
        },
    )
    ensemble.folder = out
    log.info("ensemble of %d: temperature %.3f, sens90 threshold %.3f", len(models), ensemble.temperature,
             ensemble.threshold)  # fmt: skip
    return ensemble
