"""Training losses of each task, behind one call: the trainer never asks what kind of model it trains.

* ``classify``: cross-entropy of the two logits, optionally class-weighted.
* ``localise``: the same class-weighted loss on the image logit (binary cross-entropy), plus a dense focal
  loss (Lin et al. 2017, torchvision's ``sigmoid_focal_loss``) of the map against the fracture mask,
  normalised by the number of fracture cells as in RetinaNet. A map cell is a fracture cell when any pixel
  it covers is (max pooling of the mask), so a fracture smaller than a cell still has one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torchvision.ops import sigmoid_focal_loss

__all__ = ["map_targets", "task_loss"]


def map_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` pixel masks -> ``(B, 1, h, w)`` float cell targets (1 where any pixel of the cell is)."""
    return F.adaptive_max_pool2d(masks[:, None].float(), size)


def task_loss(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    map_weight: float = 1.0,
) -> torch.Tensor:
    """The loss of a batch for either task (see the module docstring).

    Args:
        outputs: logits ``(B, 2)`` of a classifier, or ``(image_logit, map_logits)`` of a localiser.
        labels: ``(B,)`` 0/1.
        masks: ``(B, H, W)`` fracture masks (a localiser only).
        class_weight: ``(2,)`` weights of the classes (no fracture, fracture), or ``None``.
        map_weight: weight of a localiser's map loss.
    """
    if not isinstance(outputs, tuple):
        return F.cross_entropy(outputs.float(), labels, weight=class_weight)
    if masks is None:
        raise ValueError("a localiser's loss needs the fracture masks of the batch")
    image_logit, map_logits = outputs[0].float(), outputs[1].float()
    weight = class_weight[labels] if class_weight is not None else None
    image = F.binary_cross_entropy_with_logits(image_logit, labels.float(), weight=weight)
    targets = map_targets(masks, map_logits.shape[-2:])
    dense = sigmoid_focal_loss(map_logits, targets, reduction="sum") / targets.sum().clamp_min(1.0)
    return image + map_weight * dense
