"""A trained model's whole forward, from grey pixels to everything a prediction needs, as one graph.

:class:`ScoringGraph` is the network with what surrounds it at prediction time folded in, so that PyTorch
and an exported ONNX graph (:mod:`fracdet.inference.onnx`) compute exactly the same thing:

* in: ``image``, ``(N, 1, S, S)`` uint8 grey at the model's input side (the resize stays outside: it depends
  on the file); for a gate with an appearance check also ``appearance``, ``(N, 1, 128, 128)`` uint8
  (:func:`fracdet.data.embed.embedder_input` of the same image);
* normalisation and the model's test-time mirror averaging (``tta``) inside;
* out, from one forward (:func:`fracdet.models.predict.network_parts`), as :class:`GraphOutputs`: the logit
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
from fracdet.models.predict import mirror_dense, network_parts, read_outputs
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
        self.register_buffer("mean", torch.tensor(model.preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))
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
        x = ((image.float() / 255.0).expand(-1, 3, -1, -1) - self.mean) / self.std
        x = x.contiguous(memory_format=torch.channels_last)  # PyTorch's depthwise convolutions run faster so
        outputs, activations = network_parts(self.network, x)
        margin, dense = read_outputs(outputs)
        if self.tta:  # the verdict is the mean over the mirror; the map, CAM and features are of the image
            mirrored, _ = network_parts(self.network, torch.flip(x, dims=[3]))
            mirror_margin, mirror_heat = read_outputs(mirrored)
            margin = (margin + mirror_margin) / 2
            dense = None if dense is None else (dense + mirror_dense(mirror_heat)) / 2
        result = [margin] + ([dense] if dense is not None else [])
        if self.cams:
            maps = []
            for member, activation in zip(self._members, activations, strict=True):
                weight = member.get_classifier().weight.float()
                difference = (weight[1] - weight[0]).view(1, -1, 1, 1)  # a 1x1 convolution: fast in any runtime
                maps.append(F.conv2d(activation.float(), difference).clamp_min(0))
            result.append(torch.cat(maps, dim=1))
        result.append(torch.stack([a.float().mean(dim=(2, 3)) for a in activations]).mean(dim=0))
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
        device = self.graph.mean.device
        image = torch.from_numpy(np.ascontiguousarray(images, np.uint8)).unsqueeze(1).to(device)
        extra = None
        if self.appearance:
            if appearance is None:
                raise ValueError("this graph needs the appearance input (fracdet.data.embed.embedder_input)")
            extra = torch.from_numpy(np.ascontiguousarray(appearance, np.uint8)).unsqueeze(1).to(device)
        return self.graph.outputs_of(self.graph(image, extra))
