"""A classifier made to score one radiograph at its flag and another far from it, for the tests of what a
reader is told about a borderline verdict (a paper CNN with random weights scores every file alike)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from scipy.special import logit

from fracdet.inference import Predictor
from fracdet.models.release import TrainedModel


def at_the_flag(model: TrainedModel, files: Sequence[bytes], *, spread: float = 6.0) -> TrainedModel:
    """A copy of ``model`` (a ``paper_cnn``) whose last layer is scaled and shifted so that the first of two
    files scores at its threshold of 0.5 and the second ``spread`` logits from it."""
    predictor = Predictor(model)
    near, far = (float(logit(predictor.predict_bytes(data).probability)) * model.temperature for data in files)
    assert abs(far - near) > 1e-5, "the two files must score apart"
    module = copy.deepcopy(model.module)
    last = module.classifier[-1]  # two outputs: the margin is the second less the first
    with torch.no_grad():
        gap = float(last.bias[1] - last.bias[0])
        scale = spread / abs(far - near)
        last.weight.mul_(scale)
        last.bias.copy_(torch.tensor([0.0, -scale * (near - gap)]))
    return TrainedModel(module=module, name=f"{model.name}-at-the-flag", arch=model.arch, preprocess=model.preprocess,
                        threshold=0.5)  # fmt: skip
