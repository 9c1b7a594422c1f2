"""From cached grey pixels to fracture scores: the one forward path shared by training, evaluation and serving.

A two-class softmax is a logistic on the logit difference, so a model's output is summarised as one
*margin* per image (fracture logit minus no-fracture logit). Probabilities are ``sigmoid(margin / T)``;
temperature scaling (``T`` fitted on validation) is then a single division.

A localiser (:mod:`fracdet.models.localiser`) returns its image logit, which is a margin already, and a
dense output ``(B, C, h, w)``: the fracture map, then any box-head channels (:mod:`fracdet.models.scoring`).
:func:`read_outputs` is the one place that reads either kind of output, and :func:`score_forward` the one
forward every prediction makes (with its test-time mirror, and the CAM-layer activations that give a
classifier's heatmap and the input gate's features).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fracdet.models._registry import PreprocessCfg

__all__ = [
    "class_activation_maps",
    "logit_margin",
    "mirror_dense",
    "network_parts",
    "normalise",
    "pooled_features",
    "predict_margins",
    "predict_scores",
    "read_outputs",
    "score_forward",
    "scoring_batch_size",
    "select_device",
]

#: Images per forward when scoring many on a CPU. A batch of 64 images at 320 px holds hundreds of MiB of
#: activations per layer, so the layers that only move memory (batch norms, the "same" padding of timm's
#: TF-ported convolutions) wait on it; batches of 8 took 0.53 (localiser), 0.60 (classifier) and 0.77 (int8
#: graph) of the time of 64 on two cores, with the same margins (``benchmarks/score_batch.py``).
CPU_BATCH_SIZE = 8
#: Images per forward on an accelerator, which a large batch keeps busy.
DEVICE_BATCH_SIZE = 64


def scoring_batch_size(device: torch.device | str) -> int:
    """How many images to score per forward on ``device`` (:data:`CPU_BATCH_SIZE` or :data:`DEVICE_BATCH_SIZE`)."""
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else DEVICE_BATCH_SIZE


def select_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no GPU")
    return torch.device(name)


def mirror_dense(dense: torch.Tensor) -> torch.Tensor:
    """The dense output ``(B, C, h, w)`` of a mirrored image, mirrored back (a box's x offset changes sign)."""
    dense = torch.flip(dense, dims=[3])
    if dense.shape[1] > 1:
        dense[:, 1] = -dense[:, 1]
    return dense


def normalise(batch: torch.Tensor, preprocess: PreprocessCfg) -> torch.Tensor:
    """``(B, 1, H, W)`` uint8 grey -> ``(B, 3, H, W)`` float, normalised as the model expects.

    Channels-last, where PyTorch's depthwise convolutions run faster; the exported graph
    (:mod:`fracdet.models.graph`) normalises with this function too, so both back ends see the same input.
    """
    x = (batch.float() / 255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(preprocess.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def logit_margin(logits: torch.Tensor) -> torch.Tensor:
    """A two-class classifier's ``(B, 2)`` logits as one margin per image: fracture minus no fracture."""
    logits = logits.float()
    return logits[:, 1] - logits[:, 0]


def read_outputs(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A network's raw outputs as ``(margins (B,), dense outputs (B, C, h, w) or None)``, in float32.

    The one place that reads either task's output; training, calibration, evaluation and serving all go
    through it, so a margin means the same everywhere.
    """
    if isinstance(outputs, tuple):  # localise: (image logit, map logits and any box channels)
        return outputs[0].float(), outputs[1].float()
    return logit_margin(outputs), None


def network_parts(module: nn.Module, x: torch.Tensor) -> tuple[Any, list[torch.Tensor]]:
    """A network's raw outputs and, from the same forward, the activations of its CAM layer, one per member.

    The activations (``(B, C, h, w)`` at the registry's ``cam_layer``) give the input gate its features and a
    classifier its class activation map without hooks: a hook's stored activations are shared state, which
    concurrent predictions would overwrite, and hooks do not survive export to ONNX. Networks of fracdet say
    it themselves (``forward_parts``); timm's classifiers end their ``forward_features`` at that layer.
    """
    if hasattr(module, "forward_parts"):
        return module.forward_parts(x)
    features = module.forward_features(x)
    return module.forward_head(features), [features]


def score_forward(
    model: nn.Module, x: torch.Tensor, *, tta: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """Margins, dense outputs (or ``None``) and CAM-layer activations (one per member) of a normalised batch.

    The forward every prediction makes, in PyTorch or exported (:class:`fracdet.models.graph.ScoringGraph`).

    Args:
        tta: average the margins and dense outputs with those of the horizontal mirror (its map and boxes
            flipped back first). The activations are the image's own: a heatmap shows the image as given.
    """
    outputs, activations = network_parts(model, x)
    margins, dense = read_outputs(outputs)
    if tta:
        mirrored, _ = network_parts(model, torch.flip(x, dims=[3]))
        mirror_margins, mirror_dense_outputs = read_outputs(mirrored)
        margins = (margins + mirror_margins) / 2
        dense = None if dense is None else (dense + mirror_dense(mirror_dense_outputs)) / 2
    return margins, dense, activations


def class_activation_maps(members: list[nn.Module], activations: list[torch.Tensor]) -> torch.Tensor:
    """Raw class activation maps ``(B, M, h, w)`` of the margin, one per member, from its CAM-layer activations.

    For a network whose CAM layer feeds global average pooling and a linear classifier (the registry's
    ``cam_from_head``), the margin's Grad-CAM is the activations weighted by the classifier's weight
    difference, rectified (Zhou et al. 2016; :mod:`fracdet.explain.cam`). Written as a 1x1 convolution, which
    every runtime runs on its fast layout (an ``Einsum`` took half as long again in ONNX Runtime).
    """
    maps = []
    for member, activation in zip(members, activations, strict=True):
        weight = member.get_classifier().weight.float()
        difference = (weight[1] - weight[0]).view(1, -1, 1, 1)
        maps.append(F.conv2d(activation.float(), difference).clamp_min(0))
    return torch.cat(maps, dim=1)


def pooled_features(activations: list[torch.Tensor]) -> torch.Tensor:
    """``(B, C)`` CAM-layer activations averaged over positions and members: the input gate's features."""
    return torch.stack([a.float().mean(dim=(2, 3)) for a in activations]).mean(dim=0)


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    images: np.ndarray,
    preprocess: PreprocessCfg,
    *,
    batch_size: int | None = None,
    device: torch.device | str = "cpu",
    tta: bool = False,
    progress_desc: str | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logit margins of ``(N, H, W)`` uint8 images and, for a localiser, its dense outputs ``(N, C, h, w)``.

    Args:
        batch_size: images per forward (``None``: :func:`scoring_batch_size` of ``device``).
        tta: test-time augmentation: average the outputs of the image and its horizontal mirror (the
            mirror's map and boxes are flipped back first).
        progress_desc: show a progress bar with this label (``None``: silent).
    """
    from fracdet.utils.progress import progress_bar

    device = torch.device(device)
    batch_size = batch_size or scoring_batch_size(device)
    was_training = model.training
    model.eval()
    margins = np.zeros(len(images), np.float32)
    maps: np.ndarray | None = None
    bar = progress_bar(desc=progress_desc or "", total=len(images)) if progress_desc else None
    try:
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).unsqueeze(1)
            margin, heat, _ = score_forward(model, normalise(chunk.to(device), preprocess), tta=tta)
            margins[start : start + len(chunk)] = margin.cpu().numpy()
            if heat is not None:
                if maps is None:
                    maps = np.zeros((len(images), *heat.shape[1:]), np.float32)
                maps[start : start + len(chunk)] = heat.cpu().numpy()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return margins, maps


def predict_margins(model: nn.Module, images: np.ndarray, preprocess: PreprocessCfg, **kwargs: Any) -> np.ndarray:
    """Logit margins (fracture minus no fracture) of ``(N, H, W)`` uint8 images, in order.

    Keyword arguments (``batch_size``, ``device``, ``tta``, ``progress_desc``) are those of :func:`predict_scores`.
    """
    return predict_scores(model, images, preprocess, **kwargs)[0]
