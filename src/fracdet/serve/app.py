"""The web application: upload a radiograph, get the verdict, a confidence in plain words and a heatmap.

``create_app(model)`` builds a FastAPI app around one :class:`~fracdet.inference.Predictor`:

* ``GET /``: a single self-contained page (no CDN: hospital networks are often offline) that works on a
  375-px phone screen: file picker or drag-and-drop, overlay toggle and opacity.
* ``POST /api/v1/predict``: multipart upload ``file`` -> probability, label, threshold, confidence
  ``level`` and the ``levels`` thresholds, heatmap (a small RGBA PNG in the radiograph's aspect ratio), box,
  a localiser's scored ``boxes`` (``x0, y0, x1, y1`` normalised to the original image, ``score``,
  ``level``), ``image_size``, model name and version, back end, latency. The radiograph is not sent back
  (the client has it) unless its format is one a browser cannot show (DICOM, TIFF) or ``?image=true``.
  Fields are only ever added under ``/api/v1``.
* ``GET /api/v1/health`` (answered on the event loop: it never waits for inference), ``GET /api/v1/model``;
  OpenAPI at ``/docs`` (Swagger UI served from the ``swagger-ui-bundle`` package, not a CDN).

Hardening (:mod:`fracdet.serve.guard`, :mod:`fracdet.serve.executor`): the upload limit holds while the
body streams in (chunked uploads included) and stalled uploads are closed; the decoder's pixel limit
refuses decompression bombs; inference runs on a bounded executor (one worker per core sharing one
thread-safe back end, so memory stays bounded by the pixel limit times the workers) behind a queue of
``queue_size`` waiting requests, 503 with ``Retry-After`` beyond it; a request that times out (504) or whose
client leaves cancels its work, which stops at the next stage and holds nothing. Every bad input gets a
4xx JSON ``detail`` naming the problem; every response carries security headers.
"""

from __future__ import annotations

import base64
import hmac
import io
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image

from fracdet.data.decode import ImageReadError, ImageTooLargeError, TruncatedImageError, UnsupportedImageError
from fracdet.inference import Cancelled, NotARadiographError, Prediction, Predictor
from fracdet.models.release import TrainedModel
from fracdet.serve.executor import InferenceExecutor, ServerBusyError
from fracdet.serve.guard import HEADER_TIMEOUT_S, SecurityHeaders, UploadGuard
from fracdet.utils.workers import worker_count as cores_available

__all__ = ["ServeConfig", "create_app"]


#: Workers (and ONNX Runtime threads) per core the process may use, at most: CPU-bound predictions beyond
#: it only wait on each other, and each worker may hold an image at the pixel limit.
PER_CORE = 4
#: The shortest access token accepted: a bearer token guarding uploads of patient data must not be guessable.
MIN_TOKEN_LENGTH = 16


@dataclass(frozen=True)
class ServeConfig:
    """Limits of the web application.

    Attributes:
        max_upload_mb: largest accepted upload (HTTP 413 above it).
        max_pixels: largest accepted image (decompression-bomb guard, HTTP 413).
        timeout_s: longest a prediction may take, waiting included (HTTP 504 after it).
        heatmaps: compute Grad-CAM heatmaps.
        queue_size: requests that may wait for inference (HTTP 503 with ``Retry-After`` beyond them).
        upload_idle_s: longest an upload may pause between two chunks (HTTP 408 after it); after it, the
            upload must also keep to ``fracdet.serve.guard.MIN_UPLOAD_RATE`` on average.
        header_timeout_s: longest a request's line and headers may take to arrive (HTTP 408 after it, or the
            connection closed if nothing came); kept by :func:`fracdet.serve.server.uvicorn_config`.
        workers: predictions run at once (``None``: one per CPU core the process may use). The back end
            is thread-safe, so they share one model; memory stays bounded by the pixel limit times this.
        backend: ``auto`` (ONNX Runtime when installed, else PyTorch), ``onnxruntime`` or ``pytorch``.
        threads: ONNX Runtime's intra-op threads per prediction (``None``: every core). Every core answers a
            lone request fastest; under load every worker predicts at once and they share the cores, so one
            thread each gives a little more throughput for a slower lone answer (on 2 cores: 4-6% more
            images/s with 32-64 clients, a median of 35 against 27 ms at 30 requests/s;
            ``docs/BENCHMARKS.md``). An emergency room asks for the first.
        access_token: when set, ``POST /api/v1/predict`` (uploads carry patient data) needs
            ``Authorization: Bearer <token>`` (HTTP 401 without it); health and model information stay open.
            Serve behind a TLS-terminating reverse proxy: a token sent in clear text protects nothing.
    """

    max_upload_mb: float = 50.0
    max_pixels: int = 100_000_000
    timeout_s: float = 30.0
    heatmaps: bool = True
    queue_size: int = 64
    upload_idle_s: float = 10.0
    header_timeout_s: float = HEADER_TIMEOUT_S
    workers: int | None = None
    backend: str = "auto"
    threads: int | None = None
    access_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        """Refuse a limit that would serve nothing (a negative upload limit refuses every upload, a queue of
        none every request) when the server starts, not at its first request."""
        limits = {"max_upload_mb": self.max_upload_mb, "max_pixels": self.max_pixels, "timeout_s": self.timeout_s,
                  "queue_size": self.queue_size, "upload_idle_s": self.upload_idle_s,
                  "header_timeout_s": self.header_timeout_s, "workers": self.workers,
                  "threads": self.threads}  # fmt: skip
        wrong = [f"{name} {value}" for name, value in limits.items() if value is not None and not value > 0]
        if wrong:  # `not > 0` so that NaN is refused too
            raise ValueError(f"the server's limits must be positive: {', '.join(wrong)}")
        most = PER_CORE * cores_available()
        beyond = [f"{name} {value}" for name, value in (("workers", self.workers), ("threads", self.threads))
                  if value is not None and value > most]  # fmt: skip
        if beyond:  # 100,000 workers started threads until the system refused one, then hung
            raise ValueError(
                f"at most {PER_CORE} per core the process may use ({most} here), not "
                f"{', '.join(beyond)}: more only wait on each other and each holds an image's memory"
            )
        if self.access_token is not None and len(self.access_token) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"the access token must be at least {MIN_TOKEN_LENGTH} characters (it guards patient "
                "data): make one with python -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def worker_count(self) -> int:
        return self.workers or cores_available()


def _png_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=False, compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode()


#: Formats every browser shows from the user's own file: the page lays the answer over it, and the server
#: sends no copy back. For others (DICOM, TIFF) the response carries the image as PNG (``image_png``).
BROWSER_FORMATS = frozenset({"PNG", "JPEG", "GIF", "WEBP", "BMP"})
#: Longest side of the heatmap the API sends, and the least its shorter side gets (the longest then grows, up
#: to :data:`HEATMAP_MAX_SIDE`): the finest map a model makes has 32 x 32 cells (a localiser's, stride 8 at
#: 256 px; a CAM has 10 x 10), so the browser's smooth scaling over the radiograph loses nothing of it. At
#: 64 px it is a third of the PNG-encoding time of 128 px and a few KiB.
HEATMAP_SIDE = 64
HEATMAP_MIN_SIDE = 32
HEATMAP_MAX_SIDE = 256


def heatmap_rgba(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A colour-mapped heatmap of ``size`` ``(width, height)`` whose alpha follows the heat, ready to lay over
    the radiograph."""
    import cv2

    width, height = size
    heat = cv2.resize(heatmap.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
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


def _heatmap_size(image_size: tuple[int, int] | None) -> tuple[int, int]:
    """The heatmap's ``(width, height)``: the radiograph's aspect ratio, longest side :data:`HEATMAP_SIDE`, the
    shorter at least :data:`HEATMAP_MIN_SIDE` while the longer stays within :data:`HEATMAP_MAX_SIDE`."""
    width, height = image_size or (HEATMAP_SIDE, HEATMAP_SIDE)
    scale = max(HEATMAP_SIDE / max(width, height), HEATMAP_MIN_SIDE / min(width, height))
    scale = min(scale, HEATMAP_MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _response(
    prediction: Prediction, model: TrainedModel, latency_ms: float, *, image: bool, backend: str
) -> dict[str, Any]:
    """The JSON answer. It carries what the client lacks: the heatmap (small, in the radiograph's aspect
    ratio) and the boxes; the radiograph itself only when ``image`` (a format the browser cannot show)."""
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
        "input_check": prediction.input_check,
        "warning": prediction.warning,
        "borderline": prediction.borderline,
        "model": {"name": model.name, "version": model.version, "arch": model.arch},
        "latency_ms": round(latency_ms, 1),
        "timings_ms": {k.removesuffix("_ms"): round(v, 1) for k, v in prediction.timings.items()},
        "backend": backend,
        "image_size": None,
        "image_png": None,
        "heatmap_png": None,
    }
    if prediction.image_size is not None:
        out["image_size"] = {"width": prediction.image_size[0], "height": prediction.image_size[1]}
    if prediction.heatmap is not None:
        out["heatmap_png"] = _png_base64(heatmap_rgba(prediction.heatmap, _heatmap_size(prediction.image_size)))
    if image and prediction.pixels is not None:
        out["image_png"] = _png_base64(prediction.pixels)
    return out


def _status_for(exc: ImageReadError) -> int:
    if isinstance(exc, NotARadiographError):
        return 422
    if isinstance(exc, ImageTooLargeError):
        return 413
    if isinstance(exc, UnsupportedImageError):
        return 415
    if isinstance(exc, TruncatedImageError):
        return 422
    return 400


UPLOAD = File(..., description="a radiograph: DICOM, PNG, JPEG, BMP, TIFF, GIF or WebP")
IMAGE = Query(False, description="also send the analysed image as PNG (``image_png``); sent anyway for formats a "
                                 "browser cannot show (DICOM, TIFF)")  # fmt: skip


def create_app(model: TrainedModel, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI application serving ``model``; its inference threads end with the app's lifespan."""
    config = config or ServeConfig()
    # ONNX Runtime's workers never spin here: a lone prediction's spinning workers took the cores of the
    # server's own threads (uploads read, answers written), and at 30 requests/s the p95 rose to 34-35 ms from
    # 24-26 ms (docs/BENCHMARKS.md); in one process, one radiograph at a time, spinning takes 0.83 of the time.
    predictor = Predictor(model, heatmaps=config.heatmaps, max_pixels=config.max_pixels, backend=config.backend,
                          threads=config.threads, spin="never")  # fmt: skip
    page = resources.files("fracdet.serve").joinpath("page.html").read_text(encoding="utf-8")

    def executor() -> InferenceExecutor:
        """The app's inference executor: started with its lifespan (or at first use without one)."""
        if app.state.executor is None:
            app.state.executor = InferenceExecutor(workers=config.worker_count, queue_size=config.queue_size)
        return app.state.executor

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        executor()
        try:
            yield
        finally:  # the threads end with the app; a restarted app (tests do that) starts new ones
            if app.state.executor is not None:
                app.state.executor.close()
                app.state.executor = None

    app = FastAPI(
        title="fracdet",
        version=model.version,
        description="Bone-fracture detection on radiographs: calibrated probability, verdict, confidence level, "
        "heatmap and (a localiser's) fracture boxes.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.executor = None
    app.state.config = config  # what fracdet.serve.server puts on the socket reads its deadline here

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422 without the values that were sent (its default quotes them back): a form field can
        hold what a patient's file held, and replies end up in proxies' and clients' logs."""
        errors = [{k: v for k, v in error.items() if k not in ("input", "ctx")} for error in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})

    # the multipart envelope around the file takes a few hundred bytes; 64 KiB of slack is generous
    app.add_middleware(UploadGuard, max_bytes=config.max_upload_bytes + 64 * 1024,
                       idle_timeout_s=config.upload_idle_s, limit_text=f"{config.max_upload_mb:g} MB")  # fmt: skip
    app.add_middleware(SecurityHeaders)
    _mount_docs(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/api/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model.name, "version": model.version, "backend": predictor.backend,
                "inference": executor().stats()}  # fmt: skip

    @app.get("/api/v1/model")
    async def model_info() -> dict[str, Any]:
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
            "backend": predictor.backend,
            "precision": model.precision,  # int8 for a compiled, quantised model (fracdet quantize)
            "workers": config.worker_count,
            "threads_per_worker": config.threads,  # null: ONNX Runtime's default, every core
            "limits": {
                "max_upload_mb": config.max_upload_mb,
                "max_pixels": config.max_pixels,
                "timeout_s": config.timeout_s,
                "queue_size": config.queue_size,
            },
        }

    @app.post("/api/v1/predict")
    async def predict(request: Request, file: UploadFile = UPLOAD, image: bool = IMAGE):
        started = time.perf_counter()
        _authorise(request, config.access_token)
        parts = len((await request.form()).getlist("file"))  # parsed once already: this reads no more
        if parts > 1:
            raise HTTPException(422, f"one radiograph per request: the upload has {parts} 'file' parts")
        name = file.filename or "upload"

        def run(cancel: threading.Event) -> dict[str, Any]:
            # Read in the worker, not while waiting: a queued request holds only its spooled upload.
            file.file.seek(0)
            data = file.file.read(config.max_upload_bytes + 1)
            if len(data) > config.max_upload_bytes:
                raise HTTPException(413, f"upload too large: limit is {config.max_upload_mb:g} MB")
            if not data:
                raise HTTPException(400, "empty upload: no bytes received")
            prediction = predictor.predict_bytes(data, name, cancel=cancel)
            del data
            if cancel.is_set():
                raise Cancelled("prediction cancelled by its caller")
            send_image = image or prediction.source_format not in BROWSER_FORMATS
            return _response(prediction, model, 1000 * (time.perf_counter() - started), image=send_image,
                             backend=predictor.backend)  # fmt: skip

        try:
            return await executor().run(run, timeout=config.timeout_s)
        except ImageReadError as exc:
            raise HTTPException(_status_for(exc), str(exc)) from None
        except ServerBusyError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503,
                                headers={"Retry-After": str(exc.retry_after_s)})  # fmt: skip
        except TimeoutError:
            raise HTTPException(504, f"prediction took longer than {config.timeout_s:g} s") from None

    return app


def _authorise(request: Request, token: str | None) -> None:
    """HTTP 401 unless the request carries the server's access token (compared in constant time)."""
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "this server needs its access token (Authorization: Bearer ...)",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from the ``swagger-ui-bundle`` package: ``/docs`` works on an offline hospital network."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:  # docs are a convenience; the API works without them
        return
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="fracdet API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")  # fmt: skip
