"""Training batches from cached pixels: per-epoch sampling for class balance, and augmentation.

Every random choice of an epoch derives from ``(seed, epoch)`` alone, so an epoch replayed after an
interruption draws the same images in the same order with the same augmentations. An image's augmentation
derives from ``(seed, epoch, its position in the epoch)``, never from what was drawn before it, so it is
the same whichever process, data-loading worker or device scores it: training on several devices
(:mod:`fracdet.training.distributed`) sees exactly the images one process would, and a run resumes on
another device count. Each item of a batch is a :class:`Draw` that names its epoch, so the loading
processes need no state of their own: :class:`EpochLoader` starts them once a run.

Images travel as ``tv_tensors.Image`` and fracture masks as ``tv_tensors.Mask``, so torchvision's
``transforms.v2`` moves a mask with its pixels (nearest-neighbour) and leaves it out of what only changes
intensities (contrast, re-encoding).
"""

from __future__ import annotations

import io
import signal
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Self

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from fracdet.data.masks import fracture_mask
from fracdet.training.config import RESAVE_CODECS, AugmentConfig, StabilityConfig

__all__ = [
    "AugmentedImages",
    "Draw",
    "EpochLoader",
    "Reencode",
    "Shift",
    "build_augmentation",
    "build_twin",
    "epoch_draws",
    "epoch_indices",
]

CODECS = tuple(codec.upper() for codec in RESAVE_CODECS)  # as Pillow names them


class Draw(NamedTuple):
    """Image ``index`` as drawn at ``position`` of ``epoch``: what a batch is made of.

    Its augmentation derives from ``(seed, epoch, position)`` alone. The epoch travels with the item because
    the loading processes keep their own copy of the dataset from the moment they start: set on the training
    process's copy, it would not reach them.
    """

    epoch: int
    position: int
    index: int


class Reencode(v2.Transform):
    """Lose what a re-saved or smaller source image loses: shrink and enlarge back, then JPEG or WebP.

    Radiographs reach a model re-encoded by PACS exports, screenshots and messaging; the shipped classifier
    changed its verdict for 7.5% of test images re-saved as JPEG at quality 75. Only images change; masks
    and boxes stay where they are.

    Args:
        p: probability of a round trip.
        quality: quality range, drawn uniformly, for every codec.
        rescale: shrink the side by a factor drawn from ``[1 - rescale, 1]`` first (0: never).
        codecs: the formats a round trip may save in, one drawn per image with equal chances (``JPEG``,
            ``WEBP``); none: the image is only shrunk and enlarged back, no codec runs.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(
        self,
        p: float = 0.5,
        quality: tuple[int, int] = (30, 95),
        rescale: float = 0.0,
        codecs: Sequence[str] = CODECS,
    ) -> None:
        super().__init__()
        self.p, self.quality, self.rescale, self.codecs = p, quality, rescale, tuple(codecs)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        # the same four draws whatever the codecs, so the default draws what it always has
        apply = bool(torch.rand(()) < self.p)
        pick = float(torch.rand(()))
        return {
            "apply": apply,
            "format": self.codecs[int(pick * len(self.codecs))] if self.codecs else None,  # pick < 1
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
        if params["format"] is not None:
            buffer = io.BytesIO()
            grey.save(buffer, format=params["format"], quality=params["quality"])
            grey = Image.open(io.BytesIO(buffer.getvalue())).convert("L")
        back = grey.resize(side, Image.Resampling.BILINEAR) if grey.size != side else grey
        return tv_tensors.wrap(torch.from_numpy(np.asarray(back).copy()).unsqueeze(0).to(inpt.device), like=inpt)


class Shift(v2.Transform):
    """Move the image by a few whole pixels; the rows and columns it uncovers repeat its edge.

    Moved by one pixel at its own resolution, a radiograph meets the network's sampling grids at another
    phase, and the released model's verdict flipped as often as after a JPEG q75 re-save (docs/STABILITY.md,
    *Is it how the files were exported?*). Only images change: it is for stability training's copy, whose
    score must then match the image's at every phase, not for the image the task loss sees.

    Args:
        pixels: the largest move along each axis; each move is drawn uniformly from ``[-pixels, pixels]``.
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.pixels = pixels

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        down, right = torch.randint(-self.pixels, self.pixels + 1, (2,)).tolist()
        return {"down": down, "right": right}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        down, right = params["down"], params["right"]
        if down == right == 0:
            return inpt
        height, width = inpt.shape[-2:]
        padding = (max(right, 0), max(-right, 0), max(down, 0), max(-down, 0))  # left, right, top, bottom
        padded = torch.nn.functional.pad(inpt.as_subclass(torch.Tensor).float(), padding, mode="replicate")
        top, left = max(-down, 0), max(-right, 0)
        moved = padded[..., top : top + height, left : left + width].to(inpt.dtype)
        return tv_tensors.wrap(moved, like=inpt)


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
    """The copy of stability training: always shrunk by up to ``rescale`` and round-tripped through one of
    ``codecs`` (only shrunk and enlarged back when there are none), moved first by up to ``shift`` pixels
    when asked; ``None`` when stability training is off."""
    if config.weight <= 0:
        return None
    resave = Reencode(p=1.0, rescale=config.rescale, codecs=[c.upper() for c in config.codecs])
    return v2.Compose([Shift(config.shift), resave]) if config.shift > 0 else resave


class AugmentedImages(Dataset):
    """``(1, H, W)`` uint8 images and labels, augmented when a transform is given.

    With ``annotations`` (per image, ``(boxes, polygons)`` normalised to [0, 1]), each item also carries the
    fracture mask ``(H, W)`` drawn from them (``mask_target``: ``box`` or ``polygon``), moved with the pixels;
    each fracture has its own number (0 = none), so its extent after augmentation is its box.

    With ``twin`` (:func:`build_twin`), each image comes as ``(2, H, W)``: the augmented image and a copy of
    it passed through ``twin`` (only pixels change, so the mask holds for both).

    Items are asked for as :class:`Draw`: the image, augmented with the random numbers of its place in its
    epoch (see the module docstring). A plain ``index`` draws from the global random state instead.

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

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int | Draw) -> tuple[torch.Tensor, ...]:
        if isinstance(item, int | np.integer):
            return self._item(int(item))
        with self._random_numbers_of(item):
            return self._item(item.index)

    def augment_batch(
        self, images: torch.Tensor, masks: torch.Tensor | None, draws: Sequence[Draw]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a deferred batch on its own device: ``(B, 1, H, W)`` images (and ``(B, H, W)`` masks) of
        ``draws`` -> what :meth:`__getitem__` would have given without ``defer``."""
        views, moved = [], []
        for k, draw in enumerate(draws):
            with self._random_numbers_of(draw):
                x, mask = self._augment(images[k], None if masks is None else masks[k])
            views.append(x)
            moved.append(mask)
        return torch.stack(views), None if masks is None else torch.stack(moved)

    @contextmanager
    def _random_numbers_of(self, draw: Draw) -> Iterator[None]:
        """The global random state of ``draw``'s place in its epoch, restored afterwards."""
        with torch.random.fork_rng(devices=[]):
            key = [self.seed, draw.epoch, draw.position]
            torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1)[0]))
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


class EpochLoader:
    """The batches of one epoch after another, from ``workers`` loading processes started once for them all.

    Forked anew for every epoch, the processes were copies of a training process that had grown by all that
    training allocates, and at 192/224 px two of them ran a 24 GB machine out of memory (docs/RELIABILITY.md).
    Now they start with the first epoch's batches and stay until the ``with`` block ends, however it ends. They
    need nothing of an epoch but its batches, since every item is a :class:`Draw`. With ``workers=0`` the
    batches are made in this process. ``pin_memory``: batches in page-locked memory, for copies to a GPU that
    do not wait.

    Example::

        with EpochLoader(dataset, workers=2) as loader:
            for epoch in range(epochs):
                for x, y, *masks in loader(batches_of(epoch)):
                    ...
    """

    def __init__(self, dataset: AugmentedImages, workers: int = 0, *, pin_memory: bool = False) -> None:
        self._batches = _Batches()
        # Its own generator: each pass draws a seed from it, which would otherwise move the global random
        # state that dropout uses.
        self._loader = DataLoader(dataset, batch_sampler=self._batches, num_workers=workers,
                                  persistent_workers=workers > 0, pin_memory=pin_memory, generator=torch.Generator(),
                                  worker_init_fn=_leave_stopping_to_the_trainer)  # fmt: skip

    def __call__(self, batches: Sequence[Sequence[Draw]]) -> Iterator[Any]:
        """The collated ``batches``, in order."""
        self._batches.batches = batches
        return iter(self._loader)

    def close(self) -> None:
        """Stop the loading processes (what the loader does when it is garbage-collected, now)."""
        iterator = getattr(self._loader, "_iterator", None)  # where the DataLoader keeps persistent workers
        if iterator is not None:
            iterator._shutdown_workers()
            self._loader._iterator = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _leave_stopping_to_the_trainer(worker_id: int) -> None:
    """A loading process ignores SIGTERM and Ctrl-C, which reach it with the training process when its process
    group or its command line is signalled (``pkill -f "fracdet train"``, a terminal's Ctrl-C): the training
    process decides (:mod:`fracdet.training.stopping`: the batch in hand, saved) and ends its loading
    processes itself. Left to PyTorch's handlers, one died at once, and the training process with it, its
    work since its last checkpoint lost. Should the training process die, they end by themselves (PyTorch's
    workers watch their parent)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Batches:
    """The batch sampler of :class:`EpochLoader`: the current epoch's batches, read as each epoch begins."""

    def __init__(self) -> None:
        self.batches: Sequence[Sequence[Draw]] = ()

    def __iter__(self) -> Iterator[list[Draw]]:
        return (list(batch) for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def epoch_draws(labels: np.ndarray, balance: str, seed: int, epoch: int) -> list[Draw]:
    """:func:`epoch_indices` as the epoch's :class:`Draw` items."""
    order = epoch_indices(labels, balance, seed, epoch).tolist()
    return [Draw(epoch, position, index) for position, index in enumerate(order)]


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
