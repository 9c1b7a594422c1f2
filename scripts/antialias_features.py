"""How much do ImageNet EfficientNet-Lite features move when a radiograph moves by one pixel, with and
without a low-pass before each subsampling, and with its edges padded how?

    python scripts/antialias_features.py --data DATASET [--images 48] [--seed 0] [--variant 0] [--out FILE.json]

No training and no labels: ``--images`` files drawn at random (``--seed``) from DATASET, each square-resized
to the variant's input side as the models read it, then moved right and down by one pixel (the uncovered row
and column repeat the edge). The figure is the change of the pooled features (the input of the classifier
head) relative to their norm, for the network as timm builds it, as ``antialias=True`` builds it
(:mod:`fracdet.models.backbones`: timm's ``BlurPool2d`` padding with zeros) and with ``BlurPool2d``'s
default padding, reflected edges, otherwise the same. It is why fracdet pads with zeros.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from timm.layers import BlurPool2d
from torch import nn

from fracdet.data import load_dataset
from fracdet.data.decode import ImageReadError, read_image
from fracdet.data.pixels import resize_square
from fracdet.data.table import absolute_paths
from fracdet.models import backbones, create_model, get_spec
from fracdet.models.predict import normalise


def radiographs(data: str, count: int, seed: int, side: int) -> torch.Tensor:
    """``count`` readable files of the dataset, drawn at random, as the models' uint8 input (N, 1, side, side)."""
    paths = sorted(absolute_paths(load_dataset(data)))
    random.Random(seed).shuffle(paths)
    pixels = []
    for path in paths:
        try:
            pixels.append(resize_square(read_image(path), side))
        except ImageReadError:  # FracAtlas holds a few truncated files: draw the next
            continue
        if len(pixels) == count:
            break
    return torch.from_numpy(np.stack(pixels)).unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", type=int, default=0, choices=(0, 1, 2), help="EfficientNet-Lite0/1/2")
    parser.add_argument("--out", help="also write the figures here (JSON)")
    args = parser.parse_args()
    name = f"efficientnet_lite{args.variant}"
    side = get_spec(name).preprocess.input_size
    x = normalise(radiographs(args.data, args.images, args.seed, side), get_spec(name).preprocess)
    moved = nn.functional.pad(x, (1, 0, 1, 0), mode="replicate")[..., :side, :side]

    def reflected() -> nn.Module:  # antialias=True's network with BlurPool2d's default padding
        reflecting = functools.partial(BlurPool2d, pad_mode="reflect")
        with mock.patch.object(backbones, "_zero_padded_blur_pool", return_value=reflecting):
            return create_model(name, pretrained=True, antialias=True)

    networks = {
        "none": lambda: create_model(name, pretrained=True),
        "low-pass, zero padding (antialias=True)": lambda: create_model(name, pretrained=True, antialias=True),
        "low-pass, reflected edges": reflected,
    }
    figures = {}
    for label, build in networks.items():
        network = build().eval()
        with torch.no_grad():
            before, after = (network.forward_head(network.forward_features(t), pre_logits=True) for t in (x, moved))
        change = ((after - before).norm(dim=1) / before.norm(dim=1)).numpy()
        figures[label] = {"mean": float(change.mean()), "median": float(np.median(change)),
                          "max": float(change.max())}  # fmt: skip
        print(f"{label:40s} mean {change.mean():.3f}  median {np.median(change):.3f}  max {change.max():.3f}")
    if args.out:
        record = {"network": name, "input_size": side, "images": len(x), "seed": args.seed, "data": args.data,
                  "move": "1 px right and down, edge repeated", "relative_feature_change": figures}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
