"""The network of Mamun et al. (2025), the paper fracdet implements.

The paper gives the kind of each layer but not every size. What we take from it, by section:

* *Experiment*: images resized to 150 x 150, turned into tensors in [0, 1] and normalised to [-1, 1]
  (``PreprocessCfg(150)`` with mean and std 0.5).
* *Model Architecture*: several stacked convolutional layers extract features; a ReLU follows each
  convolution; pooling layers then shrink the feature maps; the maps are flattened into a vector and
  passed through fully connected layers; a softmax over fracture / no fracture gives the output, trained
  with cross-entropy.
* *Experiment* again: batch normalisation or dropout are added for regularisation when the data call
  for them.

The sizes are ours: four blocks of 3x3 convolution (32, 64, 128, 128 channels), batch norm, ReLU and 2x2
max pooling (150 -> 75 -> 37 -> 18 -> 9), then a dense layer of 512 units with ReLU and dropout 0.5, and
two logits. The softmax lives in the loss (cross-entropy) and in inference, not in the module. With
another ``input_size`` the first dense layer is sized to match.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from fracdet.models._registry import PreprocessCfg, register_model

__all__ = ["PaperCNN"]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class PaperCNN(nn.Module):
    """Stacked conv + ReLU + max-pool blocks, flattened into dense layers (see the module docstring)."""

    def __init__(self, num_classes: int = 2, input_size: int = 150, dropout: float = 0.5) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, 128)
        self.features = nn.Sequential(*(_block(a, b) for a, b in pairwise(widths)))
        side = input_size
        for _ in range(len(widths) - 1):
            side //= 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits and the last block's ReLU output (the CAM layer ``features.3.2``), from one pass."""
        *first, last = self.features
        conv, norm, relu, pool = last
        activation = relu(norm(conv(nn.Sequential(*first)(x))))
        return self.classifier(pool(activation)), [activation]


@register_model(
    "paper_cnn",
    preprocess=PreprocessCfg(input_size=150),  # [0, 1] -> [-1, 1], as in the paper
    cam_layer="features.3.2",  # ReLU of the last block, 18x18, before its pooling
    description="the paper's CNN from scratch: 4 conv blocks, 2 dense layers, 150 px",
)
def paper_cnn(
    pretrained: bool, num_classes: int, *, input_size: int = 150, dropout: float | None = None, antialias: bool = False
) -> nn.Module:
    if antialias:
        raise ValueError("antialias is built for the EfficientNet-Lite backbones, not paper_cnn")
    if pretrained:
        raise ValueError("paper_cnn has no pretrained weights: it is trained from scratch")
    return PaperCNN(num_classes, input_size=input_size, dropout=0.5 if dropout is None else dropout)
