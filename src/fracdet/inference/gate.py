"""The input gate: no verdict for what is not a radiograph, and a warning for radiographs unlike the training data.

A fracture model answers every input it is given: an all-black image, noise, a photograph of a cat. The
gate stands before the verdict and gives one of three outcomes:

* ``refused`` (HTTP 422, an error row): not a plausible radiograph. Simple checks first, each with its own
  message: too small, non-finite values, blank or nearly uniform, a colour picture (radiographs are grey: more
  of it coloured than :func:`fracdet.data.decode.colour_fraction` allows; an arrow drawn on a radiograph
  is not enough); then how far the image *looks* from the training radiographs in a general-purpose
  feature space (ImageNet EfficientNet-Lite0, where photographs, pages, screenshots and noise are at home
  and far from radiographs), beyond the *appearance* limit; then the image's distance from the training
  radiographs in the model's own feature space, beyond the *refuse* limit.
* ``unusual``: a radiograph, but further from the training data than almost every validation radiograph
  (beyond the *warn* limit): answered, with a warning a reader sees.
* ``radiograph``: answered.

The distance (:class:`FeatureDistance`): the model's features at its registry's CAM layer, averaged over
positions (and over members of an ensemble), projected on their first principal components fitted on the
training radiographs; the Mahalanobis distance there (Ledoit-Wolf shrunk covariance, as in Lee et al. 2018)
plus the normalised energy left outside those components (so an input unlike anything seen, which the
components cannot express, is far too). Both limits are chosen on *validation* radiographs only
(quantiles of their distances); nothing about non-radiographs is fitted, so the catch rate measured on
them (``benchmarks/input_gate.py``) is an honest held-out figure. The appearance distance is the same
construction over the ImageNet features; the model's own features alone tell a grey photograph or a noise
field from a radiograph poorly (their distances overlap the validation radiographs'), the ImageNet features
well (``benchmarks/input_gate.py --dev``, a development set apart from the held-out one).

The gate travels with the model: ``gate.safetensors`` (the projection) and ``model.json`` ``gate`` (the
limits and how they were chosen), written by :func:`fit_gate` / ``fracdet gate``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fracdet.data.decode import ImageReadError
from fracdet.models.predict import network_parts, normalise, pooled_features
from fracdet.models.release import ModelLoadError, TrainedModel, check_sha256
from fracdet.utils.atomic import atomic_file
from fracdet.utils.cache import FeatureCache

__all__ = [
    "FeatureDistance",
    "GateLimits",
    "GateVerdict",
    "InputGate",
    "NotARadiographError",
    "appearance_embeddings",
    "fit_gate",
    "fit_gate_on_splits",
    "image_features",
    "save_gate",
]

#: Smallest side of a plausible radiograph, in pixels.
MIN_SIDE = 64
#: Below this standard deviation of the grey values (0-1), an image is blank or nearly uniform.
MIN_STD = 0.02
#: The coloured share of an image beyond which it is a colour picture, for a gate fitted without one.
COLOUR_FRACTION = 0.15
#: Principal components the distance keeps.
COMPONENTS = 64
#: Principal components of the appearance distance (ImageNet features). Chosen on the development set of
#: ``benchmarks/input_gate.py --dev`` (fewest photographs and CT/MR slices let through at the 0.995 limit,
#: 32-384 tried): with 32, grey photographs of smooth scenes sat inside the radiographs' spread.
APPEARANCE_COMPONENTS = 256
GATE_FILE = "gate.safetensors"


class NotARadiographError(ImageReadError):
    """The input gate refused the image: it is not a plausible radiograph (the message says why)."""


@dataclass(frozen=True)
class GateVerdict:
    """What the gate says about one image: ``outcome`` (radiograph, unusual, refused) and why."""

    outcome: str
    reason: str | None = None
    distance: float | None = None

    @property
    def refused(self) -> bool:
        return self.outcome == "refused"


@dataclass(frozen=True)
class GateLimits:
    """The limits of a fitted gate and where they came from (``model.json`` ``gate``)."""

    warn: float  # distance beyond which a radiograph is unusual
    refuse: float  # distance beyond which an image is not a plausible radiograph
    colour_fraction: float  # coloured share beyond which an image is a colour picture, not a radiograph
    fitted_on: str = ""
    chosen_on: str = ""
    warn_quantile: float = 0.99
    refuse_margin: float = 1.5
    appearance_refuse: float | None = None  # appearance distance beyond which an image is refused (None: no check)
    appearance_quantile: float = 0.995  # the validation quantile it is

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def image_features(
    model: TrainedModel, images: np.ndarray, *, batch_size: int = 32, progress_desc: str | None = None
) -> np.ndarray:
    """``(N, C)`` features of ``(N, H, W)`` uint8 images at the model's size: its CAM layer's activations
    (:func:`fracdet.models.predict.network_parts`) averaged over positions and over members, as the
    :class:`~fracdet.models.graph.ScoringGraph` that scores an image gives them.

    Args:
        progress_desc: show a progress bar with this label (``None``: silent).
    """
    from fracdet.utils.progress import progress_bar

    if model.graph is not None:  # a compiled model: the features of its own graph, as it scores
        from fracdet.models.compiled import compiled_outputs

        return compiled_outputs(model, images, batch_size=batch_size, progress_desc=progress_desc).features.astype(
            np.float64
        )
    device = next(model.module.parameters()).device
    was_training = model.module.training
    model.module.eval()
    bar = progress_bar(desc=progress_desc, total=len(images)) if progress_desc else None
    features = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).unsqueeze(1)
            _, activations = network_parts(model.module, normalise(chunk.to(device), model.preprocess))
            features.append(pooled_features(activations).cpu())
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        model.module.train(was_training)
    return torch.cat(features).numpy().astype(np.float64) if features else np.zeros((0, 0))


class FeatureDistance:
    """Distance of feature vectors from the training radiographs (see the module docstring)."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, precision: np.ndarray, residual_var: float):
        self.mean, self.components, self.precision, self.residual_var = mean, components, precision, residual_var

    @classmethod
    def fit(cls, features: np.ndarray, components: int = COMPONENTS) -> FeatureDistance:
        from sklearn.covariance import LedoitWolf
        from sklearn.decomposition import PCA

        k = min(components, features.shape[0] - 1, features.shape[1])
        pca = PCA(n_components=k, random_state=0).fit(features)
        projected = pca.transform(features)
        precision = LedoitWolf().fit(projected).precision_
        residual = features - pca.inverse_transform(projected)
        residual_var = float((residual**2).sum(axis=1).mean()) or 1.0
        return cls(pca.mean_, pca.components_, precision, residual_var)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        centred = np.atleast_2d(features) - self.mean
        projected = centred @ self.components.T
        mahalanobis = np.einsum("nk,kl,nl->n", projected, self.precision, projected)
        residual = ((centred - projected @ self.components) ** 2).sum(axis=1) / self.residual_var
        return np.sqrt(mahalanobis + len(self.precision) * residual)

    def tensors(self) -> dict[str, torch.Tensor]:
        arrays = {"mean": self.mean, "components": self.components, "precision": self.precision}
        return {**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                "residual_var": torch.tensor([self.residual_var], dtype=torch.float64)}  # fmt: skip

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> FeatureDistance:
        return cls(t["mean"].numpy(), t["components"].numpy(), t["precision"].numpy(), float(t["residual_var"][0]))


class InputGate:
    """The gate of one model: simple checks, then (when fitted) the feature distance against its limits."""

    def __init__(
        self,
        model: TrainedModel,
        distance: FeatureDistance | None,
        limits: GateLimits | None,
        appearance: FeatureDistance | None = None,
    ) -> None:
        self.model, self.distance, self.limits, self.appearance = model, distance, limits, appearance
        self._embedder: Any = None

    @classmethod
    def of(cls, model: TrainedModel) -> InputGate:
        """The gate stored with ``model`` (only the simple checks when it has none)."""
        meta = model.meta.get("gate")
        path = model.folder / GATE_FILE if model.folder else None
        if not meta or path is None or not path.is_file():
            return cls(model, None, None)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        check_sha256(path, model.meta.get("gate_sha256"))
        try:
            tensors = load_file(path)
        except SafetensorError as exc:
            raise ModelLoadError(f"{path}: cannot be read as the model's input gate ({exc})") from None
        own = {k: v for k, v in tensors.items() if "." not in k}
        looks = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("appearance.")}
        appearance = FeatureDistance.from_tensors(looks) if looks else None
        return cls(model, FeatureDistance.from_tensors(own), GateLimits(**meta), appearance)

    @property
    def fitted(self) -> bool:
        return self.distance is not None and self.limits is not None

    def simple_checks(self, pixels: np.ndarray, colour_fraction: float = 0.0) -> str | None:
        """Why ``pixels`` (grey, [0, 1], any size) cannot be a radiograph, or ``None``."""
        h, w = pixels.shape[:2]
        if min(h, w) < MIN_SIDE:
            return f"image too small to be a radiograph: {w}x{h} pixels (at least {MIN_SIDE} a side)"
        if not np.isfinite(pixels).all():
            return "image holds non-finite values (NaN or infinity): not a radiograph"
        if float(pixels.std()) < MIN_STD:
            return "image is blank or nearly uniform: nothing to read"
        limit = self.limits.colour_fraction if self.limits else COLOUR_FRACTION
        if colour_fraction > limit:
            return f"a colour image ({colour_fraction:.0%} of it coloured > {limit:.0%}): radiographs are grey"
        return None

    @property
    def checks_appearance(self) -> bool:
        """Whether the gate refuses by appearance: it then needs the embedding of every image (one forward of
        the ImageNet embedder, about 9 ms on a CPU core in PyTorch; inside the model's graph in ONNX)."""
        return self.appearance is not None and self.limits is not None and self.limits.appearance_refuse is not None

    def embedder(self) -> Any:
        """The appearance embedder (:func:`appearance_embedder`), made once."""
        if self._embedder is None:
            self._embedder = appearance_embedder()
        return self._embedder

    def appearance_check(self, embedding: np.ndarray | None) -> str | None:
        """Why an image whose appearance embedding is ``embedding`` does not look like a radiograph, or ``None``."""
        if not self.checks_appearance or embedding is None:
            return None
        distance = float(self.appearance(np.asarray(embedding, np.float64).reshape(1, -1))[0])
        if distance > self.limits.appearance_refuse:
            return (f"does not look like a radiograph (appearance distance {distance:.1f} from the training "
                    f"radiographs > {self.limits.appearance_refuse:.1f})")  # fmt: skip
        return None

    def judge(self, features: np.ndarray | None) -> GateVerdict:
        """The distance verdict on one image that passed :meth:`simple_checks`: ``features`` are its model
        features (the ``features`` of the forward that scored it; ``None``: nothing to judge)."""
        if not self.fitted or features is None:
            return GateVerdict("radiograph")
        distance = float(self.distance(np.asarray(features, np.float64))[0])
        if distance > self.limits.refuse:
            return GateVerdict("refused", f"does not look like a radiograph (distance {distance:.1f} from the "
                                          f"training radiographs > {self.limits.refuse:.1f})", distance)  # fmt: skip
        if distance > self.limits.warn:
            return GateVerdict("unusual", "a radiograph unlike those the model was trained on (distance "
                                          f"{distance:.1f} > {self.limits.warn:.1f}): read the result with care",
                               distance)  # fmt: skip
        return GateVerdict("radiograph", None, distance)


def colour_limit(val_colour_fractions: np.ndarray, margin: float = 1.5) -> float:
    """The coloured share beyond which an image is refused: ``margin`` times the most coloured validation
    radiograph (annotated ones carry coloured arrows), and never below :data:`COLOUR_FRACTION`."""
    return float(max(COLOUR_FRACTION, margin * float(np.max(val_colour_fractions, initial=0.0))))


def fit_gate(
    model: TrainedModel,
    train_images: np.ndarray,
    val_images: np.ndarray,
    val_colour_fractions: np.ndarray,
    *,
    warn_quantile: float = 0.99,
    refuse_margin: float = 1.5,
    appearance_quantile: float = 0.995,
    appearance_train: np.ndarray | None = None,
    fitted_on: str = "",
    chosen_on: str = "",
) -> tuple[FeatureDistance, GateLimits, np.ndarray, FeatureDistance]:
    """Fit the distances on training radiographs and choose the limits on validation radiographs.

    ``appearance_train``: more training radiographs (other sources, at the model's size) that join
    ``train_images`` in the appearance fit only. The appearance distance asks "is this a radiograph at all",
    so it should know radiographs of every source the limits are chosen on; fitted on FracAtlas alone, the
    multiregion validation radiographs widened the limit until grey photographs passed. The model's own
    distance asks "is this like what the model learnt from" and stays fitted on its training split.

    *warn* is the ``warn_quantile`` of the validation distances; *refuse* is ``refuse_margin`` times the
    largest validation distance; the colour limit is :func:`colour_limit` of the validation radiographs; the
    appearance limit is the ``appearance_quantile`` of their appearance distances (0.995: about one
    validation radiograph in 200 refused; on the development set of ``benchmarks/input_gate.py --dev`` the
    largest validation distance let most noise through, see ``docs/RELIABILITY.md``).
    Returns the distance, the limits, the validation distances (to report what the choice saw) and the
    appearance distance.
    """
    train_features, looks = _gate_inputs(model, train_images, "train")
    val_features, val_looks = _gate_inputs(model, val_images, "val")
    distance = FeatureDistance.fit(train_features)
    val = distance(val_features)
    if appearance_train is not None and len(appearance_train):
        looks = np.concatenate([looks, appearance_embeddings(model, appearance_train)])
    appearance = FeatureDistance.fit(looks.astype(np.float64), APPEARANCE_COMPONENTS)
    val_appearance = appearance(val_looks.astype(np.float64))
    limits = GateLimits(
        appearance_refuse=float(np.quantile(val_appearance, appearance_quantile)),
        appearance_quantile=appearance_quantile,
        warn=float(np.quantile(val, warn_quantile)),
        refuse=float(refuse_margin * val.max()),
        colour_fraction=colour_limit(val_colour_fractions, refuse_margin),
        fitted_on=fitted_on,
        chosen_on=chosen_on,
        warn_quantile=warn_quantile,
        refuse_margin=refuse_margin,
    )
    return distance, limits, val, appearance


def _gate_inputs(model: TrainedModel, images: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The model features and appearance embeddings of ``images``: from one pass of a compiled model's graph,
    which computes both; else from the model and the ImageNet embedder, each its own network."""
    if model.graph is not None:
        from fracdet.models.compiled import compiled_outputs

        out = compiled_outputs(model, images, progress_desc=f"features of {split}")
        if out.embedding is None:
            raise ValueError(f"{model.graph} has no appearance embedder: compile it with the gate's embedder")
        return out.features.astype(np.float64), out.embedding
    return image_features(model, images, progress_desc=f"features of {split}"), appearance_embeddings(model, images)


def appearance_embeddings(model: TrainedModel, images: np.ndarray) -> np.ndarray:
    """Appearance embeddings of ``(N, H, W)`` uint8 images at the model's size, as its predictions compute them:
    by the ImageNet embedder, or, for a compiled model, by the (quantised) embedder inside its graph."""
    if model.graph is not None:
        from fracdet.models.compiled import compiled_outputs

        embedding = compiled_outputs(model, images, progress_desc="appearance").embedding
        if embedding is None:
            raise ValueError(f"{model.graph} has no appearance embedder: compile it with the gate's embedder")
        return embedding
    return appearance_embedder()(list(images))


def appearance_embedder() -> Any:
    """The general-purpose embedder of the appearance check: ImageNet EfficientNet-Lite0 at 128 px."""
    from fracdet.data.embed import ImageEmbedder

    return ImageEmbedder(variant=0, size=128)


def save_gate(
    model: TrainedModel,
    distance: FeatureDistance,
    limits: GateLimits,
    folder: str | Path,
    appearance: FeatureDistance | None = None,
) -> Path:
    """Write ``gate.safetensors`` beside the model and its limits into ``model.json`` (and a compiled model's
    graph, which carries its ``model.json``: :func:`fracdet.models.compiled.seal_graph`)."""
    import json

    from safetensors.torch import save_file

    from fracdet.utils.atomic import write_json
    from fracdet.utils.hashing import sha256_file

    folder = Path(folder)
    tensors = distance.tensors()
    if appearance is not None:
        tensors.update({f"appearance.{k}": v for k, v in appearance.tensors().items()})
    with atomic_file(folder / GATE_FILE) as tmp:
        save_file(tensors, str(tmp))
    meta = json.loads((folder / "model.json").read_text())
    meta["gate"] = limits.to_dict()
    meta["gate_sha256"] = sha256_file(folder / GATE_FILE)
    write_json(folder / "model.json", meta)
    if "graph" in meta:
        from fracdet.models.compiled import seal_graph

        seal_graph(folder)
    model.meta.update(gate=limits.to_dict(), gate_sha256=meta["gate_sha256"])
    return folder / GATE_FILE


def fit_gate_on_splits(
    model: TrainedModel,
    table: pd.DataFrame,
    *,
    extra: Sequence[pd.DataFrame] = (),
    cache: FeatureCache | None = None,
) -> tuple[FeatureDistance, GateLimits, dict[str, Any], FeatureDistance]:
    """Fit ``model``'s gate on the ``train`` rows of ``table`` and choose its limits on validation radiographs.

    Args:
        table: a sample table with a ``split`` column (the model's own split manifest applied).
        extra: other radiograph datasets with a ``split`` column, so radiographs from other sources
            (multiregion) are not refused: their ``val`` rows join the validation radiographs the limits are
            chosen on, their ``train`` rows the appearance fit (see :func:`fit_gate`). Give them a
            leakage-free split: copies of validation images in the fit would make the limits too tight.

    Returns the distance, the limits, a summary of what the choice saw (validation distance quantiles) and
    the appearance distance.
    """
    from fracdet.data.decode import decode_image, read_file
    from fracdet.data.pixels import load_pixels
    from fracdet.data.split import split_rows
    from fracdet.data.table import absolute_paths

    size = model.preprocess.input_size

    def rows(table: pd.DataFrame, split: str) -> pd.DataFrame:
        return split_rows(table, split, needed_for="to fit the input gate on")

    train = rows(table, "train")
    vals = [rows(table, "val"), *(rows(t, "val") for t in extra)]
    train_pixels = load_pixels(train, size, cache=cache, desc="decoding train").images
    others = [load_pixels(rows(t, "train"), size, cache=cache, desc="decoding other train").images for t in extra]
    other_pixels = np.concatenate(others) if others else None
    val_sets = [load_pixels(v, size, cache=cache, desc="decoding val") for v in vals]
    val_pixels = np.concatenate([v.images for v in val_sets])
    colour = []
    for v in val_sets:
        for path in absolute_paths(v.table):
            colour.append(decode_image(read_file(path), name=str(path), measure_colour=True).colour_fraction)
    names = [Path(str(t.attrs.get("root", "dataset"))).name for t in (table, *extra)]
    fitted_on = f"train split of {names[0]} ({len(train_pixels)} radiographs)"
    if other_pixels is not None:
        fitted_on += f"; appearance also on the train splits of {', '.join(names[1:])} ({len(other_pixels)})"
    chosen_on = f"val splits of {', '.join(names)} ({len(val_pixels)} radiographs)"
    distance, limits, val, appearance = fit_gate(model, train_pixels, val_pixels, np.asarray(colour),
                                                 appearance_train=other_pixels, fitted_on=fitted_on,
                                                 chosen_on=chosen_on)  # fmt: skip
    summary = {"val_distance_quantiles": {f"{q:g}": float(np.quantile(val, q)) for q in (0.5, 0.9, 0.99, 1.0)},
               "val_colour_fraction_max": float(max(colour, default=0.0)), "train_images": len(train_pixels),
               "val_images": len(val_pixels)}  # fmt: skip
    return distance, limits, summary, appearance
