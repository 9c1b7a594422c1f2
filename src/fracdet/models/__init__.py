"""Models: a small registry (as in timm) of the paper's CNN and ImageNet backbones.

from fracdet.models import create_model, get_spec, list_models
model = create_model("efficientnet_lite0", pretrained=True)   # offline ImageNet weights
steady = create_model("localiser_lite1", antialias=True)       # a low-pass before each subsampling
get_spec("efficientnet_lite0").preprocess                      # input size and normalisation
trained = load("fracatlas-classifier")                         # a released model, on the CPU
ensemble = combine([load("runs/a"), load("runs/b")])           # averaged logits (fracdet.models.ensemble)
fused = combine([load("runs/localiser"), trained])             # a localiser whose score weighs the classifier's
"""

from __future__ import annotations

from fracdet.models import backbones, localiser, paper_cnn  # noqa: F401 (registers the models)
from fracdet.models._registry import (
    BUILD_OPTIONS,
    ModelSpec,
    PreprocessCfg,
    build_options,
    create_model,
    get_spec,
    list_models,
    register_model,
)
from fracdet.models.ensemble import Ensemble, FusedLocaliser, combine, members_of
from fracdet.models.release import (
    ModelLoadError,
    NoWeightsError,
    TrainedModel,
    list_releases,
    load,
    package_release,
    rebuilt,
    save_model,
)

__all__ = [
    "BUILD_OPTIONS",
    "Ensemble",
    "FusedLocaliser",
    "ModelLoadError",
    "ModelSpec",
    "NoWeightsError",
    "PreprocessCfg",
    "TrainedModel",
    "build_options",
    "combine",
    "create_model",
    "get_spec",
    "list_models",
    "list_releases",
    "load",
    "members_of",
    "package_release",
    "rebuilt",
    "register_model",
    "save_model",
]
