"""From cached grey pixels to fracture scores: the one forward path shared by training, evaluation and serving.

A two-class softmax is a logistic on the logit difference, so a model's output is summarised as one
*margin* per image (fracture logit minus no-fracture logit). Probabilities are ``sigmoid(margin / T)``;
temperature scaling (``T`` fitted on validation) is then a single division.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fracdet.models._registry import PreprocessCfg

__all__ = ["normalise", "predict_margins", "select_device"]


def select_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for, but PyTorch sees no GPU")
    return torch.device(name)


def normalise(batch: torch.Tensor, preprocess: PreprocessCfg) -> torch.Tensor:
    """``(B, 1, H, W)`` uint8 grey -> ``(B, 3, H, W)`` float, normalised as the model expects."""
    x = batch.float().div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(preprocess.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def predict_margins(
    model: nn.Module,
    images: np.ndarray,
    preprocess: PreprocessCfg,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    tta: bool = False,
    progress_desc: str | None = None,
) -> np.ndarray:
    """Logit margins (fracture minus no fracture) of ``(N, H, W)`` uint8 images, in order.

    Args:
        tta: test-time augmentation: average the margins of the image and its horizontal mirror.
        progress_desc: show a progress bar with this label (``None``: silent).
    """
    from fracdet.utils.progress import progress_bar

    device = torch.device(device)
    was_training = model.training
    model.eval()
    out = np.zeros(len(images), np.float32)
    bar = progress_bar(desc=progress_desc or "", total=len(images)) if progress_desc else None
    try:
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).unsqueeze(1)
            x = normalise(chunk.to(device), preprocess)
            logits = model(x).float()
            margin = logits[:, 1] - logits[:, 0]
            if tta:
                flipped = model(torch.flip(x, dims=[3])).float()
                margin = (margin + flipped[:, 1] - flipped[:, 0]) / 2
            out[start : start + len(chunk)] = margin.cpu().numpy()
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return out
