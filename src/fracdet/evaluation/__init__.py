"""Evaluation: metrics with group-bootstrap intervals at validation-chosen operating points, calibration,
subgroups, pictures and an HTML report.

from fracdet.evaluation import evaluate, write_report
result = evaluate(fracdet.models.load("fracatlas-default"), table, split="test")
write_report(result, "eval/")
"""

from __future__ import annotations

from fracdet.evaluation.evaluate import Evaluation, evaluate, metrics_table, subgroup_metrics, write_report
from fracdet.evaluation.metrics import (
    binary_metrics,
    bootstrap_interval,
    bootstrap_intervals,
    expected_calibration_error,
    specificity_at_sensitivity,
    threshold_choice_intervals,
)

__all__ = [
    "Evaluation",
    "binary_metrics",
    "bootstrap_interval",
    "bootstrap_intervals",
    "evaluate",
    "expected_calibration_error",
    "metrics_table",
    "specificity_at_sensitivity",
    "subgroup_metrics",
    "threshold_choice_intervals",
    "write_report",
]
