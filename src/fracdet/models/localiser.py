"""A fracture localiser: EfficientNet-Lite features with a dense fracture-map head and an image-level head.

One forward pass gives everything a reader needs: an image logit (is there a fracture?) and a map of
fracture logits at stride 8 (where?), with, for a detector, a regressed box per map cell; boxes are read off
that dense output outside the network (:mod:`fracdet.models.scoring`), so the graph exports to ONNX with a
dynamic batch.

Design:

* **Backbone**: timm's ``tf_efficientnet_lite{0,1,2}`` with the offline ImageNet weights of
  :mod:`fracdet.utils.pretrained`; its stage outputs at strides 8, 16 and 32 are tapped.
* **Dense head**: a light feature pyramid (1x1 laterals, top-down nearest upsampling and sums, as in
  Lin et al. 2017) at stride 8, then two 3x3 conv-BN-ReLU and a 1x1 conv to one logit per cell. The last
  bias starts at the RetinaNet prior (p = 0.01), since most cells of most radiographs hold no fracture.
  It is trained on masks rasterised from the expert boxes or polygons (:mod:`fracdet.training.losses`).
* **Image head**: the backbone's own 1x1 head convolution, global pooling and a linear layer: the
  classifier that fracdet's classification models are, trained jointly.
* **Box head** (``detector_lite{0,1,2}``): beside the map head, the same two conv-BN-ReLU and a 1x1 conv
  to :data:`fracdet.models.scoring.BOX_CHANNELS` numbers per cell, the box of the fracture that cell lies in
  (an anchor-free, single-level detector in the manner of FCOS, Tian et al. 2019), trained with a
  generalised-IoU loss. Its boxes are regressed rather than grown from the map: the detection-head lever
  of issue 15, at the cost of one more small head in the same forward pass.
* **Fusion**: ``image_logit = a * classifier_logit + b * peak_map_logit + c``. ``(a, b, c)`` is a buffer,
  ``(1, 0, 0)`` during training and fitted on validation afterwards (logistic regression, ``b >= 0``), so
  it travels with the weights and the ONNX graph. A box's logit is the image logit with the map's peak
  replaced by the box's own peak: the top box scores exactly as the image, other boxes lower.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fracdet.models._registry import PreprocessCfg, register_model
from fracdet.models.backbones import efficientnet_lite_body
from fracdet.models.scoring import BOX_CHANNELS

__all__ = ["FractureLocaliser"]

#: Output strides tapped from the backbone for the feature pyramid; the map comes out at the first.
_STRIDES = (8, 16, 32)


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FractureLocaliser(nn.Module):
    """EfficientNet-Lite backbone, stride-8 fracture map and fused image logit.

    Args:
        variant: EfficientNet-Lite variant, 0, 1 or 2.
        pretrained: start the backbone from ImageNet weights (offline packages).
        dropout: dropout before the image-level linear layer (``None``: timm's default for the variant).
        width: channels of the feature pyramid and map head.
        box_head: add the box head (a detector).
        antialias: a low-pass before each of the backbone's subsamplings
            (:func:`fracdet.models.backbones.efficientnet_lite_body`).

    ``forward(x)`` returns ``(image_logit (B,), dense (B, C, H/8, W/8))``: ``C`` is 1 (the map logits) or,
    with a box head, ``1 + BOX_CHANNELS``. The input side must be a multiple of 32.
    """

    map_stride = _STRIDES[0]

    def __init__(
        self,
        variant: int = 0,
        *,
        pretrained: bool = False,
        dropout: float | None = None,
        width: int = 64,
        box_head: bool = False,
        antialias: bool = False,
    ):
        super().__init__()
        body = efficientnet_lite_body(variant, pretrained=pretrained, antialias=antialias)
        # The last block of each stride feeds the pyramid (timm's feature_info names them).
        last_of_stride = {info["reduction"]: int(info["module"].split(".")[1]) for info in body.feature_info}
        channels = {info["reduction"]: info["num_chs"] for info in body.feature_info}
        self.taps = tuple(last_of_stride[s] for s in _STRIDES)
        self.stem = nn.Sequential(body.conv_stem, body.bn1)
        self.blocks = body.blocks
        self.head = nn.Sequential(body.conv_head, body.bn2)
        self.dropout = nn.Dropout(body.drop_rate if dropout is None else dropout)
        self.classifier = nn.Linear(body.num_features, 1)
        self.lateral = nn.ModuleList(nn.Conv2d(channels[s], width, 1) for s in _STRIDES)
        self.map_head = nn.Sequential(_conv_bn_relu(width, width), _conv_bn_relu(width, width), nn.Conv2d(width, 1, 1))
        nn.init.constant_(self.map_head[-1].bias, -math.log((1 - 0.01) / 0.01))
        self.box_head = None
        if box_head:
            self.box_head = nn.Sequential(_conv_bn_relu(width, width), _conv_bn_relu(width, width),
                                          nn.Conv2d(width, BOX_CHANNELS, 1))  # fmt: skip
            nn.init.normal_(self.box_head[-1].weight, std=0.01)
            nn.init.zeros_(self.box_head[-1].bias)  # a cell-sized box on the cell: a neutral start
        self.register_buffer("fusion", torch.tensor([1.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_parts(x)[0]

    def forward_parts(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
        """:meth:`forward`'s outputs and the image head's activations (the CAM layer ``head``), from one pass."""
        features = []
        x = self.stem(x)
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                features.append(x)
        head = self.head(x)
        pooled = head.mean(dim=(2, 3))
        classifier_logit = self.classifier(self.dropout(pooled)).squeeze(1)
        pyramid = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=True):
            pyramid = F.interpolate(pyramid, size=feature.shape[-2:], mode="nearest") + lateral(feature)
        map_logits = self.map_head(pyramid)
        peak = map_logits.flatten(1).amax(dim=1)
        image_logit = self.fusion[0] * classifier_logit + self.fusion[1] * peak + self.fusion[2]
        if self.box_head is not None:
            map_logits = torch.cat([map_logits, self.box_head(pyramid)], dim=1)
        return (image_logit, map_logits), [head]


#: The registered kinds: (name, box head, what the description says of the heads).
_KINDS = (("localiser", False, "map head (boxes, map, score)"), ("detector", True, "map and box heads"))

for _variant in (0, 1, 2):
    for _kind, _box_head, _heads in _KINDS:
        register_model(
            f"{_kind}_lite{_variant}",
            preprocess=PreprocessCfg(input_size=256),
            cam_layer="head",
            description=f"fracture {_kind}: EfficientNet-Lite{_variant} + FPN {_heads}, 256 px",
            task="localise",
        )(
            lambda pretrained, num_classes, v=_variant, b=_box_head, **o: FractureLocaliser(
                v, pretrained=pretrained, dropout=o.get("dropout"), box_head=b, antialias=o.get("antialias", False)
            )
        )
