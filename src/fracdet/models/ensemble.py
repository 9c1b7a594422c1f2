"""Ensembles: several trained networks of one architecture that answer as one by averaging their logits.

The paper names ensembles as future work. Here the members are usually one recipe trained with
different seeds: each run ends somewhere else (on FracAtlas three seeds of the default recipe give test
AUC 0.898-0.905 and, at the validation sens90 threshold, specificity 0.62-0.75), and averaging the logit
margins cancels part of that noise at the price of one forward pass per member (docs/RESULTS.md, study 4:
the 3-seed ensemble reaches AUC 0.910 and specificity 0.750).

An ensemble is stored like any trained model (``model.safetensors`` holding ``members.K.*`` weights, and
``model.json`` with ``members``), so :func:`fracdet.models.load`, ``fracdet evaluate``, ``predict`` and
``serve`` take it unchanged. Its temperature and thresholds belong to the averaged margins and are fitted
on validation again (:func:`fracdet.training.calibrate.calibrate`); a member's are never reused::

    from fracdet.models import combine, load
    ensemble = combine([load("runs/a"), load("runs/b"), load("runs/c")])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fracdet.models.release import TrainedModel

__all__ = ["Ensemble", "combine", "members_of"]


class Ensemble(nn.Module):
    """Mean of the members' logits (for two classes: the mean of their logit margins)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


def members_of(module: nn.Module) -> list[nn.Module]:
    """The networks inside ``module``: its members for an :class:`Ensemble`, else itself."""
    return list(module.members) if isinstance(module, Ensemble) else [module]


def combine(models: Sequence[TrainedModel], *, name: str = "ensemble") -> TrainedModel:
    """One model from several trained on the same split, with the same architecture and preprocessing.

    The result is uncalibrated (temperature 1, threshold 0.5) until
    :func:`fracdet.training.calibrate.calibrate` fits it on validation.

    Raises:
        ValueError: fewer than two models, or models that differ in architecture, preprocessing or
            split manifest (a member trained on another split may have seen this one's test images).
    """
    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    if any(m.task != "classify" for m in models):
        raise ValueError("ensembles average classifiers' logits; localisers (boxes and maps) cannot be combined yet")
    first = models[0]
    for other in models[1:]:
        if (other.arch, other.preprocess) != (first.arch, first.preprocess):
            raise ValueError(
                f"{other.name} ({other.arch}, {other.preprocess}) differs from {first.name} "
                f"({first.arch}, {first.preprocess}): members must share architecture and preprocessing"
            )
        if _manifest(other) != _manifest(first):
            raise ValueError(
                f"{other.name} and {first.name} were trained on different split manifests: one could have "
                "seen the other's validation or test images"
            )
    if any(isinstance(m.module, Ensemble) for m in models):
        raise ValueError("members must be single networks, not ensembles")
    selected = {str(m.meta.get("selected_on", "val")) for m in models}
    meta = {
        "model": first.arch,
        "input_size": first.preprocess.input_size,
        "mean": list(first.preprocess.mean),
        "std": list(first.preprocess.std),
        "dropout": first.meta.get("dropout"),
        "members": [m.name if m.folder is None else str(m.folder) for m in models],
        "selected_on": "test" if "test" in selected else "val",
        "monitor": first.meta.get("monitor"),
    }
    module = Ensemble([m.module for m in models]).eval()
    return TrainedModel(module=module, name=name, arch=first.arch, preprocess=first.preprocess, meta=meta)


def _manifest(model: TrainedModel) -> bytes | None:
    path = model.splits_path
    return path.read_bytes() if path else None
