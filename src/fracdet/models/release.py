"""Trained models ready to use: the released ones shipped in ``models/``, run folders, checkpoints.

A trained model is a folder with ``model.safetensors`` (weights) and ``model.json`` (architecture, its
task, input size, normalisation, the temperature and operating thresholds fitted on validation, and a
schema version), and usually ``splits.csv`` (the manifest it was trained on). ``fracdet train`` writes one
into every run folder; a release is such a folder copied to ``models/NAME/``. A *compiled* model (an int8
graph made by ``fracdet quantize``) has an ONNX graph instead of weights, named by ``model.json`` ``graph``,
with everything fitted on that graph's own outputs (:mod:`fracdet.models.compiled`); it loads and scores
the same way::

    from fracdet.models import load
    model = load("fracatlas-default")          # on the CPU
    model.predict_proba(images)                # (N, H, W) uint8 at model.preprocess.input_size
    model.score(images)                        # probabilities, and a localiser's map and boxes
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fracdet.models._registry import BUILD_OPTIONS, PreprocessCfg, build_options, create_model, get_spec
from fracdet.models.predict import predict_scores
from fracdet.models.scoring import Scores, level_thresholds, scores_from_outputs
from fracdet.utils.atomic import atomic_file, atomic_write_text, write_json

__all__ = [
    "GRAPH_SCHEMA_VERSION",
    "SCHEMA_VERSION",
    "ModelLoadError",
    "NoWeightsError",
    "TrainedModel",
    "check_sha256",
    "list_releases",
    "load",
    "package_release",
    "rebuilt",
    "releases_dir",
    "save_model",
]

#: Version of the ``model.json`` layout. 1: fracdet <= 0.3.0 releases (no ``schema_version`` key, classify
#: only); 2: adds ``task``, ``schema_version`` and, for localisers, ``fusion``; 3: adds ``graph``, a compiled
#: model without PyTorch weights (:mod:`fracdet.models.compiled`); 4: adds the build option ``antialias``
#: (:data:`fracdet.models.BUILD_OPTIONS`), in the model or any fused part. Every version still loads.
SCHEMA_VERSION = 4
#: What a model with weights is written as: its layout has not changed since 2, so older fracdet still reads it;
#: an anti-aliased one is written as 4, so that older fracdet refuses it instead of building it without its
#: low-pass (the weights would load, and score otherwise).
WEIGHTS_SCHEMA_VERSION = 2
ANTIALIASED_SCHEMA_VERSION = 4
#: What a compiled model is written as: its graph holds the low-pass, if any, so fracdet that reads 3 runs it.
GRAPH_SCHEMA_VERSION = 3

#: Files of a run folder that travel with a release (weights, calibration, and how it was made).
RELEASE_FILES = (
    "model.safetensors",
    "model.onnx",  # a compiled model's graph, instead of the weights
    "gate.safetensors",
    "model.json",
    "splits.csv",
    "config.yaml",
    "metrics.csv",
    "curves.png",
    "run.json",
)


#: Lesion-level figures of a localiser's test report that its release keeps (value and 95% interval).
REPORTED_LESION_FIGURES = (
    "localised_sensitivity_iou@suspicious",
    "localised_sensitivity_centre@suspicious",
    "localised_sensitivity_iou@definite",
    "froc_iou@1",
    "map50_fractured",
    "false_boxes_per_normal@suspicious",
    "false_boxes_per_normal@definite",
)


def releases_dir() -> Path:
    """``$FRACDET_MODELS``, else the repository's ``models/`` folder."""
    if env := os.environ.get("FRACDET_MODELS"):
        return Path(env)
    return Path(__file__).resolve().parents[3] / "models"


def list_releases() -> list[str]:
    """Names of the released models (folders of :func:`releases_dir` holding a ``model.json``)."""
    root = releases_dir()
    return sorted(p.parent.name for p in root.glob("*/model.json")) if root.is_dir() else []


class NoWeightsError(ValueError):
    """A compiled model (an ONNX graph, no PyTorch weights) was asked for what only weights can do."""


class ModelLoadError(ValueError):
    """A model folder or checkpoint that exists but cannot be what it says: damaged, half copied, replaced,
    or written by something else. The message names the file and why, never with a traceback's detail."""


@dataclass
class TrainedModel:
    """A network with everything needed to turn pixels into a calibrated verdict.

    Attributes:
        module: the network, in eval mode.
        name: release name or folder name.
        arch: registry name of the architecture.
        preprocess: input size and normalisation.
        temperature: divides the logit margin before the sigmoid (fitted on validation).
        threshold: probability at or above which the verdict is "fracture" (chosen on validation).
        operating_point: which rule chose ``threshold`` (``sens90``: sensitivity 0.90 on validation).
        thresholds: every named operating point.
        tta: score every image as the mean of it and its mirror image. Part of the model, not a
            serving option: the temperature and thresholds were fitted on margins scored this way.
        meta: the whole ``model.json``.
        folder: where it was loaded from.
        graph: a compiled model's ONNX graph, which is then its whole arithmetic (``module`` is ``None``:
            there are no PyTorch weights); ``None`` for a model with weights.
    """

    module: nn.Module | None
    name: str
    arch: str
    preprocess: PreprocessCfg
    temperature: float = 1.0
    threshold: float = 0.5
    operating_point: str = "0.5"
    thresholds: dict[str, float] = field(default_factory=dict)
    tta: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    graph: Path | None = None
    _runtimes: dict[tuple[int | None, str], Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))

    @property
    def label(self) -> str:
        """How another model's ``model.json`` names this one (an ensemble's member, a fine-tune's start): a
        release by name and version (its folder is this machine's, not the model's), else the folder it was
        loaded from."""
        if self.meta.get("version"):
            return f"{self.name} {self.version}"
        return self.name if self.folder is None else str(self.folder)

    @property
    def task(self) -> str:
        """``classify`` or ``localise`` (:attr:`fracdet.models.ModelSpec.task`)."""
        return get_spec(self.arch).task

    @property
    def levels(self) -> dict[str, float]:
        """Probability threshold of each confidence level (``suspicious``, ``definite``) the model has."""
        return level_thresholds(self.thresholds)

    def network(self, purpose: str) -> nn.Module:
        """The PyTorch network, needed to ``purpose`` (say, "run in PyTorch"): a compiled model has none, and
        the error names the float model it was made from, which can."""
        if self.module is None:
            origin = self.meta.get("graph", {}).get("quantised_from")
            hint = f"; its float model {origin} can" if origin else ""
            raise NoWeightsError(f"{self.name} {self.version} is a compiled {self.precision} graph without PyTorch "
                                 f"weights: it cannot {purpose}{hint}")  # fmt: skip
        return self.module

    @property
    def precision(self) -> str:
        """The arithmetic of its scoring: ``float32``, or a compiled graph's (``int8``)."""
        return str(self.meta.get("graph", {}).get("precision", "float32"))

    @property
    def peak_weight(self) -> float:
        """A localiser's fusion weight of the map's peak in its image logit (0 for a classifier)."""
        if self.module is None:  # compiled: the graph's fusion is fixed, and model.json records its weight
            return float(self.meta.get("peak_weight", 0.0))
        fusion = getattr(self.module, "fusion", None)
        return float(fusion[1]) if fusion is not None else 0.0

    def compiled_runtime(self, *, threads: int | None = None, spin: str = "alone") -> Any:
        """The ONNX Runtime sessions of a compiled model's graph (one runtime per thread count and ``spin``,
        made once; :class:`~fracdet.models.compiled.OnnxRuntime`)."""
        if self.graph is None:
            raise ValueError(f"{self.name} has PyTorch weights, not a compiled graph (fracdet.inference.onnx)")
        if (threads, spin) not in self._runtimes:
            from fracdet.models.compiled import OnnxRuntime

            self._runtimes[threads, spin] = OnnxRuntime(self.graph, threads=threads, spin=spin)
        return self._runtimes[threads, spin]

    def outputs(
        self, images: np.ndarray, *, tta: bool | None = None, **kwargs: Any
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw ``(margins, map logits or None)`` of ``(N, H, W)`` uint8 images (``tta=None``: as calibrated)."""
        if self.graph is not None:
            if tta is not None and tta != self.tta:
                raise ValueError(f"{self.name}: a compiled graph scores with tta={self.tta} only")
            from fracdet.models.compiled import compiled_outputs

            kwargs.pop("device", None)  # a compiled graph runs in ONNX Runtime on the CPU
            out = compiled_outputs(self, images, **kwargs)
            return out.margins, out.dense
        return predict_scores(self.module, images, self.preprocess, tta=self.tta if tta is None else tta, **kwargs)

    @property
    def box_relative(self) -> float:
        """A localiser's box edge, as a fraction of each peak's map probability (fitted on validation)."""
        return float(self.meta.get("box_relative", 0.5))

    def score(self, images: np.ndarray, *, tta: bool | None = None, max_boxes: int = 10, **kwargs: Any) -> Scores:
        """Calibrated probabilities of ``(N, H, W)`` uint8 images, with a localiser's map and scored boxes.

        Args:
            tta: ``None``: as the model was calibrated.
            max_boxes: boxes per image at most (levelled or not; :func:`fracdet.models.scoring.shown_boxes`
                keeps those a reader sees).
            kwargs: ``batch_size``, ``device``, ``progress_desc``.
        """
        margins, maps = self.outputs(images, tta=tta, **kwargs)
        return self.scores_of(margins, maps, max_boxes=max_boxes)

    def scores_of(self, margins: np.ndarray, dense: np.ndarray | None, *, max_boxes: int = 10) -> Scores:
        """:class:`Scores` from raw outputs, whichever back end computed them (:meth:`outputs`, or a
        :class:`fracdet.models.graph.Runtime`): the model's calibration, levels and box reading applied."""
        return scores_from_outputs(margins, dense, temperature=self.temperature, thresholds=self.thresholds,
                                   peak_weight=self.peak_weight, max_boxes=max_boxes,
                                   relative=self.box_relative)  # fmt: skip

    @property
    def splits_path(self) -> Path | None:
        """The split manifest the model was trained on, when it travels with the model."""
        path = self.folder / "splits.csv" if self.folder else None
        return path if path and path.is_file() else None

    def margins(self, images: np.ndarray, *, tta: bool | None = None, **kwargs: Any) -> np.ndarray:
        """Logit margins of ``(N, H, W)`` uint8 images (``tta=None``: as the model was calibrated)."""
        return self.outputs(images, tta=tta, **kwargs)[0]

    def predict_proba(self, images: np.ndarray, *, tta: bool | None = None, **kwargs: Any) -> np.ndarray:
        """Calibrated fracture probabilities of ``(N, H, W)`` uint8 images at the model's input size."""
        from scipy.special import expit

        return expit(self.margins(images, tta=tta, **kwargs).astype(np.float64) / self.temperature)


def load(name_or_path: str | Path, *, device: str | torch.device = "cpu") -> TrainedModel:
    """Load a released model by name, or a trained model folder or checkpoint by path.

    Args:
        name_or_path: a release name (:func:`list_releases`), a folder holding ``model.json`` (a run
            folder or a release), or a checkpoint ``.pt`` inside a run folder's ``checkpoints/``.
        device: where the weights go.
    """
    path = Path(name_or_path)
    state: dict[str, torch.Tensor] | None = None
    if path.suffix == ".pt" and path.is_file():
        folder = path.parent.parent
        with _loading(path):  # a checkpoint of `fracdet train` (our own file, hence weights_only=False)
            state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    elif path.is_dir():
        folder = path
    elif (releases_dir() / str(name_or_path)).is_dir():
        folder = releases_dir() / str(name_or_path)
    else:
        known = ", ".join(list_releases()) or "none found"
        raise FileNotFoundError(f"no model {str(name_or_path)!r}: not a folder, checkpoint or release ({known})")
    with _loading(folder):
        meta = _read_meta(folder)
        if int(meta.get("schema_version", 1)) > SCHEMA_VERSION:
            raise ModelLoadError(f"{folder}: model.json schema {meta['schema_version']} is newer than this "
                                 f"fracdet reads ({SCHEMA_VERSION}): upgrade fracdet")  # fmt: skip
        preprocess = PreprocessCfg(int(meta["input_size"]), tuple(meta["mean"]), tuple(meta["std"]))
        if "graph" in meta:
            return _load_compiled(folder, meta, preprocess)
        module = _build(meta, preprocess)
        if state is None:
            weights = folder / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found: training may not have finished (try its checkpoints/)")
            check_sha256(weights, meta.get("weights_sha256"))
            from safetensors.torch import load_file

            with _loading(weights):
                state = load_file(str(weights))
        try:
            module.load_state_dict(state)  # casts half-precision stored weights back to float32
        except RuntimeError as exc:
            raise ModelLoadError(f"{folder}: the weights do not fit the {meta['model']} that model.json "
                                 f"describes ({str(exc).splitlines()[-1].strip()[:160]})") from None  # fmt: skip
    from_checkpoint = path.suffix == ".pt"
    module.to(device).eval()
    if from_checkpoint:  # model.json calibrates the best weights, not necessarily these: nothing fitted yet
        fitted = ("temperature", "thresholds", "threshold", "operating_point", "tta", "box_relative")
        meta = {k: v for k, v in meta.items() if k not in fitted}
    return _described(module, meta, folder, preprocess)


@contextlib.contextmanager
def _loading(where: Path) -> Iterator[None]:
    """Turn what a damaged or foreign model file raises while it is read into one :class:`ModelLoadError`.

    A half-copied ``model.safetensors``, a ``model.json`` edited by hand or a truncated checkpoint would
    otherwise surface as a parser's own exception (``SafetensorError``, ``JSONDecodeError``, ``KeyError``,
    ``UnpicklingError``) and a traceback, where hospital IT needs the file and the reason."""
    from safetensors import SafetensorError

    try:
        yield
    except (ModelLoadError, FileNotFoundError):
        raise
    except KeyError as exc:
        missing = exc.args[0]
        raise ModelLoadError(f"{where}: no {missing!r} where fracdet writes one: damaged, or not fracdet's") from None
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{where}: model.json is not valid JSON (line {exc.lineno}): damaged") from None
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError, TypeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(f"{where}: cannot be read as a fracdet model ({reason})") from None


def check_sha256(path: Path, expected: str | None) -> None:
    """Refuse a file whose bytes are not those its ``model.json`` recorded: a damaged copy still parses when
    the damage misses its header, and would answer with weights its calibration was never fitted to."""
    from fracdet.utils.hashing import sha256_file

    if expected and sha256_file(path) != expected:
        raise ModelLoadError(f"{path}: its SHA-256 is not the one model.json records: damaged or replaced")


def _described(
    module: nn.Module | None, meta: dict[str, Any], folder: Path, preprocess: PreprocessCfg, graph: Path | None = None
) -> TrainedModel:
    """A :class:`TrainedModel` of ``module`` (or a compiled ``graph``) as its ``model.json`` ``meta`` describes it."""
    return TrainedModel(
        module=module,
        name=str(meta.get("name", folder.name)),
        arch=meta["model"],
        preprocess=preprocess,
        temperature=float(meta.get("temperature", 1.0)),
        threshold=float(meta.get("threshold", 0.5)),
        operating_point=str(meta.get("operating_point", "0.5")),
        thresholds={k: float(v) for k, v in meta.get("thresholds", {}).items()},
        tta=bool(meta.get("tta", False)),
        meta=meta,
        folder=folder,
        graph=graph,
    )


def _load_compiled(folder: Path, meta: dict[str, Any], preprocess: PreprocessCfg) -> TrainedModel:
    """A compiled model: its graph file, checked against the SHA-256 ``model.json`` records (a damaged or
    swapped graph would score with calibration fitted on another)."""
    graph = folder / meta["graph"]["file"]
    if not graph.is_file():
        raise FileNotFoundError(f"{graph} not found: the compiled graph model.json names is missing")
    check_sha256(graph, meta["graph"].get("sha256"))
    return _described(None, meta, folder, preprocess, graph)


def package_release(
    run_dir: str | Path,
    name: str,
    *,
    version: str,
    dest: str | Path | None = None,
    report: str | Path | None = None,
    command: str | None = None,
) -> Path:
    """Copy a finished run's model into ``dest/name`` (default: :func:`releases_dir`) under a name and version.

    The release keeps the split manifest, config and training history beside the weights, so the
    released model can be re-evaluated on its own held-out test images and traced to its run.

    Args:
        report: ``metrics.json`` of ``fracdet evaluate`` on the test split: its numbers at the model's
            operating point are stored as ``reported`` (the model card quotes them; a test re-measures).
            The release becomes the model as evaluated: it takes the report's test-time augmentation
            setting with the temperature and thresholds that evaluation fitted on validation.
        command: the command that re-measures them, stored beside them.
    """
    import shutil

    run = Path(run_dir)
    if not (run / "model.json").is_file():
        raise FileNotFoundError(f"{run} has no model.json: train to the end (or resume) before releasing")
    meta = json.loads((run / "model.json").read_text())
    meta.update(name=name, version=version, run=run.name)
    metrics = json.loads(Path(report).read_text()) if report is not None else None
    if metrics is not None:
        tta = bool(metrics.get("tta", False))
        if tta != bool(meta.get("tta", False)) and not str(metrics.get("thresholds_from", "")).startswith("val"):
            raise ValueError(f"{report}: test-time augmentation changed, but no validation split re-fitted thresholds")
        point_name = meta.setdefault("operating_point", "sens90")
        thresholds = metrics["thresholds"]
        meta.update(tta=tta, temperature=metrics["temperature"], thresholds=thresholds)
        meta["threshold"] = thresholds[point_name]
        point = metrics["operating_points"][point_name]
        keep = ("threshold", "accuracy", "sensitivity", "specificity", "precision", "f1", "kappa", "auc",
                "average_precision", "tp", "fp", "tn", "fn", "ci95")  # fmt: skip
        meta["reported"] = {
            "command": command or f"fracdet evaluate {name} --data DATASET --split {metrics['split']}",
            "split": metrics["split"],
            metrics["split"]: {"images": metrics["images"], "fractures": metrics["fractures"],
                               **{k: point[k] for k in keep}},
            "ece_after_temperature": metrics["calibration"]["ece_after"],
        }  # fmt: skip
        if lesions := metrics.get("lesions"):  # a localiser's card also quotes where it finds fractures
            every = lesions["all"]
            meta["reported"]["lesions"] = {
                "levels": lesions["levels"],
                **{key: every[key] for key in REPORTED_LESION_FIGURES if key in every},
            }
            if (found := metrics.get("localisation")) and "pointing_game" in found:
                meta["reported"]["lesions"]["pointing_game"] = found["pointing_game"]
    target = Path(dest or releases_dir()) / name
    target.mkdir(parents=True, exist_ok=True)
    for file in RELEASE_FILES:
        if (run / file).is_file():
            shutil.copy2(run / file, target / file)
    atomic_write_text(target / "model.json", json.dumps(meta, indent=2) + "\n")
    if "graph" in meta:  # a compiled model's graph carries the released description (name, version, report)
        from fracdet.models.compiled import seal_graph

        seal_graph(target)
    return target


def save_model(model: TrainedModel, folder: str | Path, *, half: bool = False) -> Path:
    """Write ``model`` as a trained-model folder (``model.safetensors`` + ``model.json``) that :func:`load` reads.

    Args:
        half: store the weights as float16 (half the bytes; :func:`load` casts them back to float32, and
            the margins move by about one part in a thousand).
    """
    from safetensors.torch import save_file

    from fracdet.utils.hashing import sha256_file

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous().cpu()
             for k, v in model.module.state_dict().items()}  # fmt: skip
    with atomic_file(target / "model.safetensors") as tmp:
        save_file(state, str(tmp))
    meta = {
        "model": model.arch,
        **model.meta,
        "schema_version": ANTIALIASED_SCHEMA_VERSION if _antialiased(model.meta) else WEIGHTS_SCHEMA_VERSION,
        "task": model.task,
        "input_size": model.preprocess.input_size,
        "mean": list(model.preprocess.mean),
        "std": list(model.preprocess.std),
        "temperature": model.temperature,
        "thresholds": model.thresholds,
        "operating_point": model.operating_point,
        "threshold": model.threshold,
        "tta": model.tta,
        "weights_dtype": "float16" if half else "float32",
        "weights_sha256": sha256_file(target / "model.safetensors"),
    }
    if (fusion := getattr(model.module, "fusion", None)) is not None:  # also in the weights; here for readers
        names = getattr(model.module, "fusion_names", ("classifier", "map_peak", "bias"))
        meta["fusion"] = dict(zip(names, (round(float(v), 6) for v in fusion), strict=True))
    write_json(target / "model.json", meta)
    return target


def _antialiased(meta: dict[str, Any]) -> bool:
    return any(build_options(part)["antialias"] for part in (meta, *meta.get("fused", ())))


def rebuilt(model: TrainedModel, **options: Any) -> TrainedModel:
    """``model``'s weights in the network built with other :data:`fracdet.models.BUILD_OPTIONS`, every fused
    part's too: ``rebuilt(model, antialias=True)`` adds the low-pass, which holds no weights. The scores change,
    so its fusion, temperature and thresholds are to be fitted again (``fracdet.training.recalibrate``).

    Raises:
        NoWeightsError: ``model`` is a compiled graph.
        ValueError: an option that is not a build option.
    """
    if unknown := set(options) - set(BUILD_OPTIONS):
        raise ValueError(f"not build options: {', '.join(sorted(unknown))}; they are {', '.join(BUILD_OPTIONS)}")
    network = model.network("be rebuilt")
    kept = {"model": model.arch} | {k: v for k, v in model.meta.items() if k not in ("version", "name")}
    meta = kept | options | {"rebuilt_from": model.label}
    if fused := meta.get("fused"):
        meta["fused"] = [{**part, **options} for part in fused]
    module = _build(meta, model.preprocess)
    module.load_state_dict(network.state_dict())
    return dataclasses.replace(model, module=module.eval(), meta=meta, graph=None)


def _build(meta: dict[str, Any], preprocess: PreprocessCfg) -> nn.Module:
    """The empty network ``model.json`` describes: one registry model, an ensemble of them, or a fused localiser."""

    def one() -> nn.Module:
        return create_model(meta["model"], input_size=preprocess.input_size, **build_options(meta))

    if fused := meta.get("fused"):  # a localiser and classifiers, each at its own input side
        from fracdet.models.ensemble import create_fused

        return create_fused(fused)
    if members := meta.get("members"):
        from fracdet.models.ensemble import Ensemble

        return Ensemble([one() for _ in members])
    return one()


def _read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / "model.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} holds neither model.json nor config.yaml: not a fracdet model folder")
    # A run stopped before its end: describe the model from its config (no calibration yet).
    import yaml

    from fracdet.models._registry import get_spec

    config = yaml.safe_load(config_path.read_text())
    spec = get_spec(config["model"]).preprocess
    run_path = folder / "run.json"  # a fused model trained whole: its composition is recorded there
    run = json.loads(run_path.read_text()) if run_path.is_file() else {}
    size = config.get("image_size") or run.get("input_size") or spec.input_size
    composition = {k: run[k] for k in ("fused", "members", "init_from") if k in run}
    return {"model": config["model"], "input_size": size, "mean": spec.mean, "std": spec.std,
            **build_options(config), "selected_on": config.get("select_on", "val"), **composition}  # fmt: skip
