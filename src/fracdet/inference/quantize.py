"""An int8 model from a float one: a faster graph on ordinary CPUs, calibrated and gated on its own outputs.

Static quantisation (ONNX Runtime, QDQ: int8 weights per output channel in a 7-bit range, uint8 activations,
each ranging over the 99.999th percentile of its values on training radiographs) makes a model's
:class:`~fracdet.models.graph.ScoringGraph`, the input gate's appearance embedder included, cost about 0.6 of
the float graph's time on a CPU (``benchmarks/int8.py``). Its margins are not the float model's, so nothing
fitted on the float margins carries over: the temperature, the operating thresholds, a localiser's box edge
and the input gate's distances and limits are all fitted again, on the int8 graph's own outputs, on the same
training and validation splits. The result is a *compiled* model (:mod:`fracdet.models.compiled`): a folder
with ``model.onnx`` and ``model.json`` that loads, evaluates, predicts and serves like any other, and runs in
ONNX Runtime only.

The issue's rule is kept by construction: :func:`quantize_model` writes nothing unless the int8 graph's
validation ROC AUC is within ``max_auc_drop`` (0.005) of the float model's on the same images, and its fused
kernels on the CPU at hand score validation within :data:`MAX_KERNEL_CHANGE` of its reference arithmetic
(:func:`kernel_change`), so that what is fitted on this CPU holds on others. The test split is never read.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fracdet.data.pixels import PixelSet, load_pixels
from fracdet.data.split import leave_out_trained_on, split_rows
from fracdet.models.compiled import seal_graph
from fracdet.models.release import GRAPH_SCHEMA_VERSION, TrainedModel, load
from fracdet.utils.cache import FeatureCache

__all__ = [
    "INT8_FORMATS",
    "MAX_KERNEL_CHANGE",
    "QUANTISATION",
    "Quantized",
    "calibration_draw",
    "fine_nodes",
    "float_nodes",
    "kernel_change",
    "quantize_graph",
    "quantize_model",
]

_HINT = "int8 quantisation needs onnxruntime and onnx (default dependencies of fracdet): pip install fracdet"
#: How the graph is quantised, as ``model.json`` ``graph`` records it.
QUANTISATION = (
    "ONNX Runtime static quantisation, QDQ: int8 weights per channel in a 7-bit range, uint8 activations, ranges "
    "at the 99.999th percentile"
)
#: Integer formats a graph can be quantised in: name -> (activation type, weight type, 7-bit weights), in
#: ONNX Runtime's names. ``u8s7`` is :data:`QUANTISATION`'s; the others are compared with it by
#: ``benchmarks/int8_formats.py`` (``u8s8`` was 1.1.0's).
INT8_FORMATS = {"u8s7": ("QUInt8", "QInt8", True), "u8s8": ("QUInt8", "QInt8", False),
                "s8s8": ("QInt8", "QInt8", False), "u8u8": ("QUInt8", "QUInt8", False)}  # fmt: skip
#: Largest ``|margin|`` change (logits) allowed between an int8 graph's fused integer kernels, on the CPU at
#: hand, and its reference arithmetic (:func:`kernel_change`): beyond it, the model's thresholds and card
#: would hold on some CPUs and not on others.
MAX_KERNEL_CHANGE = 0.25
#: What a compiled model's ``model.json`` does not take from the float model: fitted on float margins.
_REFITTED = ("temperature", "thresholds", "threshold", "box_relative", "box_relative_val_iou", "gate", "reported",
             "weights_dtype", "fusion_val_auc")  # fmt: skip


@dataclass
class Quantized:
    """What :func:`quantize_model` made and what its checks saw (validation only).

    Attributes:
        model: the compiled int8 model, loaded from its folder.
        val_auc: validation ROC AUC of the float model and of the int8 graph, on the same images.
        margin_change: median and largest ``|int8 margin - float margin|`` on validation (logits).
        kernel_change: median and largest change of a validation margin between this CPU's fused int8 kernels
            and the graph's reference arithmetic (:func:`kernel_change`).
        gate: what the gate's refit saw (:func:`fracdet.inference.gate.fit_gate_on_splits`), if it has one.
    """

    model: TrainedModel
    val_auc: dict[str, float]
    margin_change: dict[str, float]
    kernel_change: dict[str, float]
    gate: dict[str, Any] = field(default_factory=dict)


def quantize_model(
    model: TrainedModel,
    table: pd.DataFrame,
    out: str | Path,
    *,
    name: str | None = None,
    version: str | None = None,
    calibration: int = 64,
    extra: Sequence[pd.DataFrame] = (),
    cache: FeatureCache | None = None,
    max_auc_drop: float = 0.005,
    max_kernel_change: float = MAX_KERNEL_CHANGE,
    float_map_head: bool = True,
    float_stride: int = 0,
    calibration_batch: int = 1,
    seed: int = 0,
) -> Quantized:
    """Quantise ``model`` to int8 and write it, refitted, as a compiled model folder ``out``.

    Args:
        model: a float model with PyTorch weights (:func:`fracdet.models.load`), on the CPU.
        table: its dataset with its own ``split`` column (:func:`fracdet.data.split.apply_manifest`).
        out: the folder to write (replaced whole, and only once everything is fitted).
        name: the compiled model's name (default: ``<name>-int8``).
        version: its version (default: ``<version>+int8``).
        calibration: training radiographs whose activations set the quantisation ranges (seeded draw).
        extra: other radiograph datasets for the gate, as ``fracdet gate --extra`` takes them.
        max_auc_drop: refuse (``ValueError``, nothing written) when validation AUC falls by more.
        max_kernel_change: refuse likewise when this CPU's kernels move a validation margin further from the
            graph's reference arithmetic (:func:`kernel_change`).
        float_map_head: keep a localiser's map head (the layers between the backbone's features and the
            map) in float: with it quantised too, 1.0.0's boxes hit fewer validation fractures (localised
            sensitivity 0.454 against float's 0.481; 0.472 with the head in float, for 0.2% more time).
            The score head (what makes the margin from pooled features and the map's peak) always stays
            float: quantised, the margin came in 256 steps, clipped to probabilities 0.003-0.975.
        float_stride: keep in float, too, the layers at this stride or finer (:func:`fine_nodes`); 0: none.
        calibration_batch: calibration radiographs whose activations are held at once (:func:`quantize_graph`;
            0: all, as 1.1.1 was made).

    Returns: the model and what was measured on validation.
    """
    from sklearn.metrics import roc_auc_score

    from fracdet.inference.gate import InputGate, fit_gate_on_splits, save_gate
    from fracdet.inference.onnx import export_onnx
    from fracdet.utils.atomic import write_json
    from fracdet.utils.hashing import sha256_file

    model.network("be quantised again")
    table = leave_out_trained_on(table, model.splits_path, model=model.name)  # checked on new files only
    out = Path(out)
    size = model.preprocess.input_size
    train, val = (split_rows(table, split, needed_for="to calibrate int8 on (train) and check it on (val)")
                  for split in ("train", "val"))  # fmt: skip
    gate = InputGate.of(model)
    embedder = gate.embedder().network if gate.fitted else None  # the refitted gate needs the embedding
    chosen = train.iloc[np.sort(calibration_draw(len(train), calibration, seed))]
    calib = load_pixels(chosen.reset_index(drop=True), size, cache=cache, desc="calibration").images
    val_set = load_pixels(val, size, cache=cache, desc="decoding val")
    labels = val_set.table["label"].to_numpy(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("the validation split needs fractured and normal radiographs to check the int8 graph")

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as work:
        stage = Path(work) / "model"
        stage.mkdir()
        with _quiet_quantiser():
            float_graph = export_onnx(model, Path(work) / "float.onnx", embedder=embedder)
        kept_float = float_nodes(float_graph, map_head=float_map_head, stride=float_stride)
        heads = "the score head" + (" and the map head" if float_map_head and model.task == "localise" else "")
        if float_stride:
            heads += f", and every layer at stride {float_stride} or finer"
        quantize_graph(
            float_graph, stage / "model.onnx", calib, keep_float=kept_float, calibration_batch=calibration_batch
        )
        graph = {"file": "model.onnx", "precision": "int8", "sha256": sha256_file(stage / "model.onnx"),
                 "quantised_from": f"{model.name} {model.version}", "method": QUANTISATION,
                 "calibration": f"{len(calib)} training radiographs (seed {seed})"
                                + (f", {calibration_batch} at a time" if calibration_batch else ""),
                 "float_nodes": f"{len(kept_float)} ({heads})"}  # fmt: skip
        _describe(model, stage, graph, name=name or f"{model.name}-int8", version=version or f"{model.version}+int8")
        compiled = load(stage)

        float_margins = model.margins(val_set.images, progress_desc="float val")
        int8_margins, _ = compiled.outputs(val_set.images, progress_desc="int8 val")
        val_auc = {"float32": float(roc_auc_score(labels, float_margins)),
                   "int8": float(roc_auc_score(labels, int8_margins))}  # fmt: skip
        if val_auc["int8"] < val_auc["float32"] - max_auc_drop:
            raise ValueError(f"int8 validation AUC {val_auc['int8']:.4f} is more than {max_auc_drop} below float's "
                             f"{val_auc['float32']:.4f}: not kept")  # fmt: skip
        kernels = kernel_change(compiled, val_set.images)
        if kernels["max"] > max_kernel_change:
            raise ValueError(f"this CPU's int8 kernels move a validation margin by {kernels['max']:.3f} logits from "
                             f"the graph's reference arithmetic (limit {max_kernel_change}): its thresholds would "
                             "not hold on other CPUs; not kept")  # fmt: skip
        fitted = _calibrate(compiled, val_set, int8_margins, boxes="box_relative" in model.meta)
        compiled.meta.update(fitted, graph={**graph, "val_auc": val_auc, "kernel_change": kernels})
        write_json(stage / "model.json", compiled.meta)
        summary: dict[str, Any] = {}
        if gate.fitted:  # last: save_gate adds its limits to model.json and seals the graph with it
            distance, limits, summary, appearance = fit_gate_on_splits(compiled, table, extra=extra, cache=cache)
            save_gate(compiled, distance, limits, stage, appearance)
        else:
            seal_graph(stage)
        if out.exists():
            shutil.rmtree(out)
        stage.replace(out)
    change = np.abs(int8_margins - float_margins)
    margins = {"median": float(np.median(change)), "max": float(change.max())}
    return Quantized(load(out), val_auc, margins, kernels, summary)


def calibration_draw(train_size: int, count: int, seed: int = 0) -> np.ndarray:
    """Positions, among ``train_size`` training radiographs, of the ``count`` that :func:`quantize_model`
    calibrates on (a seeded draw, in the order drawn: its first radiographs are a smaller calibration set)."""
    return np.random.default_rng(seed).choice(train_size, min(count, train_size), replace=False)


def kernel_change(model: TrainedModel, images: np.ndarray) -> dict[str, float]:
    """How far a compiled ``model``'s margins on ``(N, S, S)`` uint8 ``images`` move between ONNX Runtime's
    fused kernels on this CPU and the graph's reference arithmetic (median and largest ``|change|``, logits).

    Why: ONNX Runtime runs an int8 graph in integer kernels chosen for the CPU at hand, and they do not all
    compute the same thing. On x86 without VNNI (AVX2, AVX-512 alone), products of uint8 activations and
    int8 weights are summed in pairs into 16 bits, which saturate; with VNNI they are summed exactly. 1.1.0's
    graph (uint8 x int8) moved by up to 1.09 logits on an AVX2 machine, which re-chose its validation
    threshold (0.088 against 0.103) and cost 0.044 of test specificity. The reference run (nothing fused:
    float arithmetic on the dequantised values) is the same everywhere, so a graph close to it on this CPU
    scores as its card says here.
    """
    from fracdet.models.compiled import OnnxRuntime, compiled_outputs

    if model.graph is None:
        raise ValueError(f"{model.name} has PyTorch weights: only a compiled graph has kernels to check")
    fused = compiled_outputs(model, images).margins
    reference = compiled_outputs(model, images, runtime=OnnxRuntime(model.graph, spin="never", kernels="reference"))
    change = np.abs(fused - reference.margins)
    return {"median": float(np.median(change)), "max": float(change.max())}


def quantize_graph(
    source: Path,
    target: Path,
    images: np.ndarray,
    *,
    keep_float: Sequence[str] = (),
    int8_format: str = "u8s7",
    calibration_batch: int = 1,
) -> Path:
    """Quantise the exported :class:`~fracdet.models.graph.ScoringGraph` at ``source`` into ``target`` (see
    :data:`QUANTISATION`), its activation ranges read from ``images`` (``(N, S, S)`` uint8 at the graph's
    input side; the appearance input made from each when the graph takes one); ``keep_float`` names nodes
    left in float; ``int8_format`` is a key of :data:`INT8_FORMATS`. Only the graph: :func:`quantize_model`
    makes a model of it.

    ``calibration_batch`` radiographs are run at a time and their activations merged into each tensor's
    histogram before the next ones run (0: all at once). ONNX Runtime keeps every activation of every
    radiograph of a round, about 0.34 GiB each for an anti-aliased fused model at 320 px, so all 64 at once
    (as 1.1.1 was made) took 24 GB; one at a time 1.4 GiB, whatever the count. The merged histograms
    are not the one-shot ones (each round's values are binned on the edges the first round set), and the
    margins they give differ from one-shot's by about as much as another draw of calibration radiographs
    does, no further from the float model's (``benchmarks/quantize_memory.py``, ``docs/BENCHMARKS.md``).

    An activation's range is the 99.999th percentile of its values, not their extremes: a few outlying
    values would otherwise stretch the range that every other value is rounded to. On validation, 1.0.0's
    int8 boxes hit 0.509 of fractures with percentile ranges against 0.472 with the extremes (MinMax; float
    0.481), AUC 0.942 with both (``models/README.md``, the int8 release's card).

    Weights take 7 bits (``reduce_range``): on x86 without VNNI, ONNX Runtime sums pairs of uint8 x int8
    products in 16 bits, and full 8-bit weights saturate them (1.1.0's margins moved by up to 1.09 logits on
    an AVX2 machine; int8 activations do the same, 0.90). With 7-bit weights a pair cannot saturate, so every
    CPU computes the same integers (:func:`kernel_change`)."""
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as exc:
        raise ImportError(_HINT) from exc
    from fracdet.data.embed import embedder_input

    if int8_format not in INT8_FORMATS:
        raise ValueError(f"int8_format must be one of {', '.join(INT8_FORMATS)}, not {int8_format!r}")
    activations, weights, seven_bits = INT8_FORMATS[int8_format]
    if calibration_batch < 0 or (calibration_batch and len(images) % calibration_batch):
        raise ValueError(f"calibration_batch must divide the {len(images)} calibration radiographs (or be 0: all "
                         f"at once), not {calibration_batch}")  # fmt: skip
    appearance = any(i.name == "appearance" for i in onnx.load(str(source), load_external_data=False).graph.input)

    class Calibration(CalibrationDataReader):
        """The calibration radiographs, one at a time, as the graph takes them; ``set_range`` picks the round."""

        def __init__(self) -> None:
            self.next, self.end = 0, len(images)

        def __len__(self) -> int:
            return len(images)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.next, self.end = start_index, end_index

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.next >= self.end:
                return None
            image, self.next = images[self.next], self.next + 1
            feed = {"image": image[None, None]}
            if appearance:
                feed["appearance"] = embedder_input([image])[:, None]
            return feed

    rounds = {"CalibStridedMinMax": calibration_batch} if calibration_batch else {}  # set_range, one round each
    with _quiet_quantiser():
        quantize_static(str(source), str(target), Calibration(), quant_format=QuantFormat.QDQ, per_channel=True,
                        calibrate_method=CalibrationMethod.Percentile,
                        activation_type=QuantType[activations], weight_type=QuantType[weights],
                        reduce_range=seven_bits, nodes_to_exclude=list(keep_float),
                        extra_options=rounds)  # fmt: skip
    return Path(target)


def float_nodes(graph: str | Path, *, map_head: bool = True, stride: int = 0) -> list[str]:
    """Names of the nodes of the exported graph at ``graph`` that an int8 graph keeps in float, to pass to
    :func:`quantize_graph` as ``keep_float``: the score head, with ``map_head`` a localiser's map head
    (:func:`quantize_model`'s ``float_map_head`` says why each), and with ``stride`` the layers at that stride
    or finer (:func:`fine_nodes`)."""
    import onnx

    loaded = onnx.load(str(graph))  # 48 MiB for the fused localiser: read once
    kept = _score_head(loaded.graph) + (_map_head(loaded.graph) if map_head else [])
    return kept + [name for name in (_fine_nodes(loaded, stride) if stride else []) if name not in kept]


def fine_nodes(graph: str | Path, *, stride: int) -> list[str]:
    """Names of the nodes of the exported graph at ``graph`` that make the margin from images at ``stride`` or
    finer (an output at least ``1/stride`` of the side of the input its network reads), to keep in float.

    The first layers carry the finest detail, and rounding their activations to 256 levels moves the int8
    margins most: with the stems in float (``stride`` 2) the margins stay three to seven times closer to the
    float model's, for up to a tenth more time. It was tried against int8's share of the verdict flips under
    re-saves and did not reduce it (docs/STABILITY.md, *Anti-aliasing*, measurement 6), so it is an option;
    what it did keep is ranking: an anti-aliased pilot's int8 graph lost 0.011 of validation AUC without it and
    0.001 with ``stride`` 2 (measurement 7).
    A network's input is the graph's ``image`` or a ``Resize`` of it (a part of a fused model reads the
    radiograph squashed to its own side; a map upsampled keeps its network's); sides come from ONNX shape
    inference, so ``stride`` 2 keeps the stem of an EfficientNet-Lite, 4 its first two stages too. Nodes
    that only feed the input gate's embedding are left to quantise."""
    import onnx

    return _fine_nodes(onnx.load(str(graph)), stride)


def _fine_nodes(loaded: Any, stride: int) -> list[str]:
    """:func:`fine_nodes` of an ONNX model already ``loaded``."""
    import onnx

    if stride < 1:
        raise ValueError(f"stride must be at least 1, not {stride}")
    proto = onnx.shape_inference.infer_shapes(loaded).graph
    sides: dict[str, int] = {}
    for value in [*proto.input, *proto.value_info, *proto.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].dim_value:
            sides[value.name] = dims[2].dim_value
    _, reach = _reach(proto)
    network_side = {i.name: sides[i.name] for i in proto.input if i.name in sides}  # each tensor's network's input side
    kept = []
    for node in proto.node:  # topologically sorted, as ONNX requires
        bases = [network_side[name] for name in node.input if name in network_side]
        if node.op_type == "Resize" and bases and sides.get(node.input[0]) == bases[0]:  # the image, resized
            network_side.update({name: sides[name] for name in node.output if name in sides})
            continue
        if not bases:
            continue
        network_side.update(dict.fromkeys(node.output, bases[0]))
        side = sides.get(node.output[0])
        if side and side * stride >= bases[0] and "margin" in reach.get(node.name, ()):
            kept.append(node.name)
    return kept


def _describe(model: TrainedModel, stage: Path, graph: dict[str, Any], *, name: str, version: str) -> None:
    """Write the compiled model's ``model.json``: the float model's description without what was fitted on
    its margins, and the graph."""
    from fracdet.utils.atomic import write_json

    meta = {k: v for k, v in model.meta.items() if k not in _REFITTED}
    meta.update(name=name, version=version, schema_version=GRAPH_SCHEMA_VERSION, task=model.task,
                input_size=model.preprocess.input_size, mean=list(model.preprocess.mean),
                std=list(model.preprocess.std), tta=model.tta, peak_weight=model.peak_weight,
                operating_point=model.operating_point, graph=graph)  # fmt: skip
    for file in ("splits.csv", "config.yaml"):  # the split it is checked on, and how its float model was trained
        if model.folder is not None and (model.folder / file).is_file():
            shutil.copy2(model.folder / file, stage / file)
    write_json(stage / "model.json", meta)


def _calibrate(compiled: TrainedModel, val_set: PixelSet, margins: np.ndarray, *, boxes: bool) -> dict[str, Any]:
    """Fit ``compiled``'s temperature, thresholds and (``boxes``: a localiser that grows boxes from its map) box
    edge on its own validation ``margins``, as training fits a float model's; returns what was fitted."""
    from fracdet.training.calibrate import choose_thresholds, fit_box_relative, fit_temperature, probabilities

    labels = val_set.table["label"].to_numpy(int)
    compiled.temperature = fit_temperature(margins, labels)
    compiled.thresholds = choose_thresholds(labels, probabilities(margins, compiled.temperature))
    compiled.threshold = compiled.thresholds[compiled.operating_point]
    fitted: dict[str, Any] = {"temperature": compiled.temperature, "thresholds": compiled.thresholds,
                              "threshold": compiled.threshold}  # fmt: skip
    if boxes and compiled.task == "localise" and "boxes" in val_set.table:
        expert = [b if isinstance(b, list) else [] for b in val_set.table["boxes"]]
        fitted["box_relative_val_iou"] = fit_box_relative(compiled, val_set.images, labels, expert)
        fitted["box_relative"] = compiled.meta["box_relative"]
    return fitted


def _reach(graph: Any) -> tuple[dict[str, Any], dict[str, set[str]]]:
    """Each tensor's producing node, and the graph outputs each node's results reach (by node name)."""
    producer = {name: node for node in graph.node for name in node.output}
    reach: dict[str, set[str]] = {}
    for out in graph.output:
        stack = [out.name]
        while stack:
            node = producer.get(stack.pop())
            if node is None or out.name in reach.setdefault(node.name, set()):
                continue
            reach[node.name].add(out.name)
            stack.extend(node.input)
    return producer, reach


def _map_head(graph: Any) -> list[str]:
    """Names of the nodes of the ONNX ``graph`` that make a localiser's map from the backbone's features:
    those whose results reach the ``dense`` output but not the ``features`` output."""
    _, reach = _reach(graph)
    return [name for name, reached in reach.items() if "dense" in reached and "features" not in reached]


def _score_head(graph: Any) -> list[str]:
    """Names of the nodes of the ONNX ``graph`` that make the ``margin`` from pooled features and from a
    localiser's map: those downstream of a pooling node or of the map, whose results reach the margin (the
    linear heads, the map's peak, the fusion). Not "every node that reaches the margin only": a fused
    classifier's whole backbone does."""
    from collections import defaultdict

    producer, reach = _reach(graph)
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    starts = [n for n in graph.node if n.op_type in ("GlobalAveragePool", "ReduceMean")
              and "margin" in reach.get(n.name, ())]  # fmt: skip
    if "dense" in producer:
        starts.append(producer["dense"])
    downstream: set[str] = set()
    stack = [name for node in starts for name in node.output]
    while stack:
        for node in consumers[stack.pop()]:
            if node.name not in downstream:
                downstream.add(node.name)
                stack.extend(node.output)
    return [n.name for n in graph.node if n.name in downstream and "margin" in reach.get(n.name, ())]


@contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """The exporter's optimiser and ONNX Runtime's quantiser log every step and piece of advice through the root
    logger, and its percentile calibration prints its progress; a command's output should not carry them."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
