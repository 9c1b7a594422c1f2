"""One radiograph -> calibrated probability, verdict at the operating threshold, level, heatmap and boxes.

The same :class:`Predictor` serves the batch command (``fracdet predict``) and the web application, so
both give the same answer for the same file. The model decides what it can say (:meth:`TrainedModel.score`):
a localiser brings its own fracture map and scored boxes from its one forward pass; a classifier is
explained by Grad-CAM, whose hottest region gives the single ``box`` it always gave, and has no ``boxes``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.special import expit

from fracdet.data.decode import DEFAULT_MAX_PIXELS, ImageReadError
from fracdet.data.pixels import resize_square
from fracdet.explain import Explainer, draw_boxes, heatmap_box, overlay
from fracdet.inference.gate import InputGate, NotARadiographError, captured_features
from fracdet.inference.readers import read_input_image
from fracdet.models.release import TrainedModel
from fracdet.models.scoring import ScoredBox, level_of, shown_boxes
from fracdet.utils.progress import progress

__all__ = ["Cancelled", "Prediction", "Predictor", "study_summary"]

LABELS = {0: "no fracture", 1: "fracture"}


class Cancelled(Exception):  # noqa: N818 - it is what happened, not an error
    """The caller gave up on this prediction (e.g. its request timed out); it stopped between two stages."""


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("prediction cancelled by its caller")


@dataclass
class Prediction:
    """The verdict on one image.

    Attributes:
        probability: calibrated probability of a fracture.
        label: ``fracture`` when ``probability >= threshold``, else ``no fracture``.
        threshold: the model's operating threshold (chosen on validation).
        heatmap: [0, 1]: a localiser's own fracture map (probability per cell), or a classifier's Grad-CAM
            (normalised per image) at its input size; ``None`` when not asked for.
        heatmap_kind: ``map`` or ``gradcam``.
        box: ``(x0, y0, x1, y1)`` in [0, 1] around the hottest region (the strongest box of a localiser).
        level: the highest confidence level the probability reaches (``definite``, ``suspicious``) or ``None``.
        levels: the probability threshold of each level (chosen on validation).
        boxes: a localiser's suspected fractures that reach a level, strongest first, at most 3.
        pixels: the grey image, resized for display (uint8).
        timings: milliseconds per stage.
        input_check: the input gate's outcome: ``radiograph`` or ``unusual`` (``None``: no gate).
        warning: why the input is unusual (a radiograph unlike the training data), for the reader.
        study: a DICOM input's study, as a keyed hash of its Study Instance UID (never the UID itself);
            ``None`` for other files.
    """

    probability: float
    label: str
    threshold: float
    heatmap: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    level: str | None = None
    levels: dict[str, float] = field(default_factory=dict)
    boxes: list[ScoredBox] = field(default_factory=list)
    heatmap_kind: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    input_check: str | None = None
    warning: str | None = None
    study: str | None = None

    def overlay_png(self, *, opacity: float = 0.4, size: int | None = None) -> bytes:
        """The image with the heatmap blended over it and the boxes drawn by level, as PNG bytes."""
        import io

        if self.pixels is None or self.heatmap is None:
            raise ValueError("this prediction has no heatmap")
        image = self.pixels if size is None else np.asarray(Image.fromarray(self.pixels).resize((size, size)))
        buffer = io.BytesIO()
        Image.fromarray(draw_boxes(overlay(image, self.heatmap, opacity=opacity), self.boxes)).save(buffer, "PNG")
        return buffer.getvalue()


class Predictor:
    """Predict with a trained model, optionally with Grad-CAM heatmaps.

    Args:
        model: from :func:`fracdet.models.load`.
        heatmaps: compute a heatmap with every prediction (one extra backward pass).
        method: ``gradcam`` or ``gradcam++``.
        max_pixels: refuse images larger than this (decompression bombs).
        display_size: side of the stored grey image used for overlays.
        gate: refuse what is not a radiograph and flag unusual radiographs (:mod:`fracdet.inference.gate`).
        force_modality: analyse DICOM objects whose modality is not a projection radiograph (CT, MR, ...).
    """

    def __init__(
        self,
        model: TrainedModel,
        *,
        heatmaps: bool = True,
        method: str = "gradcam",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        display_size: int = 512,
        gate: bool = True,
        force_modality: bool = False,
    ) -> None:
        self.model = model
        self.heatmaps = heatmaps
        self.gate = InputGate.of(model) if gate else None
        self.explainer = Explainer(model, method) if heatmaps and model.task == "classify" else None
        self.max_pixels = max_pixels
        self.display_size = display_size
        self.force_modality = force_modality

    def predict_pixels(
        self, pixels: np.ndarray, *, cancel: threading.Event | None = None, colour_fraction: float = 0.0
    ) -> Prediction:
        """Predict from grey float pixels in [0, 1] of any size.

        Args:
            cancel: when set (by another thread), stop at the next stage with :class:`Cancelled`.
            colour_fraction: of the file before it was made grey (:func:`fracdet.data.decode.colour_fraction`).

        Raises:
            NotARadiographError: the input gate refused the image (no verdict is given).
        """
        started = time.perf_counter()
        if self.gate is not None and (reason := self.gate.simple_checks(pixels, colour_fraction)):
            raise NotARadiographError(reason)
        image = resize_square(pixels, self.model.preprocess.input_size)
        if self.gate is not None and (reason := self.gate.appearance_check(image)):
            raise NotARadiographError(reason)
        prepared = time.perf_counter()
        _check(cancel)
        fitted = self.gate is not None and self.gate.fitted
        with captured_features(self.model) if fitted else nullcontext([]) as features:
            if self.model.task == "localise":
                prediction = self._localise(image, pixels, started, prepared)
            else:
                prediction = self._classify(image, pixels, started, prepared)
        if self.gate is not None:  # the features of the forward that gave the verdict, the image as given
            verdict = self.gate.judge(features[0][:1].numpy() if features else None)
            if verdict.refused:
                raise NotARadiographError(verdict.reason)
            prediction.input_check, prediction.warning = verdict.outcome, verdict.reason
        return prediction

    def _classify(self, image: np.ndarray, pixels: np.ndarray, started: float, prepared: float) -> Prediction:
        """A classifier's verdict, with its Grad-CAM heatmap and the box around its hottest region."""
        if self.explainer is not None:
            explanation = self.explainer(image[None])
            margin, heatmap = float(explanation.margins[0]), explanation.heatmaps[0]
            if self.model.tta:  # the heatmap is of the image as given; the verdict is the model's, mirror included
                mirrored = float(self.model.margins(image[None, :, ::-1].copy(), tta=False)[0])
                margin = (margin + mirrored) / 2
        else:
            margin, heatmap = float(self.model.margins(image[None])[0]), None
        done = time.perf_counter()
        probability = float(expit(margin / self.model.temperature))
        box = heatmap_box(heatmap) if heatmap is not None else None
        return Prediction(
            probability=probability,
            label=LABELS[int(probability >= self.model.threshold)],
            threshold=self.model.threshold,
            heatmap=heatmap,
            box=tuple(float(v) for v in box) if box else None,
            level=level_of(probability, self.model.levels),
            levels=self.model.levels,
            heatmap_kind="gradcam" if heatmap is not None else None,
            pixels=resize_square(pixels, self.display_size) if heatmap is not None else None,
            timings={"preprocess_ms": 1000 * (prepared - started), "model_ms": 1000 * (done - prepared)},
        )

    def _localise(self, image: np.ndarray, pixels: np.ndarray, started: float, prepared: float) -> Prediction:
        """A localiser's verdict, map and boxes, all from its one forward pass (two with mirror TTA)."""
        scores = self.model.score(image[None])
        done = time.perf_counter()
        probability = float(scores.probabilities[0])
        boxes = shown_boxes(scores.boxes[0])
        strongest = scores.boxes[0][0].xyxy if scores.boxes[0] else None
        return Prediction(
            probability=probability,
            label=LABELS[int(probability >= self.model.threshold)],
            threshold=self.model.threshold,
            heatmap=scores.maps[0] if self.heatmaps else None,
            box=strongest,
            level=level_of(probability, self.model.levels),
            levels=self.model.levels,
            boxes=boxes,
            heatmap_kind="map" if self.heatmaps else None,
            pixels=resize_square(pixels, self.display_size) if self.heatmaps else None,
            timings={"preprocess_ms": 1000 * (prepared - started), "model_ms": 1000 * (done - prepared)},
        )

    def predict_bytes(
        self, data: bytes, name: str = "<upload>", *, cancel: threading.Event | None = None
    ) -> Prediction:
        """Predict from file bytes; raises :class:`~fracdet.data.ImageReadError` for unreadable input.

        Args:
            cancel: when set (by another thread), stop at the next stage with :class:`Cancelled`.
        """
        _check(cancel)
        started = time.perf_counter()
        image = read_input_image(data, name, max_pixels=self.max_pixels, force_modality=self.force_modality)
        decoded = time.perf_counter()
        _check(cancel)
        prediction = self.predict_pixels(image.pixels, cancel=cancel, colour_fraction=image.colour_fraction or 0.0)
        prediction.timings = {"decode_ms": 1000 * (decoded - started), **prediction.timings}
        if image.dicom is not None:
            prediction.study = image.dicom.study or None
        return prediction

    def predict_files(
        self,
        paths: list[Path],
        *,
        heatmap_dir: Path | None = None,
        then: Callable[[Path, bytes, Prediction], None] | None = None,
    ) -> pd.DataFrame:
        """One row per file: ``path, probability, label, threshold, heatmap, error, level, boxes, warning, study``
        (errors never raise).

        ``boxes`` is the JSON list of a localiser's shown boxes (``x0, y0, x1, y1, score, level``), ``[]``
        for a classifier. ``study`` is a DICOM file's hashed study (:func:`study_summary` reads studies).
        ``then(path, data, prediction)`` is called after each file read (e.g. to write DICOM results); what it
        raises becomes that file's error, as a read failure would.
        """
        rows: list[dict[str, Any]] = []
        if heatmap_dir is not None:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        for k, path in enumerate(progress(paths, desc="predicting", total=len(paths))):
            row: dict[str, Any] = {"path": str(path), "probability": None, "label": None, "level": None,
                                   "threshold": self.model.threshold, "boxes": None, "heatmap": None,
                                   "error": None, "warning": None, "study": None}  # fmt: skip
            try:
                data = Path(path).read_bytes()
                prediction = self.predict_bytes(data, str(path))
            except (ImageReadError, OSError) as exc:
                row["error"] = str(exc)
                row["study"] = _study_of(data) if isinstance(exc, ImageReadError) else None
                rows.append(row)
                continue
            if then is not None:
                try:
                    then(Path(path), data, prediction)
                except Exception as exc:  # a callback's failure is that file's error, never the batch's end
                    row["error"] = f"{path}: {type(exc).__name__} after the prediction"
            row.update(probability=round(prediction.probability, 6), label=prediction.label, level=prediction.level,
                       boxes=json.dumps([b.to_dict() for b in prediction.boxes]),
                       warning=prediction.warning, study=prediction.study)  # fmt: skip
            if heatmap_dir is not None and prediction.heatmap is not None:
                target = heatmap_dir / f"{k:05d}_{Path(path).stem}.png"
                target.write_bytes(prediction.overlay_png())
                row["heatmap"] = str(target)
            rows.append(row)
        columns = ["path", "probability", "label", "threshold", "heatmap", "error", "level", "boxes",
                   "warning", "study"]  # new ones last  # fmt: skip
        return pd.DataFrame(rows, columns=columns)


def _study_of(data: bytes) -> str | None:
    """The hashed study of a DICOM file that could not be analysed (so its study counts it), else ``None``."""
    from fracdet.data.dicom import is_dicom, read_dicom_info

    if not is_dicom(data):
        return None
    try:
        return read_dicom_info(data).study or None
    except (ImageReadError, ImportError):
        return None


#: Levels from the highest down; a study is read at the highest level any of its images reaches.
_LEVEL_ORDER = ("definite", "suspicious")


def study_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per DICOM study of a :meth:`Predictor.predict_files` table, as clinicians read studies.

    Columns: ``study`` (hashed), ``images``, ``analysed``, ``unreadable``, ``flagged`` (images at or above
    the threshold), ``probability`` (the highest), ``label`` (``fracture`` when any image is flagged), ``level``
    (the highest any image reaches). Files that are not DICOM have no study and are left out.
    """
    columns = ["study", "images", "analysed", "unreadable", "flagged", "probability", "label", "level"]
    rows = []
    for study, group in table[table["study"].notna()].groupby("study", sort=True):
        read = group[group["error"].isna()]
        levels = [lvl for lvl in _LEVEL_ORDER if (read["level"] == lvl).any()]
        flagged = int((read["label"] == LABELS[1]).sum())
        rows.append({"study": study, "images": len(group), "analysed": len(read), "unreadable": len(group) - len(read),
                     "flagged": flagged, "probability": read["probability"].max() if len(read) else None,
                     "label": LABELS[int(flagged > 0)] if len(read) else None,
                     "level": levels[0] if levels else None})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
