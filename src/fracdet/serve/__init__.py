"""Serve: the FastAPI web application and JSON API around a trained model.

from fracdet.serve import create_app
app = create_app(fracdet.models.load("fracatlas-default"))
fracdet.serve.run(app, host="127.0.0.1", port=8000)           # uvicorn, with request deadlines
"""

from __future__ import annotations

from fracdet.serve.app import ServeConfig, create_app
from fracdet.serve.server import run, uvicorn_config

__all__ = ["ServeConfig", "create_app", "run", "uvicorn_config"]
