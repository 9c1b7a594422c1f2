"""Ensembles: trained networks that answer as one (classifiers average their logits; a localiser fuses them).

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

A localiser combines with classifiers differently (:class:`FusedLocaliser`): its map and boxes stay its own,
and the classifiers' margins join its image logit with weights fitted on validation, beside its own
classifier head and map peak (the fusion lever of issue 15: a localiser's ranking and 0.3.0's are far from
identical, so together they rank better than either)::

    fused = combine([load("runs/localiser-lite0-256-seed0"), load("fracatlas-classifier")])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from fracdet.models._registry import PreprocessCfg, build_options, create_model
from fracdet.models.predict import logit_margin, network_parts
from fracdet.models.release import TrainedModel

__all__ = ["Ensemble", "FusedLocaliser", "combine", "create_fused", "members_of"]


class Ensemble(nn.Module):
    """Mean of the members' logits (for two classes: the mean of their logit margins)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two members")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_parts(x)[0]

    def forward_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The mean logits and each member's CAM-layer activations (:func:`fracdet.models.predict.network_parts`)."""
        parts = [network_parts(member, x) for member in self.members]
        return torch.stack([logits for logits, _ in parts]).mean(dim=0), [a for _, acts in parts for a in acts]


class FusedLocaliser(nn.Module):
    """A localiser whose image logit also weighs whole classifiers' margins; its map and boxes stay its own.

    The input is the largest member's; each member sees it resized to its own side inside the network
    (antialiased bilinear, which exports to ONNX), so one forward pass and one ONNX graph give everything.
    ``fusion`` extends the localiser's own layout: ``(classifier head, map peak, bias, *classifier margins)``,
    ``(1, 0, 0, 0, ...)`` until :func:`fracdet.training.calibrate.fit_fusion` fits it on validation. The
    localiser's own fusion is reset to its classifier head, so that each part enters once.

    In training mode the forward pass also returns each part's own image logit (the classifier head's and
    each classifier's margin, ``(B, 1 + classifiers)``), as Inception returns its auxiliary logits, so that
    each part can learn the label beside the fused score (``part_weight`` of
    :func:`fracdet.training.losses.task_loss`).

    Args:
        localiser: a :class:`fracdet.models.localiser.FractureLocaliser`.
        classifiers: two-class networks (``(B, 2)`` logits).
        sizes: the input side of the localiser, then of each classifier.
        names: one label per classifier, for ``model.json``'s ``fusion``.
    """

    def __init__(self, localiser: nn.Module, classifiers: Sequence[nn.Module], *, sizes: Sequence[int],
                 names: Sequence[str]) -> None:  # fmt: skip
        super().__init__()
        if not classifiers or len(sizes) != len(classifiers) + 1 or len(names) != len(classifiers):
            raise ValueError("a fused localiser needs one or more classifiers, with one input side and name each")
        self.localiser = localiser
        self.classifiers = nn.ModuleList(classifiers)
        self.sizes = tuple(int(s) for s in sizes)
        self.fusion_names = ("classifier", "map_peak", "bias", *names)
        with torch.no_grad():
            self.localiser.fusion.copy_(torch.tensor([1.0, 0.0, 0.0]))
        self.register_buffer("fusion", torch.tensor([1.0, 0.0, 0.0] + [0.0] * len(classifiers)))

    @property
    def box_head(self) -> nn.Module | None:
        """The localiser's box head (a detector regresses its boxes; a map head grows them)."""
        return self.localiser.box_head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts, dense, _ = self._parts(x)
        if self.training:  # and each part's own image logit (not the map's peak, which the map loss teaches)
            return parts @ self.fusion, dense, parts[:, [0, *range(3, parts.shape[1])]]
        return parts @ self.fusion, dense

    def weigh_parts_alike(self) -> FusedLocaliser:
        """The mean of the classifier head, the map's peak and each classifier's margin, without bias: where a
        fused model trained as one starts, so that every part gets a gradient from the fused score (a part
        weighed 0 gets none)."""
        with torch.no_grad():
            weights = torch.ones_like(self.fusion)
            weights[2] = 0.0
            self.fusion.copy_(weights / weights.sum())
        return self

    def forward_parts(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], list[torch.Tensor]]:
        """The evaluation outputs and the localiser's CAM-layer activations (its map explains the model)."""
        parts, dense, activations = self._parts(x)
        return (parts @ self.fusion, dense), activations

    def fusion_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, P)``: what :attr:`fusion` weighs, per image, in :attr:`fusion_names` order (the bias's
        column is 1), so that ``fusion_inputs(x) @ fusion`` is the image logit. Says which part moves the
        verdict when an image changes (``scripts/flip_parts.py``)."""
        return self._parts(x)[0]

    def _parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        (head_logit, dense), activations = self.localiser.forward_parts(_resized(x, self.sizes[0]))
        columns = [head_logit, dense[:, 0].flatten(1).amax(dim=1), torch.ones_like(head_logit)]
        columns += [logit_margin(c(_resized(x, s))) for c, s in zip(self.classifiers, self.sizes[1:], strict=True)]
        return torch.stack(columns, dim=1), dense, activations


def create_fused(parts: Sequence[Mapping[str, Any]], *, pretrained: bool = False) -> FusedLocaliser:
    """The :class:`FusedLocaliser` that ``parts`` describe as ``model.json``'s ``fused`` does: the localiser,
    then each classifier, each a mapping of its registry ``model``, ``input_size``, build options
    (:data:`fracdet.models.BUILD_OPTIONS`) and ``name`` (a classifier's key in the fusion).

    ``pretrained``: every part starts from its ImageNet weights (a fused model trained as one); else the
    parts are empty, for saved weights to fill.
    """
    networks = [create_model(p["model"], pretrained=pretrained, input_size=p["input_size"], **build_options(p))
                for p in parts]  # fmt: skip
    return FusedLocaliser(networks[0], networks[1:], sizes=[p["input_size"] for p in parts],
                          names=[p.get("name", p["model"]) for p in parts[1:]])  # fmt: skip


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def members_of(module: nn.Module) -> list[nn.Module]:
    """The networks inside ``module`` whose layers explain it: an :class:`Ensemble`'s members, a
    :class:`FusedLocaliser`'s localiser (its map is the explanation), else ``module`` itself."""
    if isinstance(module, FusedLocaliser):
        return [module.localiser]
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
    localisers = [m for m in models if m.task == "localise"]
    if localisers:
        return _fuse(models, name=name)
    first = models[0]
    for other in models[1:]:
        if (other.arch, other.preprocess, build_options(other.meta)) != (first.arch, first.preprocess,
                                                                          build_options(first.meta)):  # fmt: skip
            raise ValueError(
                f"{other.name} ({other.arch}, {other.preprocess}, {build_options(other.meta)}) differs from "
                f"{first.name} ({first.arch}, {first.preprocess}, {build_options(first.meta)}): members must share "
                "architecture and preprocessing"
            )
        if _manifest(other) != _manifest(first):
            raise ValueError(
                f"{other.name} and {first.name} were trained on different split manifests: one could have "
                "seen the other's validation or test images"
            )
    if any(isinstance(m.network("join an ensemble"), Ensemble) for m in models):
        raise ValueError("members must be single networks, not ensembles")
    selected = {str(m.meta.get("selected_on", "val")) for m in models}
    meta = {
        "model": first.arch,
        "input_size": first.preprocess.input_size,
        "mean": list(first.preprocess.mean),
        "std": list(first.preprocess.std),
        **build_options(first.meta),
        "members": [m.label for m in models],
        "selected_on": "test" if "test" in selected else "val",
        "monitor": first.meta.get("monitor"),
    }
    module = Ensemble([m.module for m in models]).eval()
    return TrainedModel(module=module, name=name, arch=first.arch, preprocess=first.preprocess, meta=meta)


def _fuse(models: Sequence[TrainedModel], *, name: str) -> TrainedModel:
    """One localiser and classifiers -> a :class:`FusedLocaliser` (see :func:`combine`)."""
    localisers = [m for m in models if m.task == "localise"]
    if len(localisers) > 1:
        raise ValueError("a fused model holds one localiser (its map and boxes), not several")
    localiser = localisers[0]
    classifiers = [m for m in models if m is not localiser]
    for other in classifiers:
        if (other.preprocess.mean, other.preprocess.std) != (localiser.preprocess.mean, localiser.preprocess.std):
            raise ValueError(f"{other.name} normalises its input otherwise than {localiser.name}: members must share "
                             "mean and std")  # fmt: skip
        if isinstance(other.network("join a fused model"), (Ensemble, FusedLocaliser)):
            raise ValueError("members must be single networks, not ensembles")
        if _manifest(other) != _manifest(localiser):
            raise ValueError(
                f"{other.name} and {localiser.name} were trained on different split manifests: one could have "
                "seen the other's validation or test images"
            )
    sizes = [m.preprocess.input_size for m in (localiser, *classifiers)]
    if max(sizes) % 32:
        raise ValueError(f"the largest member's input side ({max(sizes)} px) must be a multiple of 32")
    labels = [m.label for m in models]
    names = [f"{m.name} {m.version}" if m.meta.get("version") else m.name for m in classifiers]
    module = FusedLocaliser(localiser.network("join a fused model"), [m.module for m in classifiers], sizes=sizes,
                            names=names).eval()  # fmt: skip
    preprocess = PreprocessCfg(max(sizes), localiser.preprocess.mean, localiser.preprocess.std)
    selected = {str(m.meta.get("selected_on", "val")) for m in models}
    meta = {
        "model": localiser.arch,
        "input_size": preprocess.input_size,
        "mean": list(preprocess.mean),
        "std": list(preprocess.std),
        **build_options(localiser.meta),
        "members": labels,
        "fused": [
            {"model": m.arch, "input_size": m.preprocess.input_size, **build_options(m.meta), "name": n}
            for m, n in zip((localiser, *classifiers), (localiser.name, *names), strict=True)
        ],
        "selected_on": "test" if "test" in selected else "val",
        "monitor": localiser.meta.get("monitor"),
    }
    return TrainedModel(module=module, name=name, arch=localiser.arch, preprocess=preprocess, meta=meta)


def _manifest(model: TrainedModel) -> bytes | None:
    path = model.splits_path
    return path.read_bytes() if path else None
