"""Inference: files or uploads -> calibrated probability, verdict, heatmap; shared by CLI and web app.

from fracdet.inference import Predictor, collect_inputs
predictor = Predictor(fracdet.models.load("fracatlas-default"))
table = predictor.predict_files(collect_inputs(["xrays/"]), heatmap_dir=Path("heatmaps"))
"""

from __future__ import annotations

from fracdet.inference.gate import InputGate, NotARadiographError
from fracdet.inference.predictor import Cancelled, Prediction, Predictor, study_summary
from fracdet.inference.readers import collect_inputs, read_input

__all__ = [
    "Cancelled",
    "InputGate",
    "NotARadiographError",
    "Prediction",
    "Predictor",
    "collect_inputs",
    "read_input",
    "study_summary",
]
