"""Does the verdict survive what happens to a radiograph on its way to the model?

A radiograph reaches fracdet re-saved, re-compressed or downscaled by whatever exported it (a PACS viewer's
"save as JPEG", a phone photo app, a web form). The same image must get the same verdict. For every file
of a split, each :data:`VARIANTS` entry re-encodes the decoded image as such a tool would (8-bit, then the
format at its quality, or half the resolution), decodes it again and scores it; the reference is the file
as fracdet reads it. Reported per variant: the median, 90th percentile and largest change of the calibrated
probability, and the share of images whose verdict at the operating threshold flips, with a 95%
group-bootstrap interval (copies of one radiograph are resampled together).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from scipy.special import expit

from fracdet.data.decode import ImageReadError, read_image
from fracdet.data.pixels import resize_square
from fracdet.evaluation.metrics import group_bootstrap
from fracdet.models.release import TrainedModel
from fracdet.models.scoring import BORDERLINE_LOGITS, borderline
from fracdet.utils.progress import progress

__all__ = ["NEAR_LOGITS", "VARIANTS", "flip_figures", "near_threshold", "reencode", "resaved", "verdict_stability"]


def _grey8(pixels: np.ndarray) -> np.ndarray:
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    return np.clip(np.rint(grey * 255.0), 0, 255).astype(np.uint8)


def reencode(pixels: np.ndarray, fmt: str, **options: Any) -> np.ndarray:
    """Grey float pixels -> saved as an 8-bit ``fmt`` file with ``options`` -> decoded again (float, [0, 1])."""
    buffer = io.BytesIO()
    Image.fromarray(_grey8(pixels)).save(buffer, format=fmt, **options)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), np.float32) / 255.0


def _half(pixels: np.ndarray) -> np.ndarray:
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    h, w = grey.shape
    return cv2.resize(grey, (max(1, w // 2), max(1, h // 2)), interpolation=cv2.INTER_AREA)


#: What a radiograph goes through on its way, by name.
VARIANTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "png": lambda p: reencode(p, "PNG"),
    "jpeg95": lambda p: reencode(p, "JPEG", quality=95),
    "jpeg75": lambda p: reencode(p, "JPEG", quality=75),
    "webp80": lambda p: reencode(p, "WEBP", quality=80),
    "half": _half,
}


#: How close to the threshold, in logits, a score counts as near it: the band in which a verdict is
#: *borderline* (:data:`fracdet.models.scoring.BORDERLINE_LOGITS`). docs/STABILITY.md has counted with it since
#: *Is it how the files were exported?*, where 27 of 28 flips under JPEG q75 lay among the 19% of files this near.
NEAR_LOGITS = BORDERLINE_LOGITS


def near_threshold(probabilities: np.ndarray, threshold: float, *, logits: float = NEAR_LOGITS) -> np.ndarray:
    """Which ``probabilities`` lie within ``logits`` of ``threshold`` on the logit scale (a boolean mask): the
    files whose verdict the reader is told is borderline."""
    return np.atleast_1d(borderline(probabilities, threshold, logits=logits))


def resaved(
    paths: Sequence[str | Path],
    size: int,
    variants: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    *,
    original: bool = True,
    strict: bool = False,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Each readable file at ``paths`` in every variant (and, with ``original``, as read), squashed to ``size``.

    Returns the indices of the files kept and, per variant name (``original`` last), their ``(N, size, size)``
    uint8 images. Unreadable files are left out, or raise with ``strict``; none readable raises ``ValueError``.
    """
    variants = VARIANTS if variants is None else variants
    names = (*variants, "original") if original else tuple(variants)
    images: dict[str, list[np.ndarray]] = {name: [] for name in names}
    kept: list[int] = []
    for k, path in enumerate(progress(list(paths), desc="re-encoding")):
        try:
            pixels = read_image(path)
        except ImageReadError:
            if strict:
                raise
            continue
        kept.append(k)
        for name in names:
            images[name].append(resize_square(variants[name](pixels) if name in variants else pixels, size))
    if not kept:
        raise ValueError("no readable file to measure stability on")
    return kept, {name: np.stack(stack) for name, stack in images.items()}


def verdict_stability(
    model: TrainedModel,
    paths: Sequence[str | Path],
    groups: Sequence[str] | None,
    *,
    threshold: float,
    temperature: float | None = None,
    tta: bool | None = None,
    reference: np.ndarray | None = None,
    variants: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Probability changes and verdict flips of ``model`` on each variant of the files at ``paths``.

    Args:
        groups: the copy group of each file (resampled together for the intervals), or ``None``.
        threshold: the operating threshold whose verdict must not flip (chosen on validation).
        temperature, tta: the calibration the probabilities are read with (``None``: the model's own), so
            they are those the threshold was chosen for.
        reference: the probabilities of the files as read, when the caller scored them already (an
            evaluation has); every file must then be readable. ``None``: they are scored here.
        variants: name -> transform of grey float pixels (default :data:`VARIANTS`).

    Unreadable files are left out, as everywhere.
    """
    variants = VARIANTS if variants is None else variants
    temperature = model.temperature if temperature is None else temperature
    kept, images = resaved(paths, model.preprocess.input_size, variants, original=reference is None,
                           strict=reference is not None)  # fmt: skip
    probability = {name: expit(model.margins(stack, tta=tta).astype(np.float64) / temperature)
                   for name, stack in images.items()}  # fmt: skip
    reference = probability.pop("original") if reference is None else np.asarray(reference, np.float64)
    group_of = np.asarray(groups, dtype=object)[kept].astype(str) if groups is not None else None
    figures = flip_figures(reference, probability, threshold, group_of, n_boot=n_boot, seed=seed)
    return {"threshold": float(threshold), "images": len(kept),
            "near_threshold": int(near_threshold(reference, threshold).sum()), "near_logits": NEAR_LOGITS,
            "variants": figures}  # fmt: skip


def flip_figures(
    reference: np.ndarray,
    variants: dict[str, np.ndarray],
    threshold: float,
    groups: np.ndarray | None,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Per variant: how far its probabilities moved from ``reference`` (median, 90th percentile, largest) and how
    many verdicts at ``threshold`` flipped (rate, 95% group-bootstrap interval, count, how many of those
    files scored near it as read (:func:`near_threshold`), and the rate among the files that did not, whose
    verdicts the reader is not told are borderline).

    Apart from :func:`verdict_stability` so that scores a model does not make alone (the mean of several,
    ``scripts/ensemble_flips.py``) are read by the same yardstick.
    """
    out: dict[str, dict[str, Any]] = {}
    near = near_threshold(reference, threshold)
    for name, p in variants.items():
        change = np.abs(p - reference)
        flipped = (p >= threshold) != (reference >= threshold)
        ci = group_bootstrap(lambda idx, f=flipped: {"flip_rate": float(f[idx].mean())}, len(flipped),
                             groups=groups, n_boot=n_boot, seed=seed)["flip_rate"]  # fmt: skip
        out[name] = {
            "median_abs_change": float(np.median(change)),
            "p90_abs_change": float(np.quantile(change, 0.9)),
            "max_abs_change": float(change.max()),
            "flip_rate": float(flipped.mean()),
            "flip_rate_ci95": [float(v) for v in ci],
            "flips": int(flipped.sum()),
            "flips_near_threshold": int((flipped & near).sum()),
            # what a reader who is told which verdicts are borderline can rely on: the flips among the rest
            "flip_rate_not_borderline": float(flipped[~near].mean()) if (~near).any() else None,
        }
    return out
