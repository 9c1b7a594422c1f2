"""Does a verdict flip as often when a radiograph moves by a pixel as when it is re-saved?

    python scripts/shift_flips.py MODEL --data DATASET [--split val] [--out FILE.json]

A re-save changes an image's finest detail without changing what it shows; so does moving it by a pixel
or two. A network whose downsampling aliases (strided convolutions that sample without first removing what
the coarser grid cannot hold) answers both with changes of its score that look like noise, and training
against one kind of change would not make it steady under the other. Each file of the split is scored as
read, moved right and down by 1 and by 2 pixels at its own resolution (the row and column uncovered repeat
the edge; nothing is blurred or rescaled), and re-saved as :data:`fracdet.evaluation.stability.VARIANTS`
does (JPEG q75, WebP q80, half size), all in one run, with the figures of ``fracdet evaluate --stability``:
probability changes and verdict flips at the model's threshold with 95% group-bootstrap intervals.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torchvision import tv_tensors

from _split_scripts import model_and_rows, report, split_parser
from fracdet.data.table import absolute_paths
from fracdet.evaluation.stability import VARIANTS, verdict_stability
from fracdet.training.augment import Shift


def shifted(pixels: np.ndarray, by: int) -> np.ndarray:
    """The image moved right and down by ``by`` pixels, as stability training's :class:`Shift` moves its copy."""
    channels_first = torch.from_numpy(np.ascontiguousarray(np.atleast_3d(pixels).transpose(2, 0, 1)))
    moved = Shift(by).transform(tv_tensors.Image(channels_first), {"down": by, "right": by})
    return moved.numpy().transpose(1, 2, 0).reshape(pixels.shape)


def main() -> None:
    args = split_parser(__doc__).parse_args()
    model, rows = model_and_rows(args, needed_for="to move and re-save")
    variants = {"shift1": functools.partial(shifted, by=1), "shift2": functools.partial(shifted, by=2)}
    variants |= {name: VARIANTS[name] for name in ("jpeg75", "webp80", "half")}
    figures = verdict_stability(model, list(absolute_paths(rows)), rows["group"].astype(str).tolist(),
                                threshold=model.threshold, variants=variants)  # fmt: skip
    report({"model": f"{model.name} {model.version}", "split": args.split, **figures}, args.out)


if __name__ == "__main__":
    main()
