"""Training batches from cached pixels: per-epoch sampling for class balance, and augmentation.

Every random choice of an epoch derives from ``(seed, epoch)`` alone, so an epoch replayed after an
interruption draws the same images in the same order with the same augmentations.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from fracdet.training.config import AugmentConfig

__all__ = ["AugmentedImages", "build_augmentation", "epoch_indices"]


def build_augmentation(config: AugmentConfig) -> v2.Transform | None:
    """Flip, rotation + scale + shift (one affine warp), contrast/brightness; ``None`` when all are off."""
    steps: list[v2.Transform] = []
    if config.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(config.hflip))
    if config.rotation > 0 or config.scale > 0 or config.translate > 0:
        steps.append(
            v2.RandomAffine(
                degrees=config.rotation,
                translate=(config.translate, config.translate) if config.translate > 0 else None,
                scale=(1 - config.scale, 1 + config.scale) if config.scale > 0 else None,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        )
    if config.contrast > 0:
        steps.append(v2.ColorJitter(brightness=config.contrast, contrast=config.contrast))
    return v2.Compose(steps) if steps else None


class AugmentedImages(Dataset):
    """``(1, H, W)`` uint8 tensors and labels, augmented when a transform is given."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: v2.Transform | None = None) -> None:
        self.images = images
        self.labels = np.asarray(labels, np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(self.images[index]).unsqueeze(0)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])


def epoch_indices(labels: np.ndarray, balance: str, seed: int, epoch: int) -> np.ndarray:
    """The training images of one epoch, in order.

    ``none`` and ``class_weights`` shuffle all images; ``sampler`` draws as many images with
    replacement, each class equally likely; ``undersample`` keeps every image of the minority class and
    an equally large random subset of the majority class.
    """
    rng = np.random.default_rng([seed, epoch])
    labels = np.asarray(labels)
    n = len(labels)
    if balance == "sampler":
        counts = np.bincount(labels, minlength=2).astype(float)
        weights = 1.0 / counts[labels]
        return rng.choice(n, size=n, replace=True, p=weights / weights.sum())
    if balance == "undersample":
        by_class = [np.flatnonzero(labels == c) for c in (0, 1)]
        size = min(len(ix) for ix in by_class)
        chosen = np.concatenate([rng.choice(ix, size=size, replace=False) for ix in by_class])
        return rng.permutation(chosen)
    return rng.permutation(n)
