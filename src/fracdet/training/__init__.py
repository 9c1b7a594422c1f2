"""Training: typed configs, the training loop with exact resume, and what is fitted on validation.

from fracdet.training import load_config, train
config = load_config("configs/default.yaml", ["epochs=3"])
train(config, manifest, "runs/try")        # manifest: a sample table with a split column
"""

from __future__ import annotations

from fracdet.training.calibrate import choose_thresholds, fit_temperature, probabilities
from fracdet.training.config import (
    AugmentConfig,
    ConfigError,
    LocaliseConfig,
    OptimizerConfig,
    ScheduleConfig,
    StabilityConfig,
    TrainConfig,
    load_config,
)
from fracdet.training.trainer import RunExistsError, TrainResult, train

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "LocaliseConfig",
    "OptimizerConfig",
    "RunExistsError",
    "ScheduleConfig",
    "StabilityConfig",
    "TrainConfig",
    "TrainResult",
    "choose_thresholds",
    "fit_temperature",
    "load_config",
    "probabilities",
    "train",
]
