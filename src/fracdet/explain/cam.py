"""Grad-CAM heatmaps of where a model looked, overlays, and a box around the hottest region.

Heatmaps come from the ``grad-cam`` library (pytorch-grad-cam) at the layer the model registry names
for each architecture. The target is the logit margin (fracture minus no fracture), the quantity the
decision thresholds, so one forward and one backward pass give both the verdict and its heatmap.

For models whose registry entry says ``cam_from_head`` (global average pooling and a linear classifier
right after the CAM layer), Grad-CAM equals the classic CAM of Zhou et al. (2016): the gradient of the
margin with respect to each channel is that channel's classifier weight difference divided by the
number of positions. The explainer then takes the heatmap from the forward pass alone (about half the
time on a CPU); a test checks it against the library's Grad-CAM. ``exact=True`` always uses the library.

An ensemble (:mod:`fracdet.models.ensemble`) is explained at the named layer of every member, combined
as the library combines several target layers: each rescaled to [0, 1], then averaged.

Heatmaps are normalised per image to [0, 1]: they show *where* the model looked, not *how sure* it is;
read them together with the probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from fracdet.models import get_spec, members_of
from fracdet.models.predict import class_activation_maps, normalise, score_forward
from fracdet.models.release import TrainedModel

__all__ = ["CAM_METHODS", "Explainer", "Explanation", "heatmap_box", "heatmaps_from_cams", "overlay"]

#: Grad-CAM variants by name (pytorch-grad-cam's classes, imported when first used: the library costs half a
#: second of every process's start, and a prediction needs it only for ``gradcam++``).
CAM_METHODS = ("gradcam", "gradcam++")


def _cam_class(method: str) -> type:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

    return {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}[method]


class _MarginTarget:
    """Explain the fracture-minus-no-fracture logit margin."""

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., 1] - output[..., 0]


@dataclass
class Explanation:
    """Margins and heatmaps of a batch, at the model's input resolution."""

    margins: np.ndarray  # (N,)
    heatmaps: np.ndarray  # (N, H, W) float32 in [0, 1]


class Explainer:
    """Grad-CAM (or Grad-CAM++) for a trained model.

    Args:
        model: from :func:`fracdet.models.load`.
        method: ``gradcam`` or ``gradcam++``.
        exact: never take the forward-only shortcut for Grad-CAM (see the module docstring).
    """

    def __init__(self, model: TrainedModel, method: str = "gradcam", *, exact: bool = False) -> None:
        if method not in CAM_METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
        spec = get_spec(model.arch)
        if spec.task != "classify":
            raise ValueError(f"{model.name} is a localiser: it has a fracture map of its own (model.score(...).maps), "
                             "which Grad-CAM of a classifier's margin does not apply to")  # fmt: skip
        self.model = model
        self.method = method
        self.forward_only = method == "gradcam" and spec.cam_from_head and not exact
        self._members = members_of(model.network("give Grad-CAM heatmaps"))
        self._layers = [member.get_submodule(spec.cam_layer) for member in self._members]

    def __call__(self, images: np.ndarray) -> Explanation:
        """Explain ``(N, H, W)`` uint8 images at the model's input size."""
        device = next(self.model.module.parameters()).device
        x = normalise(torch.from_numpy(np.ascontiguousarray(images)).unsqueeze(1).to(device), self.model.preprocess)
        if self.forward_only:
            return self._class_activation_map(x)
        # The library's hooks live only for this call: left registered, every later forward of the model
        # (by anyone) would append its activations to a list nobody clears (0.5 MiB per prediction).
        cam = _cam_class(self.method)(model=self.model.module, target_layers=self._layers)
        try:
            heatmaps = cam(input_tensor=x, targets=[_MarginTarget()] * len(images))
            logits = cam.outputs.detach().float()
        finally:
            cam.activations_and_grads.release()
        margins = (logits[:, 1] - logits[:, 0]).cpu().numpy()
        return Explanation(margins=margins, heatmaps=np.nan_to_num(heatmaps).astype(np.float32))

    @torch.no_grad()
    def _class_activation_map(self, x: torch.Tensor) -> Explanation:
        margins, _, activations = score_forward(self.model.module, x)
        cams = class_activation_maps(self._members, activations).cpu().numpy()
        return Explanation(margins=margins.cpu().numpy(), heatmaps=heatmaps_from_cams(cams, x.shape[-1]))


def heatmaps_from_cams(cams: np.ndarray, size: int) -> np.ndarray:
    """``(N, size, size)`` heatmaps in [0, 1] from raw class activation maps ``(N, M, h, w)`` of M members.

    The library's rescaling: each layer (here, member) to [0, 1] at the input size, their mean, again. The
    same for the :class:`Explainer` and for the CAMs a :class:`fracdet.models.graph.ScoringGraph` returns.
    """
    from pytorch_grad_cam.utils.image import scale_cam_image

    per_member = [scale_cam_image(cams[:, k], (size, size)) for k in range(cams.shape[1])]
    heatmaps = scale_cam_image(np.maximum(np.mean(per_member, axis=0), 0))
    return np.nan_to_num(heatmaps).astype(np.float32)


def overlay(
    image: np.ndarray, heatmap: np.ndarray, *, opacity: float = 0.4, colormap: int = cv2.COLORMAP_JET
) -> np.ndarray:
    """Blend a heatmap (resized to the image) over a grey or RGB image; returns RGB uint8."""
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    heat = cv2.resize(heatmap.astype(np.float32), (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap(np.uint8(255 * np.clip(heat, 0, 1)), colormap)[..., ::-1]
    return np.uint8(np.clip((1 - opacity) * rgb.astype(np.float32) + opacity * coloured, 0, 255))


def heatmap_box(heatmap: np.ndarray, level: float = 0.5) -> tuple[float, float, float, float] | None:
    """Box ``(x0, y0, x1, y1)`` in [0, 1] around the connected region above ``level`` that holds the maximum."""
    if not np.isfinite(heatmap).all() or heatmap.max() <= 0:
        return None
    mask = (heatmap >= level * heatmap.max()).astype(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    peak = np.unravel_index(np.argmax(heatmap), heatmap.shape)
    x, y, w, h, _ = stats[labels[peak]]
    rows, cols = heatmap.shape
    return (float(x / cols), float(y / rows), float((x + w) / cols), float((y + h) / rows))
