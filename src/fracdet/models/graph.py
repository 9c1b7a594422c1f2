"""A trained model's whole forward, from grey pixels to everything a prediction needs, as one graph.

:class:`ScoringGraph` is the network with what surrounds it at prediction time folded in, so that PyTorch
and an exported ONNX graph (:mod:`fracdet.inference.onnx`) compute exactly the same thing:

* in: ``image``, ``(N, 1, S, S)`` uint8 grey at the model's input side (the resize stays outside: it depends
  on the file); for a gate with an appearance check also ``appearance``, ``(N, 1, 128, 128)`` uint8
  (:func:`fracdet.data.embed.embedder_input` of the same image);
* normalisation and the model's test-time mirror averaging (``tta``) inside;
* out, from one forward (:func:`fracdet.models.predict.score_forward`), as :class:`GraphOutputs`: the logit
  ``margin``, a localiser's ``dense`` output (map logits and any box channels), a classifier's class
  activation ``cams`` (one per member; Grad-CAM of the margin where the registry says ``cam_from_head``, see
  :mod:`fracdet.explain.cam`), the input gate's ``features``, and the gate's ``embedding``.

A :class:`Runtime` runs a graph: :class:`TorchRuntime` here, :class:`fracdet.inference.onnx.OnnxRuntime`
there. Everything after it (temperature, levels, boxes, heatmap scaling, the gate's distances) is shared
Python, so the two back ends cannot disagree on anything but arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fracdet.models._registry import get_spec
from fracdet.models.ensemble import members_of
from fracdet.models.predict import class_activation_maps, normalise, pooled_features, score_forward
from fracdet.models.release import TrainedModel

__all__ = ["GraphOutputs", "Runtime", "ScoringGraph", "TorchRuntime", "has_cams"]

#: Side of the appearance embedder's input (:func:`fracdet.inference.gate.appearance_embedder`).
APPEARANCE_SIDE = 128


@dataclass
class GraphOutputs:
    """What one forward of a :class:`ScoringGraph` gives for a batch (numpy, float32).

    Attributes:
        margins: logit margins ``(N,)`` before the temperature.
        dense: a localiser's map logits, then any box channels ``(N, C, h, w)``; else ``None``.
        cams: a classifier's class activation maps ``(N, M, h, w)``, one per member, before scaling; ``None``
            for a localiser or a network without a forward-only CAM.
        features: the input gate's features ``(N, F)`` (CAM-layer activations averaged over positions and
            members).
        embedding: the gate's appearance embedding ``(N, E)`` (L2-normalised); ``None`` without one.
    """

    margins: np.ndarray
    dense: np.ndarray | None
    cams: np.ndarray | None
    features: np.ndarray
    embedding: np.ndarray | None = None


class Runtime(Protocol):
    """Runs a :class:`ScoringGraph`: ``runtime(images, appearance) -> GraphOutputs``. Safe to call from
    several threads at once."""

    name: str  #: ``pytorch`` or ``onnxruntime``, as ``/api/v1/model`` reports it.
    cams: bool  #: whether its outputs carry ``cams``.
    appearance: bool  #: whether it takes the ``appearance`` input and gives ``embedding``.

    def __call__(self, images: np.ndarray, appearance: np.ndarray | None = None) -> GraphOutputs: ...


def has_cams(model: TrainedModel) -> bool:
    """Whether ``model``'s Grad-CAM comes from its forward alone (a classifier whose CAM layer feeds the head)."""
    spec = get_spec(model.arch)
    return spec.task == "classify" and spec.cam_from_head


class _Embedding(nn.Module):
    """The appearance embedder's network: ``(N, 1, 128, 128)`` uint8 -> L2-normalised ImageNet features."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image.float() / 127.5 - 1.0).expand(-1, 3, -1, -1)  # ImageNet-Lite scaling, as ImageEmbedder
        x = x.contiguous(memory_format=torch.channels_last)
        return F.normalize(self.network(x), dim=1)


class ScoringGraph(nn.Module):
    """``model``'s forward from uint8 grey pixels to :class:`GraphOutputs` (see the module docstring).

    Args:
        model: from :func:`fracdet.models.load`.
        embedder: the appearance embedder's network (timm, pooled features), to run in the same graph;
            ``None``: no ``appearance`` input.
    """

    def __init__(self, model: TrainedModel, *, embedder: nn.Module | None = None) -> None:
        super().__init__()
        self.network = model.module
        self.tta = bool(model.tta)
        self.task = model.task
        self.cams = has_cams(model)
        self.preprocess = model.preprocess
        self._members = members_of(model.module) if self.cams else []
        self.embedder = _Embedding(embedder) if embedder is not None else None

    @property
    def output_names(self) -> list[str]:
        """Names of :meth:`forward`'s outputs, in order (the ONNX graph's output names)."""
        names = ["margin"] + (["dense"] if self.task == "localise" else []) + (["cams"] if self.cams else [])
        return names + ["features"] + (["embedding"] if self.embedder is not None else [])

    @property
    def input_names(self) -> list[str]:
        return ["image"] + (["appearance"] if self.embedder is not None else [])

    def forward(self, image: torch.Tensor, appearance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        x = normalise(image, self.preprocess)
        margin, dense, activations = score_forward(self.network, x, tta=self.tta)
        result = [margin] + ([dense] if dense is not None else [])
        if self.cams:
            result.append(class_activation_maps(self._members, activations))
        result.append(pooled_features(activations))
        if self.embedder is not None:
            result.append(self.embedder(appearance))
        return tuple(result)

    def outputs_of(self, values: tuple[np.ndarray, ...]) -> GraphOutputs:
        """:class:`GraphOutputs` from :meth:`forward`'s outputs (tensors or arrays), by name."""
        named = dict(zip(self.output_names, values, strict=True))
        return graph_outputs(named)


def graph_outputs(named: dict[str, object]) -> GraphOutputs:
    """:class:`GraphOutputs` from outputs by name (any back end)."""

    def array(key: str) -> np.ndarray | None:
        value = named.get(key)
        if value is None:
            return None
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        return np.asarray(value, np.float32)

    return GraphOutputs(array("margin"), array("dense"), array("cams"), array("features"), array("embedding"))


class TorchRuntime:
    """A :class:`ScoringGraph` run by PyTorch (on the CPU, or wherever the model's weights are).

    Args:
        model: from :func:`fracdet.models.load`.
        embedder: see :class:`ScoringGraph`.
    """

    name = "pytorch"

    def __init__(self, model: TrainedModel, *, embedder: nn.Module | None = None) -> None:
        self.graph = ScoringGraph(model, embedder=embedder).eval()
        self.graph.to(next(model.module.parameters()).device)
        self.cams = self.graph.cams
        self.appearance = self.graph.embedder is not None

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, appearance: np.ndarray | None = None) -> GraphOutputs:
        device = next(self.graph.network.parameters()).device
        image = torch.from_numpy(np.ascontiguousarray(images, np.uint8)).unsqueeze(1).to(device)
        extra = None
        if self.appearance:
            if appearance is None:
                raise ValueError("this graph needs the appearance input (fracdet.data.embed.embedder_input)")
            extra = torch.from_numpy(np.ascontiguousarray(appearance, np.uint8)).unsqueeze(1).to(device)
        return self.graph.outputs_of(self.graph(image, extra))
