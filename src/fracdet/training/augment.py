"""Training batches from cached pixels: per-epoch sampling for class balance, and augmentation.

Every random choice of an epoch derives from ``(seed, epoch)`` alone, so an epoch replayed after an
interruption draws the same images in the same order with the same augmentations. An image's augmentation
derives from ``(seed, epoch, its position in the epoch)``, never from what was drawn before it, so it is
the same whichever process, data-loading worker or device scores it: training on several devices
(:mod:`fracdet.training.distributed`) sees exactly the images one process would, and a run resumes on
another device count.

Images travel as ``tv_tensors.Image`` and fracture masks as ``tv_tensors.Mask``, so torchvision's
``transforms.v2`` moves a mask with its pixels (nearest-neighbour) and leaves it out of what only changes
intensities (contrast, re-encoding).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from fracdet.data.masks import fracture_mask
from fracdet.training.config import AugmentConfig, StabilityConfig

__all__ = ["AugmentedImages", "Reencode", "build_augmentation", "build_twin", "epoch_indices"]


class Reencode(v2.Transform):
    """Lose what a re-saved or smaller source image loses: shrink and enlarge back, then JPEG or WebP.

    Radiographs reach a model re-encoded by PACS exports, screenshots and messaging; the shipped classifier
    changed its verdict for 7.5% of test images re-saved as JPEG at quality 75. Only images change; masks
    and boxes stay where they are.

    Args:
        p: probability of a round trip.
        quality: quality range, drawn uniformly, for both codecs.
        rescale: shrink the side by a factor drawn from ``[1 - rescale, 1]`` first (0: never).
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, p: float = 0.5, quality: tuple[int, int] = (30, 95), rescale: float = 0.0) -> None:
        super().__init__()
        self.p, self.quality, self.rescale = p, quality, rescale

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        apply = bool(torch.rand(()) < self.p)
        return {
            "apply": apply,
            "format": "JPEG" if torch.rand(()) < 0.5 else "WEBP",
            "quality": int(torch.randint(self.quality[0], self.quality[1] + 1, ())),
            "factor": 1.0 - self.rescale * float(torch.rand(())),
        }

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params["apply"]:
            return inpt
        grey = Image.fromarray(inpt[0].cpu().numpy())  # the codecs run on the CPU, wherever the batch is
        side = grey.size
        if params["factor"] < 1.0:
            small = (max(8, round(side[0] * params["factor"])), max(8, round(side[1] * params["factor"])))
            grey = grey.resize(small, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        grey.save(buffer, format=params["format"], quality=params["quality"])
        decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("L").resize(side, Image.Resampling.BILINEAR)
        return tv_tensors.wrap(torch.from_numpy(np.asarray(decoded).copy()).unsqueeze(0).to(inpt.device), like=inpt)


def build_augmentation(config: AugmentConfig) -> v2.Transform | None:
    """Flip, rotation + scale + shift (one affine warp), contrast/brightness, re-encoding; ``None`` when all off."""
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
    if config.reencode > 0 or config.rescale > 0:
        steps.append(Reencode(p=config.reencode if config.reencode > 0 else 1.0, rescale=config.rescale))
    return v2.Compose(steps) if steps else None


def build_twin(config: StabilityConfig) -> v2.Transform | None:
    """The re-saved copy of stability training (always a round trip), or ``None`` when it is off."""
    return Reencode(p=1.0, rescale=config.rescale) if config.weight > 0 else None


class AugmentedImages(Dataset):
    """``(1, H, W)`` uint8 images and labels, augmented when a transform is given.

    With ``annotations`` (per image, ``(boxes, polygons)`` normalised to [0, 1]), each item also carries the
    fracture mask ``(H, W)`` drawn from them (``mask_target``: ``box`` or ``polygon``), moved with the pixels;
    each fracture has its own number (0 = none), so its extent after augmentation is its box.

    With ``twin`` (:func:`build_twin`), each image comes as ``(2, H, W)``: the augmented image and a copy of
    it passed through ``twin`` (only pixels change, so the mask holds for both).

    Items are asked for as ``(position, index)``: image ``index``, augmented with the random numbers of
    ``position`` in epoch :attr:`epoch` (see the module docstring). A plain ``index`` draws from the global
    random state instead.

    With ``defer``, items come as they are stored (the mask drawn, nothing moved) and the training loop
    augments the batch where it trains, on the GPU (:meth:`augment_batch`): the same transforms with the
    same random numbers, so the batch is the one the data-loading processes would have made (the JPEG/WebP
    round trip of re-encoding runs on the CPU either way).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: v2.Transform | None = None,
        *,
        annotations: Sequence[tuple[Any, Any]] | None = None,
        mask_target: str = "box",
        twin: v2.Transform | None = None,
        seed: int = 0,
        defer: bool = False,
    ) -> None:
        self.images = images
        self.labels = np.asarray(labels, np.int64)
        self.transform = transform
        self.annotations = annotations
        self.mask_target = mask_target
        self.twin = twin
        self.seed = seed
        self.defer = defer
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, ...]:
        if isinstance(item, int | np.integer):
            return self._item(int(item))
        position, index = item
        with self._random_numbers_of(position):
            return self._item(index)

    def augment_batch(
        self, images: torch.Tensor, masks: torch.Tensor | None, positions: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a deferred batch on its own device: ``(B, 1, H, W)`` images (and ``(B, H, W)`` masks) of
        the epoch's ``positions`` -> what :meth:`__getitem__` would have given without ``defer``."""
        views, moved = [], []
        for k, position in enumerate(positions):
            with self._random_numbers_of(position):
                x, mask = self._augment(images[k], None if masks is None else masks[k])
            views.append(x)
            moved.append(mask)
        return torch.stack(views), None if masks is None else torch.stack(moved)

    @contextmanager
    def _random_numbers_of(self, position: int) -> Iterator[None]:
        """The global random state of ``position`` in :attr:`epoch`, restored afterwards."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, position]).generate_state(1)[0]))
            yield

    def _item(self, index: int) -> tuple[torch.Tensor, ...]:
        x = torch.from_numpy(self.images[index]).unsqueeze(0)
        label = int(self.labels[index])
        mask = None
        if self.annotations is not None:
            boxes, polygons = self.annotations[index]
            mask = torch.from_numpy(
                fracture_mask(x.shape[-1], boxes, polygons, target=self.mask_target, instances=True)
            )
        if not self.defer:
            x, mask = self._augment(x, mask)
        return (x, label) if mask is None else (x, label, mask)

    def _augment(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(1, H, W)`` uint8 (and its ``(H, W)`` mask) -> the augmented image, with its re-saved twin when
        stability training is on, and the mask moved with it; plain tensors, on the device they came on."""
        x = tv_tensors.Image(x)
        if mask is None:
            x = self.transform(x) if self.transform is not None else x
        else:
            mask = tv_tensors.Mask(mask)
            if self.transform is not None:
                x, mask = self.transform(x, mask)
            mask = mask.as_subclass(torch.Tensor)
        if self.twin is not None:
            x = torch.cat([x, self.twin(x)])
        return x.as_subclass(torch.Tensor), mask


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
