"""A trained model as one ONNX graph, run by ONNX Runtime: the fast back end of every prediction path.

:func:`export_onnx` writes the model's :class:`~fracdet.models.graph.ScoringGraph` (uint8 grey in,
normalisation, mirror averaging, margins, map or class activation maps, the gate's features and appearance
embedding out) with a dynamic batch; ``model.json`` travels inside (metadata ``fracdet_model_json``), so
the file describes itself. :class:`~fracdet.models.compiled.OnnxRuntime` runs such a file behind the same
:class:`~fracdet.models.graph.Runtime` interface as PyTorch, and :func:`runtime_for` picks the back end:
ONNX Runtime when it is installed (the default install has it), PyTorch otherwise. A compiled model (an int8
graph, :mod:`fracdet.models.compiled`) has no PyTorch weights: its own graph runs, whatever ``auto`` says.

Exporting takes seconds (torch.export traces the network), so a prediction path does it once per model and
keeps the file in the cache (``$FRACDET_CACHE/onnx``, default ``~/.cache/fracdet/onnx``), named by a hash of
the weights, ``model.json``, the gate and the versions that shape the graph, and checked against its
recorded SHA-256 before use: a changed model gets a new graph; a damaged file is exported again, not trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from fracdet.models.compiled import GRAPH_META_KEY, ONNX_HINT, OnnxRuntime
from fracdet.models.graph import APPEARANCE_SIDE, Runtime, ScoringGraph, TorchRuntime
from fracdet.models.release import TrainedModel
from fracdet.utils.atomic import atomic_file
from fracdet.utils.hashing import sha256_file

__all__ = ["BACKENDS", "OnnxRuntime", "cached_export", "export_onnx", "onnxruntime_available", "runtime_for"]

log = logging.getLogger(__name__)

#: Back ends a prediction path can ask for (``auto``: ONNX Runtime when installed, else PyTorch).
BACKENDS = ("auto", "onnxruntime", "pytorch")
#: Changes whenever the exported graph's inputs, outputs or arithmetic change: old cached files are not reused.
GRAPH_VERSION = "4"


def onnxruntime_available() -> bool:
    """Whether ONNX Runtime and the exporter's dependencies are importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def export_onnx(
    model: TrainedModel, path: str | Path, *, embedder: torch.nn.Module | None = None, opset: int = 18
) -> Path:
    """Write ``model``'s :class:`ScoringGraph` to ``path`` as one self-contained ONNX file, dynamic batch.

    A compiled model is already such a file, sealed with its own ``model.json``
    (:func:`fracdet.models.compiled.seal_graph`): it is copied as it is.

    Args:
        model: from :func:`fracdet.models.load` (weights on the CPU).
        embedder: the input gate's appearance embedder network to run in the same graph (``None``: none; a
            compiled graph holds its own already).
        opset: ONNX operator set.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(ONNX_HINT) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.graph is not None:
        import shutil

        shutil.copyfile(model.graph, path)
        return path
    graph = ScoringGraph(model, embedder=embedder).eval().cpu()
    size = model.preprocess.input_size
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = [torch.zeros(2, 1, size, size, dtype=torch.uint8)]
    shapes: dict[str, dict[int, Any]] = {"image": {0: batch}}
    if embedder is not None:
        example.append(torch.zeros(2, 1, APPEARANCE_SIDE, APPEARANCE_SIDE, dtype=torch.uint8))
        shapes["appearance"] = {0: batch}
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(graph, tuple(example), str(path), input_names=graph.input_names,
                          output_names=graph.output_names, dynamic_shapes=shapes, opset_version=opset,
                          dynamo=True, external_data=False, verbose=False)  # fmt: skip
    proto = onnx.load(str(path))
    meta = {**model.meta, "input_size": size, "mean": list(model.preprocess.mean), "std": list(model.preprocess.std),
            "temperature": model.temperature, "thresholds": model.thresholds, "threshold": model.threshold,
            "operating_point": model.operating_point, "tta": model.tta, "task": model.task,
            "peak_weight": model.peak_weight, "graph_version": GRAPH_VERSION,
            "inputs": graph.input_names, "outputs": graph.output_names}  # fmt: skip
    entry = proto.metadata_props.add()
    entry.key, entry.value = GRAPH_META_KEY, json.dumps(meta)
    with atomic_file(path) as tmp:
        onnx.save(proto, str(tmp))
    return path


def _cache_root() -> Path:
    root = os.environ.get("FRACDET_CACHE")
    return Path(root) / "onnx" if root else Path.home() / ".cache" / "fracdet" / "onnx"


def _model_key(model: TrainedModel, embedder: torch.nn.Module | None) -> str:
    """A hash of everything the exported graph depends on (weights, ``model.json``, embedder, versions)."""
    import onnx

    digest = hashlib.sha256()
    for module in (model.module, embedder):
        if module is None:
            continue
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps(model.meta, sort_keys=True, default=str).encode())
    digest.update(f"{model.tta}{model.temperature}{model.threshold}{GRAPH_VERSION}".encode())
    digest.update(f"{torch.__version__} {onnx.__version__}".encode())
    return digest.hexdigest()[:32]


def cached_export(model: TrainedModel, *, embedder: torch.nn.Module | None = None) -> Path:
    """The ONNX file of ``model`` (and ``embedder``) from the cache, exported there first when missing or damaged."""
    root = _cache_root()
    key = _model_key(model, embedder)
    path, checksum = root / f"{key}.onnx", root / f"{key}.sha256"
    if path.is_file() and checksum.is_file() and checksum.read_text().strip() == sha256_file(path):
        return path
    log.info("exporting %s to ONNX once (cached in %s)", model.name, root)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as folder:  # written whole, then renamed: never half a file
        staged = export_onnx(model, Path(folder) / "model.onnx", embedder=embedder)
        (Path(folder) / "sha").write_text(sha256_file(staged))
        staged.replace(path)
        (Path(folder) / "sha").replace(checksum)
    return path


def runtime_for(
    model: TrainedModel,
    backend: str = "auto",
    *,
    embedder: torch.nn.Module | None = None,
    threads: int | None = None,
    spin: Literal["alone", "never", "always"] = "alone",
) -> Runtime:
    """The runtime that scores ``model``: ``onnxruntime``, ``pytorch``, or ``auto`` (the first when installed).

    Args:
        embedder: the input gate's appearance embedder network, run in the same graph.
        threads: ONNX Runtime's intra-op threads per call (``None``: all cores).
        spin: when ONNX Runtime's workers spin (:class:`~fracdet.models.compiled.OnnxRuntime`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown back end {backend!r}; choose from {', '.join(BACKENDS)}")
    if model.graph is not None:
        if backend == "pytorch":
            model.network("run in PyTorch (--backend auto or onnxruntime run it)")
        return model.compiled_runtime(threads=threads, spin=spin)
    if backend == "pytorch" or (backend == "auto" and not onnxruntime_available()):
        return TorchRuntime(model, embedder=embedder)
    if next(model.module.parameters()).device.type != "cpu":
        return TorchRuntime(model, embedder=embedder)  # a model placed on a GPU stays with PyTorch
    return OnnxRuntime(cached_export(model, embedder=embedder), threads=threads, spin=spin)


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx's exporter reports its progress and warnings; a server's log should not carry them."""
    import contextlib
    import io
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
