"""The web application: upload a radiograph, get the verdict, a confidence in plain words and a heatmap.

``create_app(model)`` builds a FastAPI app around one :class:`~fracdet.inference.Predictor`:

* ``GET /``: a single self-contained page (no CDN: hospital networks are often offline) that works on a
  375-px phone screen: file picker or drag-and-drop, overlay toggle and opacity.
* ``POST /api/v1/predict``: multipart upload ``file`` -> probability, label, threshold, confidence
  ``level`` and the ``levels`` thresholds, heatmap (PNG), box, a localiser's scored ``boxes``
  (``x0, y0, x1, y1`` normalised to the original image, ``score``, ``level``), model name and version,
  latency. Fields are only ever added under ``/api/v1``.
* ``GET /api/v1/health``, ``GET /api/v1/model``; OpenAPI at ``/docs``.

Hardening: an upload limit checked before and while reading, the decoder's decompression-bomb guard, a
timeout per request, and one inference at a time (the model and its Grad-CAM hooks are not thread-safe,
and it keeps memory bounded under load). Every bad input gets a 4xx JSON ``detail`` naming the problem.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image

from fracdet.data.decode import ImageReadError, ImageTooLargeError, TruncatedImageError, UnsupportedImageError
from fracdet.inference import Prediction, Predictor
from fracdet.models.release import TrainedModel

__all__ = ["ServeConfig", "create_app"]


@dataclass(frozen=True)
class ServeConfig:
    """Limits of the web application.

    Attributes:
        max_upload_mb: largest accepted upload (HTTP 413 above it).
        max_pixels: largest accepted image (decompression-bomb guard, HTTP 413).
        timeout_s: longest a prediction may take (HTTP 504 after it).
        heatmaps: compute Grad-CAM heatmaps.
    """

    max_upload_mb: float = 50.0
    max_pixels: int = 100_000_000
    timeout_s: float = 30.0
    heatmaps: bool = True

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


def heatmap_rgba(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A colour-mapped heatmap whose alpha follows the heat, ready to lay over the radiograph."""
    import cv2

    heat = cv2.resize(heatmap.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    heat = np.clip(heat, 0, 1)
    rgb = cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)[..., ::-1]
    alpha = np.uint8(255 * np.clip(heat * 1.5, 0, 1))
    return np.dstack([rgb, alpha])


def plain_words(probability: float, threshold: float, level: str | None = None, levels: dict | None = None) -> str:
    """The verdict as a sentence a clinician reads at a glance."""
    pct = f"{100 * probability:.0f}%"
    if level == "definite" and levels and "definite" in levels:
        flag = f"{100 * levels['definite']:.0f}%"
        return f"Fracture likely (definite level): estimated probability {pct} (the definite level starts at {flag})."
    if probability >= threshold:
        flag = f"{100 * threshold:.0f}%"
        return f"Fracture suspected: estimated probability {pct} (the model flags images at {flag} or more)."
    return f"No fracture detected: estimated probability of a fracture {pct} (below the {100 * threshold:.0f}% flag)."


def _response(prediction: Prediction, model: TrainedModel, latency_ms: float) -> dict[str, Any]:
    out: dict[str, Any] = {
        "probability": prediction.probability,
        "label": prediction.label,
        "threshold": prediction.threshold,
        "operating_point": model.operating_point,
        "summary": plain_words(prediction.probability, prediction.threshold, prediction.level, prediction.levels),
        "level": prediction.level,
        "levels": prediction.levels,
        "box": prediction.box,
        "boxes": [b.to_dict() for b in prediction.boxes],
        "heatmap_kind": prediction.heatmap_kind,
        "model": {"name": model.name, "version": model.version, "arch": model.arch},
        "latency_ms": round(latency_ms, 1),
        "timings_ms": {k.removesuffix("_ms"): round(v, 1) for k, v in prediction.timings.items()},
        "image_png": None,
        "heatmap_png": None,
    }
    if prediction.pixels is not None and prediction.heatmap is not None:
        size = prediction.pixels.shape[0]
        out["image_png"] = _png_base64(prediction.pixels)
        out["heatmap_png"] = _png_base64(heatmap_rgba(prediction.heatmap, size))
    return out


def _status_for(exc: ImageReadError) -> int:
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, UnsupportedImageError):
        return 415
    if isinstance(exc, TruncatedImageError):
        return 422
    return 400


UPLOAD = File(..., description="a radiograph: PNG, JPEG, BMP, TIFF or GIF")


def create_app(model: TrainedModel, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``model``."""
    config = config or ServeConfig()
    predictor = Predictor(model, heatmaps=config.heatmaps, max_pixels=config.max_pixels)
    lock = threading.Lock()
    page = resources.files("fracdet.serve").joinpath("page.html").read_text(encoding="utf-8")
    app = FastAPI(
        title="fracdet",
        version=model.version,
        description="Bone-fracture detection on radiographs: calibrated probability, verdict, confidence level, "
        "heatmap and (a localiser's) fracture boxes.",
    )

    @app.middleware("http")
    async def limit_upload_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > config.max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload too large: limit is {config.max_upload_mb:g} MB"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": model.name, "version": model.version}

    @app.get("/api/v1/model")
    def model_info() -> dict[str, Any]:
        keep = ("name", "version", "model", "members", "input_size", "epoch", "selected_on", "temperature",
                "thresholds", "schema_version")  # fmt: skip
        return {
            **{k: model.meta[k] for k in keep if k in model.meta},
            "arch": model.arch,
            "task": model.task,
            "levels": model.levels,
            "threshold": model.threshold,
            "operating_point": model.operating_point,
            "tta": model.tta,
            "limits": {
                "max_upload_mb": config.max_upload_mb,
                "max_pixels": config.max_pixels,
                "timeout_s": config.timeout_s,
            },
        }

    @app.post("/api/v1/predict")
    async def predict(file: UploadFile = UPLOAD):
        started = time.perf_counter()
        data = await file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"upload too large: limit is {config.max_upload_mb:g} MB")
        if not data:
            raise HTTPException(400, "empty upload: no bytes received")
        name = file.filename or "upload"

        def run() -> Prediction:
            with lock:
                return predictor.predict_bytes(data, name)

        try:
            prediction = await asyncio.wait_for(run_in_threadpool(run), timeout=config.timeout_s)
        except ImageReadError as exc:
            raise HTTPException(_status_for(exc), str(exc)) from None
        except TimeoutError:
            raise HTTPException(504, f"prediction took longer than {config.timeout_s:g} s") from None
        return _response(prediction, model, 1000 * (time.perf_counter() - started))

    return app
