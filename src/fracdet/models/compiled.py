"""A model whose arithmetic is a fixed ONNX graph, run by ONNX Runtime: the exported fast path, and models
that exist only as a graph.

:class:`OnnxRuntime` runs a :class:`~fracdet.models.graph.ScoringGraph` exported to ONNX behind the same
:class:`~fracdet.models.graph.Runtime` interface as PyTorch. Most models carry PyTorch weights and are
exported on demand (:mod:`fracdet.inference.onnx`). A *compiled* model carries no weights at all: its
``model.json`` names a graph file in its folder (``graph``), such as an int8 graph made by
:func:`fracdet.inference.quantize.quantize_model`. That graph *is* the model: its temperature, thresholds,
box edge and input gate were fitted on its own outputs, so it is scored only by that graph (never by the
float network it came from), through :func:`compiled_outputs` for batch work and the same
:class:`OnnxRuntime` for predictions. Like every exported graph it describes itself: :func:`seal_graph` puts
the folder's ``model.json`` inside it, so the file alone carries its own calibration and version.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from fracdet.models.graph import GraphOutputs, graph_outputs
from fracdet.models.predict import CPU_BATCH_SIZE

if TYPE_CHECKING:
    from fracdet.models.release import TrainedModel

__all__ = ["GRAPH_META_KEY", "ONNX_HINT", "OnnxRuntime", "compiled_outputs", "seal_graph"]

ONNX_HINT = "ONNX needs onnx, onnxscript and onnxruntime (default dependencies of fracdet): pip install fracdet"
#: The ONNX metadata entry that holds a graph's ``model.json``.
GRAPH_META_KEY = "fracdet_model_json"


class OnnxRuntime:
    """An exported :class:`~fracdet.models.graph.ScoringGraph` run by ONNX Runtime on the CPU (safe across
    threads).

    With more than one thread per call it keeps two sessions of the graph, because what is fastest for one
    radiograph costs several at once. Between the graph's operators, ONNX Runtime's worker threads either spin
    (ready at once for the next operator) or sleep (woken for it). A call made while no other is running (one
    radiograph in an emergency room) takes the *spinning* session, whose workers stop spinning when the call
    ends: the graph of ``fracatlas-default`` takes 0.83 of the time on 2 cores. A call made while another
    is running takes the *sleeping* one, since spinning workers would take the cores the other call needs: a
    session that always spins scores fewer images under load (``benchmarks/ort_spinning.py``,
    ``docs/BENCHMARKS.md``). A server, whose own threads need the cores too, asks for ``spin="never"``.

    Args:
        path: an ONNX file written by :func:`fracdet.inference.onnx.export_onnx` (or quantised from one).
        threads: intra-op threads per call (``None``: ONNX Runtime's default, all cores).
        spin: ``"alone"`` (the two sessions above), ``"never"`` or ``"always"`` (one session, for comparison).
        kernels: ``"fused"`` (ONNX Runtime's optimised graph: an int8 graph's quantise-compute-dequantise
            steps fused into integer kernels, which differ from one CPU to another) or ``"reference"`` (the
            graph as written, nothing fused: an int8 graph computes in float on its dequantised values, which
            is what its arithmetic means on every CPU; several times slower, for checks such as
            :func:`fracdet.inference.quantize.kernel_change`).
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        *,
        threads: int | None = None,
        spin: Literal["alone", "never", "always"] = "alone",
        kernels: Literal["fused", "reference"] = "fused",
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(ONNX_HINT) from exc
        from fracdet.utils.workers import worker_count

        def session(spinning: bool) -> Any:
            options = ort.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
            # Spinning only while a call runs: idle workers between calls would take the cores of everything else.
            options.add_session_config_entry("session.force_spinning_stop", "1")
            if kernels == "reference":
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            # Not "session.set_denormal_as_zero": it would be ~15% faster on radiographs, but it sets the
            # processor's flush-to-zero state of the calling thread too, changing every later float computation
            # of the process (numpy's, the caller's) behind its back.
            if threads is not None:
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        if spin not in ("alone", "never", "always"):
            raise ValueError(f"spin must be alone, never or always, not {spin!r}")
        if kernels not in ("fused", "reference"):
            raise ValueError(f"kernels must be fused or reference, not {kernels!r}")
        self.path = Path(path)
        self.session = session(spinning=spin == "always")
        parallel = (threads if threads is not None else worker_count()) > 1
        # One thread per call has no workers to spin: no second session.
        self._alone = session(spinning=True) if spin == "alone" and parallel else None
        self._running = 0  # graph calls under way
        self._lock = threading.Lock()
        raw = self.session.get_modelmeta().custom_metadata_map.get(GRAPH_META_KEY)
        self.meta: dict[str, Any] = json.loads(raw) if raw else {}
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.cams = "cams" in self.outputs
        self.appearance = "appearance" in self.inputs

    def __call__(self, images: np.ndarray, appearance: np.ndarray | None = None) -> GraphOutputs:
        feed = {"image": np.ascontiguousarray(images, np.uint8)[:, None]}
        if self.appearance:
            if appearance is None:
                raise ValueError("this graph needs the appearance input (fracdet.data.embed.embedder_input)")
            feed["appearance"] = np.ascontiguousarray(appearance, np.uint8)[:, None]
        with self._lock:
            alone = self._running == 0
            self._running += 1
        try:
            session = self._alone if alone and self._alone is not None else self.session
            values = session.run(None, feed)
        finally:
            with self._lock:
                self._running -= 1
        return graph_outputs(dict(zip(self.outputs, values, strict=True)))


def compiled_outputs(
    model: TrainedModel,
    images: np.ndarray,
    *,
    batch_size: int | None = None,
    progress_desc: str | None = None,
    runtime: OnnxRuntime | None = None,
) -> GraphOutputs:
    """Every output of a compiled ``model``'s graph for ``(N, H, W)`` uint8 images at its input size, in
    batches of ``batch_size`` (``None``: :data:`fracdet.models.predict.CPU_BATCH_SIZE`, as ONNX Runtime runs on
    the CPU; the appearance input made from the same images when the graph takes one), run by ``runtime``
    (default: the model's own)."""
    from fracdet.data.embed import embedder_input
    from fracdet.utils.progress import progress_bar

    runtime = runtime if runtime is not None else model.compiled_runtime()
    batch_size = batch_size or CPU_BATCH_SIZE
    bar = progress_bar(desc=progress_desc, total=len(images)) if progress_desc else None
    parts: list[GraphOutputs] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start : start + batch_size])
            parts.append(runtime(chunk, embedder_input(list(chunk)) if runtime.appearance else None))
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if not parts:
        raise ValueError("no images to score")

    def joined(name: str) -> np.ndarray | None:
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else np.concatenate(values)

    return GraphOutputs(*(joined(n) for n in ("margins", "dense", "cams", "features", "embedding")))


def seal_graph(folder: str | Path) -> Path:
    """Put a compiled model folder's ``model.json`` inside its graph, then record the sealed graph's SHA-256.

    A graph quantised from an exported one still carries the float model's description, whose temperature
    and thresholds are not this graph's. Sealing replaces it with the folder's own (the graph's hash left
    out: no file holds its own hash), keeping what only the export knew (its inputs, outputs and graph
    version). Called whenever ``model.json`` changes: by :func:`fracdet.inference.quantize.quantize_model`,
    :func:`fracdet.inference.gate.save_gate` and :func:`fracdet.models.release.package_release`.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(ONNX_HINT) from exc
    from fracdet.utils.atomic import atomic_write_bytes, write_json
    from fracdet.utils.hashing import sha256_file

    folder = Path(folder)
    meta = json.loads((folder / "model.json").read_text())
    path = folder / meta["graph"]["file"]
    proto = onnx.load(str(path))
    entries = {entry.key: entry.value for entry in proto.metadata_props}
    exported = json.loads(entries.get(GRAPH_META_KEY, "{}"))
    sealed = {key: exported[key] for key in ("graph_version", "inputs", "outputs") if key in exported}
    sealed.update(meta, graph={k: v for k, v in meta["graph"].items() if k != "sha256"})
    entries[GRAPH_META_KEY] = json.dumps(sealed)
    del proto.metadata_props[:]
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write_bytes(path, proto.SerializeToString())
    meta["graph"]["sha256"] = sha256_file(path)
    write_json(folder / "model.json", meta)
    return path
