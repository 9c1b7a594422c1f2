"""Training: typed configs, the training loop with exact resume, and what is fitted on validation.

from fracdet.training import load_config, train
config = load_config("configs/default.yaml", ["epochs=3"])
train(config, manifest, "runs/try")        # manifest: a sample table with a split column
"""

from __future__ import annotations

from fracdet.training.calibrate import choose_thresholds, fit_temperature, probabilities
from fracdet.training.checkpoint import RunExistsError
from fracdet.training.config import (
    AugmentConfig,
    ConfigError,
    FusedConfig,
    LocaliseConfig,
    OptimizerConfig,
    ScheduleConfig,
    StabilityConfig,
    TrainConfig,
    load_config,
)

#: Imported when first asked for: the training loop pulls in torchvision's transforms (a second of start-up)
#: that predicting, serving and evaluating never need.
_TRAINER = ("TrainResult", "train")


def __getattr__(name: str):  # PEP 562
    if name in _TRAINER:
        from fracdet.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AugmentConfig",
    "ConfigError",
    "FusedConfig",
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
