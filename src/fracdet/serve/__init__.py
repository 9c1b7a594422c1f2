"""Serve: the FastAPI web application and JSON API around a trained model.

from fracdet.serve import create_app
app = create_app(fracdet.models.load("fracatlas-default"))   # run with uvicorn
"""

from __future__ import annotations

from fracdet.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
