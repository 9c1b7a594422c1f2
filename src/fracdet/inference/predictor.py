"""One radiograph -> calibrated probability, verdict at the operating threshold, level, heatmap and boxes.

The same :class:`Predictor` serves the batch command (``fracdet predict``) and the web application, so
both give the same answer for the same file. The model decides what it can say (:meth:`TrainedModel.score`):
a localiser brings its own fracture map and scored boxes from its one forward pass; a classifier is
explained by Grad-CAM, whose hottest region gives the single ``box`` it always gave, and has no ``boxes``.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pandas as pd
from PIL import Image

from fracdet.data.decode import DEFAULT_MAX_PIXELS, DecodedImage, ImageReadError, read_file
from fracdet.data.embed import embedder_input
from fracdet.data.pixels import resize_display, resize_square
from fracdet.explain import Explainer, draw_boxes, heatmap_box, heatmaps_from_cams, overlay
from fracdet.inference.gate import GateVerdict, InputGate, NotARadiographError
from fracdet.inference.readers import read_input_image
from fracdet.models.graph import GraphOutputs, has_cams
from fracdet.models.release import TrainedModel
from fracdet.models.scoring import MAX_SHOWN_BOXES, ScoredBox, Scores, borderline, level_of, shown_boxes
from fracdet.utils.atomic import atomic_write_bytes
from fracdet.utils.progress import progress
from fracdet.utils.workers import worker_count

__all__ = ["ROW_COLUMNS", "Cancelled", "Prediction", "Predictor", "study_summary"]

#: The columns of :meth:`Predictor.predict_files`'s table (new ones last) and their types, which an archive's
#: Parquet files keep whether a column is empty or not.
ROW_COLUMNS = {"path": "string", "probability": "float64", "label": "string", "threshold": "float64",
               "heatmap": "string", "error": "string", "level": "string", "boxes": "string", "warning": "string",
               "study": "string", "borderline": "boolean"}  # fmt: skip

LABELS = {0: "no fracture", 1: "fracture"}
#: What ``predict_files``' ``reader`` fetches (``http://``, ``https://``, ...); every other entry is a file.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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
            (normalised per image) at its input size; over the whole image (squashed to a square for the
            model), so it stretches back over the radiograph; ``None`` when not asked for.
        heatmap_kind: ``map`` or ``gradcam``.
        box: ``(x0, y0, x1, y1)`` in [0, 1] around the hottest region (the strongest box of a localiser).
        level: the highest confidence level the probability reaches (``definite``, ``suspicious``) or ``None``.
        borderline: the probability lies so near ``threshold`` that the same radiograph re-saved or resized
            may get the other verdict (:func:`fracdet.models.scoring.borderline`).
        levels: the probability threshold of each level (chosen on validation).
        boxes: a localiser's suspected fractures that reach a level, strongest first, at most 3.
        pixels: the grey image for display (uint8), in its own aspect ratio (longest side ``display_size``).
        timings: milliseconds per stage.
        input_check: the input gate's outcome: ``radiograph`` or ``unusual`` (``None``: no gate).
        warning: why the input is unusual (a radiograph unlike the training data), for the reader.
        study: a DICOM input's study, as a keyed hash of its Study Instance UID (never the UID itself);
            ``None`` for other files.
        image_size: ``(width, height)`` of the image analysed, in pixels (after any EXIF rotation).
        source_format: the file's format (``PNG``, ``JPEG``, ``DICOM``, ...; ``None`` for pixels given).
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
    image_size: tuple[int, int] | None = None
    source_format: str | None = None
    borderline: bool = False

    def overlay_png(self, *, opacity: float = 0.4) -> bytes:
        """The image with the heatmap blended over it and the boxes drawn by level, as PNG bytes."""
        import io

        if self.pixels is None or self.heatmap is None:
            raise ValueError("this prediction has no heatmap")
        buffer = io.BytesIO()
        Image.fromarray(draw_boxes(overlay(self.pixels, self.heatmap, opacity=opacity), self.boxes)).save(buffer, "PNG")
        return buffer.getvalue()


class Predictor:
    """Predict with a trained model: verdict, level, heatmap or map, boxes, after the input gate.

    Every image takes one pass through the model's :class:`~fracdet.models.graph.ScoringGraph` on the chosen
    back end (ONNX Runtime by default, PyTorch otherwise), which gives the margin, a localiser's map or a
    classifier's Grad-CAM, the gate's features and its appearance embedding at once. A predictor holds no
    state between calls: several threads may predict with one at once.

    Args:
        model: from :func:`fracdet.models.load`.
        heatmaps: keep the heatmap (a classifier's Grad-CAM, a localiser's map) and the display pixels.
        method: ``gradcam`` (from the forward pass) or ``gradcam++`` (a backward pass in PyTorch, one
            prediction at a time).
        max_pixels: refuse images larger than this (decompression bombs).
        display_size: longest side of the stored grey image used for overlays (its aspect ratio kept).
        gate: refuse what is not a radiograph and flag unusual radiographs (:mod:`fracdet.inference.gate`).
        force_modality: analyse DICOM objects whose modality is not a projection radiograph (CT, MR, ...).
        backend: ``auto`` (ONNX Runtime when installed), ``onnxruntime`` or ``pytorch``.
        threads: ONNX Runtime's intra-op threads per prediction (``None``: all cores).
        spin: when ONNX Runtime's workers spin between operators (:class:`~fracdet.models.compiled.OnnxRuntime`):
            ``alone`` (a prediction while no other is running: the fastest answer to one radiograph) or
            ``never`` (a server, whose own threads need the cores, or any caller predicting from several
            threads at once: see :func:`fracdet.serve.create_app`).
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
        backend: str = "auto",
        threads: int | None = None,
        spin: Literal["alone", "never"] = "alone",
    ) -> None:
        from fracdet.inference.onnx import runtime_for

        self.model = model
        self.heatmaps = heatmaps
        self.gate = InputGate.of(model) if gate else None
        library_cam = model.task == "classify" and (method != "gradcam" or not has_cams(model))
        self.explainer = Explainer(model, method) if heatmaps and library_cam else None
        self._explainer_lock = threading.Lock()  # the library's hooks serve one call at a time
        # A compiled model's graph holds the embedder already; others export (or run) it with the model.
        appearance = self.gate is not None and self.gate.checks_appearance and model.graph is None
        embedder = self.gate.embedder().network if appearance else None
        self.runtime = runtime_for(model, backend, embedder=embedder, threads=threads, spin=spin)
        self.max_pixels = max_pixels
        self.display_size = display_size
        self.force_modality = force_modality

    @property
    def backend(self) -> str:
        """Which back end scores images: ``onnxruntime`` or ``pytorch``."""
        return self.runtime.name

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
        (result,) = self.predict_batch([pixels], colour_fractions=[colour_fraction], cancel=cancel)
        if isinstance(result, Exception):
            raise result
        return result

    def predict_batch(
        self,
        images: list[np.ndarray],
        *,
        colour_fractions: list[float] | None = None,
        cancel: threading.Event | None = None,
    ) -> list[Prediction | NotARadiographError]:
        """Predict from several grey float images in [0, 1] (any sizes) with one forward pass.

        Each image gets a :class:`Prediction` or, when the input gate refuses it, the
        :class:`NotARadiographError` that says why (in order); one refused image never costs the others theirs.
        """
        started = time.perf_counter()
        fractions = colour_fractions or [0.0] * len(images)
        results: list[Prediction | NotARadiographError | None] = [None] * len(images)
        size = self.model.preprocess.input_size
        kept, squares = [], []
        for k, (pixels, fraction) in enumerate(zip(images, fractions, strict=True)):
            if self.gate is not None and (reason := self.gate.simple_checks(pixels, fraction)):
                results[k] = NotARadiographError(reason)
            else:
                kept.append(k)
                squares.append(resize_square(pixels, size))
        if not kept:
            return results  # type: ignore[return-value]
        batch = np.stack(squares)
        appearance = embedder_input(squares) if self.runtime.appearance else None
        prepared = time.perf_counter()
        _check(cancel)
        outputs = self.runtime(batch, appearance)
        done = time.perf_counter()
        _check(cancel)
        # Boxes come strongest first and their levels fall with their scores, so the boxes a reader is shown
        # (shown_boxes) are always among the first MAX_SHOWN_BOXES: no more are grown from the map.
        scores = self.model.scores_of(outputs.margins, outputs.dense, max_boxes=MAX_SHOWN_BOXES)
        share = 1000 / len(kept)  # a batch's times, per image
        for row, k in enumerate(kept):
            began = time.perf_counter()
            verdict = self._judge(outputs, row)
            if isinstance(verdict, NotARadiographError):
                results[k] = verdict
                continue
            probability = float(scores.probabilities[row])
            heatmap, box, boxes, kind = self._where(squares[row], outputs, scores, row)
            results[k] = Prediction(
                probability=probability,
                label=LABELS[int(probability >= self.model.threshold)],
                threshold=self.model.threshold,
                heatmap=heatmap,
                box=box,
                level=level_of(probability, self.model.levels),
                levels=self.model.levels,
                borderline=bool(borderline(probability, self.model.threshold)),
                boxes=boxes,
                heatmap_kind=kind,
                pixels=resize_display(images[k], self.display_size) if heatmap is not None else None,
                timings={
                    "preprocess_ms": share * (prepared - started),
                    "model_ms": share * (done - prepared),
                    "explain_ms": 1000 * (time.perf_counter() - began),
                },
                input_check=verdict.outcome if self.gate is not None else None,
                warning=verdict.reason,
                image_size=(int(images[k].shape[1]), int(images[k].shape[0])),
            )
        return results  # type: ignore[return-value]

    def _judge(self, outputs: GraphOutputs, row: int) -> GateVerdict | NotARadiographError:
        """The gate's verdict on one image of a batch, from its embedding and features (no gate: a radiograph)."""
        if self.gate is None:
            return GateVerdict("radiograph")
        embedding = outputs.embedding[row] if outputs.embedding is not None else None
        if reason := self.gate.appearance_check(embedding):
            return NotARadiographError(reason)
        verdict = self.gate.judge(outputs.features[row : row + 1] if self.gate.fitted else None)
        return NotARadiographError(verdict.reason) if verdict.refused else verdict

    def _where(
        self, image: np.ndarray, outputs: GraphOutputs, scores: Scores, row: int
    ) -> tuple[np.ndarray | None, tuple[float, float, float, float] | None, list[ScoredBox], str | None]:
        """Heatmap, box, shown boxes and heatmap kind of one image of a batch: a localiser's own map and
        boxes, else Grad-CAM."""
        if scores.boxes is not None:  # a localiser: its map and boxes, from the same forward
            strongest = scores.boxes[row][0].xyxy if scores.boxes[row] else None
            heatmap = scores.maps[row] if self.heatmaps else None
            return heatmap, strongest, shown_boxes(scores.boxes[row]), "map" if self.heatmaps else None
        if not self.heatmaps:
            return None, None, [], None
        if self.explainer is not None:
            with self._explainer_lock:
                heatmap = self.explainer(image[None]).heatmaps[0]
        elif outputs.cams is not None:
            heatmap = heatmaps_from_cams(outputs.cams[row : row + 1], self.model.preprocess.input_size)[0]
        else:
            return None, None, [], None
        box = heatmap_box(heatmap)
        return heatmap, tuple(float(v) for v in box) if box else None, [], "gradcam"

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
        prediction.source_format, prediction.study = image.format, _study(image)
        return prediction

    def predict_files(
        self,
        paths: list[Path] | list[str],
        *,
        heatmap_dir: Path | None = None,
        then: Callable[[Path, bytes, Prediction], None] | None = None,
        batch_size: int = 16,
        decoders: int | None = None,
        scorers: int = 1,
        reader: Callable[[str], bytes] | None = None,
    ) -> pd.DataFrame:
        """One row per file: ``path, probability, label, threshold, heatmap, error, level, boxes, warning, study,
        borderline`` (:data:`ROW_COLUMNS`; errors never raise).

        Files are decoded ahead in a pool of ``decoders`` threads (default: one per core; the decoders release
        the GIL) and scored ``batch_size`` at a time, ``scorers`` batches at once (the back end is thread-safe;
        with several, give the predictor fewer ``threads`` each); the rows are the same as one file at a time,
        in order.
        ``boxes`` is the JSON list of a localiser's shown boxes (``x0, y0, x1, y1, score, level``), ``[]``
        for a classifier. ``study`` is a DICOM file's hashed study (:func:`study_summary` reads studies).
        ``then(path, data, prediction)`` is called after each file read (e.g. to write DICOM results); what it
        raises becomes that file's error, as a read failure would. ``reader(path) -> bytes`` fetches what is
        a URL (``scheme://...``, e.g. a DICOMweb instance), every other entry being read as a file, so one
        list may mix both; an ``OSError`` it raises is that entry's error.
        """
        from concurrent.futures import ThreadPoolExecutor

        if batch_size < 1 or scorers < 1 or (decoders is not None and decoders < 1):  # 0 scored nothing, silently
            raise ValueError(f"batch_size, scorers and decoders must be 1 or more, not {batch_size}, {scorers}, "
                             f"{decoders}")  # fmt: skip
        if heatmap_dir is not None:
            heatmap_dir.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        workers = decoders or worker_count()

        def score(chunk: list[tuple[int, tuple[Path, _Read]]]) -> dict[int, Prediction | Exception]:
            readable = [(k, read.image) for k, (_, read) in chunk if read.image is not None]
            fractions = [image.colour_fraction or 0.0 for _, image in readable]
            results = self.predict_batch([image.pixels for _, image in readable], colour_fractions=fractions)
            return dict(zip((k for k, _ in readable), results, strict=True))

        with (
            ThreadPoolExecutor(workers, thread_name_prefix="fracdet-decode") as pool,
            ThreadPoolExecutor(scorers, thread_name_prefix="fracdet-score") as scoring,
        ):
            read = functools.partial(self._read, reader=reader)
            # Enough decoded for the batches being scored and the next, and no more: memory stays bounded.
            decoded = _ahead(pool, read, paths, ahead=batch_size * scorers + 2 * workers)
            bar = progress(decoded, desc="predicting", total=len(paths))
            # Chunks are scored ``scorers`` at a time, their rows made in order on this thread.
            for chunk, predictions in _ahead(scoring, score, _chunks(enumerate(bar), batch_size), ahead=scorers):
                rows.extend(self._row(k, path, read, predictions.get(k), heatmap_dir, then)
                            for k, (path, read) in chunk)  # fmt: skip
        return pd.DataFrame(rows, columns=list(ROW_COLUMNS))

    def _read(self, path: Path | str, reader: Callable[[str], bytes] | None = None) -> _Read:
        """A file's bytes and decoded image, or the error that stops it (kept: it is that file's row)."""
        data = b""
        try:
            data = reader(str(path)) if reader is not None and _URL.match(str(path)) else read_file(path)
            image = read_input_image(data, str(path), max_pixels=self.max_pixels, force_modality=self.force_modality)
        except ImageReadError as exc:
            return _Read(data, error=exc, study=_study_of(data))
        except OSError as exc:
            return _Read(data, error=exc)
        return _Read(data, image, study=_study(image))

    def _row(
        self,
        k: int,
        path: Path,
        read: _Read,
        prediction: Prediction | Exception | None,
        heatmap_dir: Path | None,
        then: Callable[[Path, bytes, Prediction], None] | None,
    ) -> dict[str, Any]:
        """One file's row of :meth:`predict_files` (``prediction`` is ``None`` when the file was not read)."""
        row: dict[str, Any] = {"path": str(path), "probability": None, "label": None, "level": None,
                               "threshold": self.model.threshold, "boxes": None, "heatmap": None,
                               "error": None, "warning": None, "study": read.study, "borderline": None}  # fmt: skip
        if read.error is not None or isinstance(prediction, Exception) or prediction is None:
            row["error"] = str(read.error if read.error is not None else prediction)
            return row
        prediction.source_format, prediction.study = read.image.format, read.study
        if then is not None:
            try:
                then(Path(path), read.data, prediction)
            except Exception as exc:  # a callback's failure is that file's error, never the batch's end
                row["error"] = f"{path}: {type(exc).__name__} after the prediction"
        row.update(probability=round(prediction.probability, 6), label=prediction.label, level=prediction.level,
                   boxes=json.dumps([b.to_dict() for b in prediction.boxes]), warning=prediction.warning,
                   borderline=prediction.borderline)  # fmt: skip
        if heatmap_dir is not None and prediction.heatmap is not None:
            target = heatmap_dir / f"{k:05d}_{Path(path).stem}.png"
            atomic_write_bytes(target, prediction.overlay_png())
            row["heatmap"] = str(target)
        return row


@dataclass
class _Read:
    """One file of a folder, read ahead: its bytes and decoded image, or the error that stops it."""

    data: bytes
    image: DecodedImage | None = None
    error: Exception | None = None
    study: str | None = None


T = TypeVar("T")


def _ahead(pool: Any, fn: Callable[[T], Any], items: Iterable[T], *, ahead: int) -> Iterator[tuple[T, Any]]:
    """``(item, fn(item))`` in order, with at most ``ahead`` calls submitted to ``pool`` before they are taken:
    decoding runs ahead of scoring while memory stays bounded (a whole folder decoded at once would not)."""
    pending: deque[tuple[T, Any]] = deque()
    remaining = iter(items)
    for item in itertools.islice(remaining, ahead):
        pending.append((item, pool.submit(fn, item)))
    while pending:
        item, future = pending.popleft()
        if (following := next(remaining, None)) is not None:
            pending.append((following, pool.submit(fn, following)))
        yield item, future.result()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _study(image: DecodedImage) -> str | None:
    """A decoded DICOM image's hashed study; ``None`` for other formats and for a DICOM file without one."""
    return (image.dicom.study or None) if image.dicom is not None else None


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
    (the highest any image reaches), ``borderline`` (the study's verdict is: the image that decides it, the one
    scoring highest, is borderline, so a re-saved copy of it may turn the study's verdict; another image can
    be borderline without it). Files that are not DICOM have no study and are left out.
    """
    columns = ["study", "images", "analysed", "unreadable", "flagged", "probability", "label", "level", "borderline"]
    rows = []
    for study, group in table[table["study"].notna()].groupby("study", sort=True):
        read = group[group["error"].isna()]
        levels = [lvl for lvl in _LEVEL_ORDER if (read["level"] == lvl).any()]
        flagged = int((read["label"] == LABELS[1]).sum())
        deciding = read.iloc[int(np.argmax(read["probability"].to_numpy()))] if len(read) else None
        rows.append({"study": study, "images": len(group), "analysed": len(read), "unreadable": len(group) - len(read),
                     "flagged": flagged, "probability": None if deciding is None else deciding["probability"],
                     "label": LABELS[int(flagged > 0)] if len(read) else None,
                     "level": levels[0] if levels else None,
                     "borderline": None if deciding is None else bool(deciding["borderline"])})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
