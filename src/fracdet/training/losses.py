"""Training losses of each task, behind one call: the trainer never asks what kind of model it trains.

* ``classify``: cross-entropy of the two logits, optionally class-weighted.
* ``localise``: the same class-weighted loss on the image logit (binary cross-entropy), plus a dense focal
  loss (Lin et al. 2017, torchvision's ``sigmoid_focal_loss``) of the map against the fracture mask,
  normalised by the number of fracture cells as in RetinaNet. A map cell is a fracture cell when any pixel
  it covers is (max pooling of the mask), so a fracture smaller than a cell still has one.
* A fused localiser (:class:`fracdet.models.FusedLocaliser`) trained as one also returns, while training,
  each part's own image logit: with ``part_weight`` each learns the label beside the fused score (the mean
  of their binary cross-entropies, class-weighted alike), so that each stays a ranker on its own.
* A localiser with a box head (:data:`fracdet.models.scoring.BOX_CHANNELS` more map channels) also learns,
  in every fracture cell, the box of the fracture that covers it: the generalised IoU loss (Rezatofighi et
  al. 2019, torchvision's ``generalized_box_iou_loss``) of the decoded box against that fracture's box, read
  off the augmented instance mask, averaged over fracture cells (as FCOS does for its box branch).

Stability training (``stability`` in the config, Zheng et al. 2016) adds :func:`stability_loss`: the change
of the scores a verdict is read from between each image and its re-saved copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from fracdet.models.predict import read_outputs
from fracdet.models.scoring import decode_cell_boxes

__all__ = ["box_targets", "map_targets", "split_views", "stability_loss", "task_loss", "verdict_scores"]

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def map_targets(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` pixel masks -> ``(B, 1, h, w)`` float cell targets (1 where any pixel of the cell is)."""
    return F.adaptive_max_pool2d((masks[:, None] > 0).float(), size)


def box_targets(masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The box each map cell should predict, from ``(B, H, W)`` instance masks (0 = none, k = fracture k).

    Returns ``(cells (B, h, w) bool, boxes (B, 4, h, w))``: the cells any fracture covers, and there the
    ``(x0, y0, x1, y1)`` extent of that fracture in cell units (the smallest one where several cover a cell,
    as FCOS assigns ambiguous locations).
    """
    b, height, width = masks.shape
    h, w = size
    scale = torch.tensor([w / width, h / height, w / width, h / height], device=masks.device)
    cells = torch.zeros((b, h, w), dtype=torch.bool, device=masks.device)
    boxes = torch.zeros((b, 4, h, w), device=masks.device)
    for i in range(b):
        found = []
        for number in torch.unique(masks[i]).tolist():
            if number == 0:
                continue
            ys, xs = torch.nonzero(masks[i] == number, as_tuple=True)
            extent = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float() * scale
            found.append((float((extent[2] - extent[0]) * (extent[3] - extent[1])), number, extent))
        for _, number, extent in sorted(found, key=lambda f: -f[0]):  # largest first: the smallest wins
            covered = F.adaptive_max_pool2d((masks[i] == number)[None, None].float(), size)[0, 0] > 0
            cells[i] |= covered
            boxes[i][:, covered] = extent[:, None]
    return cells, boxes


def task_loss(
    outputs: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    masks: torch.Tensor | None = None,
    *,
    class_weight: torch.Tensor | None = None,
    map_weight: float = 1.0,
    box_weight: float = 1.0,
    part_weight: float = 0.0,
) -> torch.Tensor:
    """The loss of a batch for either task (see the module docstring).

    Args:
        outputs: logits ``(B, 2)`` of a classifier, or ``(image_logit, map_logits (B, C, h, w))`` of a localiser,
            then, from a fused one in training, its parts' image logits ``(B, K)``.
        labels: ``(B,)`` 0/1.
        masks: ``(B, H, W)`` fracture instance masks (a localiser only).
        class_weight: ``(2,)`` weights of the classes (no fracture, fracture), or ``None``.
        map_weight: weight of a localiser's map loss.
        box_weight: weight of a box head's loss.
        part_weight: weight of the parts' own image losses (a fused localiser in training only).
    """
    if not isinstance(outputs, tuple):
        return F.cross_entropy(outputs.float(), labels, weight=class_weight)
    if masks is None:
        raise ValueError("a localiser's loss needs the fracture masks of the batch")
    image_logit, dense = outputs[0].float(), outputs[1].float()
    weight = class_weight[labels] if class_weight is not None else None
    image = F.binary_cross_entropy_with_logits(image_logit, labels.float(), weight=weight)
    map_logits = dense[:, :1]
    targets = map_targets(masks, map_logits.shape[-2:])
    loss = image + map_weight * sigmoid_focal_loss(map_logits, targets, reduction="sum") / targets.sum().clamp_min(1.0)
    if part_weight and len(outputs) > 2:
        parts = outputs[2].float()
        loss = loss + part_weight * F.binary_cross_entropy_with_logits(
            parts, labels.float()[:, None].expand_as(parts), weight=None if weight is None else weight[:, None]
        )
    if dense.shape[1] > 1:
        cells, wanted = box_targets(masks, dense.shape[-2:])
        if cells.any():
            predicted = decode_cell_boxes(dense[:, 1:]).permute(0, 2, 3, 1)[cells]
            loss = loss + box_weight * generalized_box_iou_loss(predicted, wanted.permute(0, 2, 3, 1)[cells],
                                                                reduction="mean")  # fmt: skip
        else:
            loss = loss + 0.0 * dense[:, 1:].sum()  # keeps the box head in the graph (no unused parameters)
    return loss


def verdict_scores(outputs: Outputs) -> torch.Tensor:
    """``(B, k)`` scores a verdict is read from: a classifier's logit margin; a localiser's image logit and
    its map's peak logit (the two its fused image score combines)."""
    margin, dense = read_outputs(outputs)
    if dense is None:
        return margin[:, None]
    return torch.stack([margin, dense[:, 0].amax(dim=(1, 2))], dim=1)


def split_views(outputs: Outputs, n: int) -> tuple[Outputs, Outputs]:
    """The outputs of a batch of ``2n`` images: the first ``n`` (the images) and the last ``n`` (their copies)."""
    if isinstance(outputs, tuple):
        return tuple(o[:n] for o in outputs), tuple(o[n:] for o in outputs)
    return outputs[:n], outputs[n:]


def stability_loss(outputs: Outputs, copies: Outputs, *, relative: bool = False) -> torch.Tensor:
    """Mean change of :func:`verdict_scores` between images and their re-saved copies: half its square up to
    one unit, linear beyond (Huber), so a pair far apart early in training cannot swamp the task loss.

    Both sides learn: the copy is not a fixed target; as in Zheng et al. 2016 the pair is pulled together.

    ``relative``: measure the change in units of the spread of the batch's scores (their standard deviation
    over both views), so the loss cannot be lowered by shrinking every score towards the others. A verdict
    flips when the change is large against the density of scores at the threshold, a ratio; in logits
    (``relative=False``) a fine-tuned model lowered the changes by 40% while compressing its scores, and its
    flips fell by only 15% (``docs/STABILITY.md``).
    """
    a, b = verdict_scores(outputs), verdict_scores(copies)
    if relative:
        spread = torch.cat([a, b]).std(dim=0).clamp_min(1e-3)
        a, b = a / spread, b / spread
    return F.smooth_l1_loss(a, b, beta=1.0)
