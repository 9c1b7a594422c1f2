"""An int8 model (``fracdet quantize``) is a model of its own: a compiled graph, fitted again on its own outputs,
that loads, scores, predicts and serves like any other, and is never scored by the float network.

Whether int8 pays (its validation AUC and speed on FracAtlas) is measured in ``benchmarks/``, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fracdet.cli import main
from fracdet.data.pixels import load_pixels
from fracdet.inference import Predictor
from fracdet.inference.gate import InputGate, image_features
from fracdet.inference.quantize import MAX_KERNEL_CHANGE
from fracdet.models import create_model, load, save_model
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel
from fracdet.serve import create_app
from fracdet.training.calibrate import choose_thresholds, fit_temperature, probabilities
from tests.conftest import SAMPLE
from tests.test_training import sample_manifest

FRACTURED = SAMPLE / "images" / "Fractured" / "IMG0000261.jpg"


@pytest.fixture(scope="module")
def table():
    return sample_manifest(SAMPLE)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory, table, cache_dir) -> Path:
    """A small localiser with its input gate, saved with its split manifest as a release would be."""
    import torch

    from fracdet.inference.gate import fit_gate_on_splits, save_gate
    from fracdet.utils.cache import FeatureCache

    torch.manual_seed(0)
    module = create_model("localiser_lite0", input_size=64).eval()
    model = TrainedModel(module=module, name="tiny", arch="localiser_lite0", preprocess=PreprocessCfg(64),
                         thresholds={"sens90": 0.3, "spec95": 0.6}, threshold=0.3, operating_point="sens90",
                         meta={"version": "0.1.0", "box_relative": 0.5})  # fmt: skip
    folder = save_model(model, tmp_path_factory.mktemp("float") / "tiny")
    table[["path", "split"]].to_csv(folder / "splits.csv", index=False)
    model = load(folder)
    distance, limits, _, appearance = fit_gate_on_splits(model, table, cache=FeatureCache(cache_dir))
    save_gate(model, distance, limits, folder, appearance)
    return folder


@pytest.fixture(scope="module")
def int8_folder(float_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("int8") / "tiny-int8"
    # An untrained network ranks the sample by chance, so the AUC rule is loosened here; its other side is
    # specified below.
    assert main(["quantize", str(float_model), "--data", str(SAMPLE), "--out", str(out), "--calibration", "8",
                 "--max-auc-drop", "1"]) == 0  # fmt: skip
    return out


def test_a_quantised_model_is_an_int8_graph_without_pytorch_weights_that_names_its_origin(int8_folder):
    import onnx

    model = load(int8_folder)
    assert model.module is None and model.graph == int8_folder / "model.onnx"
    assert (model.name, model.version, model.precision, model.task) == ("tiny-int8", "0.1.0+int8", "int8", "localise")
    assert not (int8_folder / "model.safetensors").exists()
    assert model.meta["graph"]["quantised_from"] == "tiny 0.1.0"
    ops = {node.op_type for node in onnx.load(str(model.graph)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert set(model.meta["graph"]["val_auc"]) == {"float32", "int8"}


def test_its_temperature_thresholds_and_gate_are_fitted_on_its_own_validation_outputs(int8_folder, float_model, table):
    model = load(int8_folder)
    val = load_pixels(table[table["split"] == "val"].reset_index(drop=True), 64)
    labels = val.table["label"].to_numpy(int)
    margins = model.margins(val.images)
    assert model.temperature == pytest.approx(fit_temperature(margins, labels))
    expected = choose_thresholds(labels, probabilities(margins, model.temperature))
    assert model.thresholds == pytest.approx(expected)
    assert model.threshold == model.thresholds["sens90"]
    assert not np.allclose(margins, load(float_model).margins(val.images), atol=1e-4), "int8 margins are its own"
    assert "box_relative_val_iou" in model.meta
    gate = InputGate.of(model)
    assert gate.fitted and gate.checks_appearance
    assert model.meta["gate"] != load(float_model).meta["gate"]
    features = Predictor(model).runtime(val.images[:2], _appearance(val.images[:2])).features
    assert np.allclose(image_features(model, val.images[:2]), features, atol=1e-5), "the gate sees what scores"


def _appearance(images):
    from fracdet.data.embed import embedder_input

    return embedder_input(list(images))


def test_it_predicts_and_serves_like_any_model_and_says_so(int8_folder):
    model = load(int8_folder)
    predictor = Predictor(model)
    assert predictor.backend == "onnxruntime"
    prediction = predictor.predict_bytes(FRACTURED.read_bytes(), FRACTURED.name)
    assert 0.0 <= prediction.probability <= 1.0 and prediction.heatmap is not None
    client = TestClient(create_app(model))
    info = client.get("/api/v1/model").json()
    assert (info["precision"], info["backend"], info["version"]) == ("int8", "onnxruntime", "0.1.0+int8")
    body = client.post("/api/v1/predict", files={"file": ("x.jpg", FRACTURED.read_bytes(), "image/jpeg")}).json()
    assert body["probability"] == pytest.approx(prediction.probability, abs=1e-6)


def test_it_has_no_pytorch_path_and_a_damaged_graph_is_refused(int8_folder, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="cannot run in PyTorch"):
        Predictor(load(int8_folder), backend="pytorch")
    damaged = shutil.copytree(int8_folder, tmp_path / "damaged")
    data = bytearray((damaged / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (damaged / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load(damaged)


def test_an_int8_graph_that_loses_validation_auc_is_not_written(float_model, tmp_path):
    from fracdet.inference.quantize import quantize_model

    out = tmp_path / "refused"
    # Asking int8 to beat float by a whole unit of AUC cannot be met: the rule's refusing side.
    with pytest.raises(ValueError, match="not kept"):
        quantize_model(load(float_model), sample_manifest(SAMPLE), out, calibration=4, max_auc_drop=-1.0)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")], "no half-made folder left behind"


def test_an_int8_graph_whose_kernels_here_stray_from_its_arithmetic_is_not_written(float_model, tmp_path):
    from fracdet.inference.quantize import quantize_model

    out = tmp_path / "refused"
    # No change at all is below any CPU's rounding: the rule's refusing side (its passing side is in model.json).
    with pytest.raises(ValueError, match=r"reference arithmetic .* not kept"):
        quantize_model(load(float_model), sample_manifest(SAMPLE), out, calibration=4, max_auc_drop=1.0,
                       max_kernel_change=-1.0)  # fmt: skip
    assert not out.exists()


def test_calibration_runs_in_rounds_whose_histograms_merge_to_ranges_near_the_one_shot_ones(float_model, tmp_path):
    # All 64 radiographs at once held every activation of each: 24 GB for a fused model at 320 px. Rounds
    # hold one round's (benchmarks/quantize_memory.py); one round of all is the one-shot calibration exactly.
    import onnx
    from onnx import numpy_helper

    from fracdet.inference.onnx import export_onnx
    from fracdet.inference.quantize import float_nodes, quantize_graph

    model = load(float_model)
    source = export_onnx(model, tmp_path / "float.onnx", embedder=InputGate.of(model).embedder().network)
    images = load_pixels(sample_manifest(SAMPLE).head(6), 64).images

    def scales(batch: int) -> dict[str, float]:
        graph = onnx.load(str(quantize_graph(source, tmp_path / f"int8-{batch}.onnx", images,
                                             keep_float=float_nodes(source), calibration_batch=batch)))  # fmt: skip
        init = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
        return {node.input[0]: float(init[node.input[1]].ravel()[0]) for node in graph.graph.node
                if node.op_type == "QuantizeLinear" and node.input[1] in init}  # fmt: skip

    at_once, one_round, singly = scales(0), scales(6), scales(1)
    assert at_once and one_round == at_once
    assert singly.keys() == at_once.keys() and singly != at_once, "merged histograms are not the one-shot's"
    ratio = np.array([singly[k] / at_once[k] for k in at_once])
    assert np.median(np.abs(np.log(ratio))) < 0.01, "most ranges within a percent of one-shot's"
    with pytest.raises(ValueError, match="must divide the 6 calibration radiographs"):
        quantize_graph(source, tmp_path / "int8-4.onnx", images, calibration_batch=4)


def test_the_layers_that_read_the_finest_detail_can_stay_float(float_model, tmp_path):
    # The first layers carry the finest detail; kept float, the int8 margins follow the float model's closely
    # (docs/STABILITY.md, *Anti-aliasing*, measurement 6).
    import onnx

    from fracdet.inference.onnx import export_onnx
    from fracdet.inference.quantize import fine_nodes, quantize_model

    model = load(float_model)
    graph = export_onnx(model, tmp_path / "float.onnx", embedder=InputGate.of(model).embedder().network)
    by_stride = {stride: set(fine_nodes(graph, stride=stride)) for stride in (1, 2, 4, 8)}
    assert by_stride[1] < by_stride[2] < by_stride[4] < by_stride[8], "a coarser stride keeps more layers float"
    with pytest.raises(ValueError, match="stride"):
        fine_nodes(graph, stride=0)

    made = quantize_model(model, sample_manifest(SAMPLE), tmp_path / "fine", calibration=4, max_auc_drop=1.0,
                          float_stride=2).model  # fmt: skip
    assert made.meta["graph"]["float_nodes"].endswith("and every layer at stride 2 or finer)")
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(made.graph))).graph
    side = {v.name: v.type.tensor_type.shape.dim[2].dim_value for v in [*proto.value_info, *proto.output]
            if len(v.type.tensor_type.shape.dim) == 4}  # fmt: skip
    quantised = {node.output[0] for node in proto.node if node.op_type == "DequantizeLinear"}
    convs = {node.name: (side.get(node.output[0]), node.input[1] in quantised) for node in proto.node
             if node.op_type == "Conv"}  # fmt: skip
    fine = {name: convs[name] for name in by_stride[2] if name in convs}
    assert fine and {s for s, _ in fine.values()} == {32}, "the 64-px network's stem, at stride 2"
    assert not any(q for _, q in fine.values()), "they keep float weights"
    assert any(q for name, (s, q) in convs.items() if name not in fine and s == 16), "the stages after are int8"


def test_model_json_of_a_compiled_model_says_which_graph_and_how_it_was_made(int8_folder):
    meta = json.loads((int8_folder / "model.json").read_text())
    assert meta["schema_version"] == 3
    graph = meta["graph"]
    assert graph["precision"] == "int8" and len(graph["sha256"]) == 64
    assert "static quantisation" in graph["method"] and "8 training radiographs" in graph["calibration"]
    assert "7-bit" in graph["method"], "weights that cannot saturate 16-bit pair sums on CPUs without VNNI"
    assert 0 <= graph["kernel_change"]["median"] <= graph["kernel_change"]["max"] <= MAX_KERNEL_CHANGE
    assert graph["float_nodes"].endswith("(the score head and the map head)"), "a localiser's map stays float"


def test_its_graph_describes_itself_with_its_own_calibration_through_release_and_export(int8_folder, tmp_path):
    from fracdet.inference.onnx import OnnxRuntime
    from fracdet.models import package_release

    model = load(int8_folder)
    released = load(package_release(int8_folder, "tiny-fast", version="0.2.0", dest=tmp_path / "models"))
    out = tmp_path / "exported.onnx"
    assert main(["export", "--model", str(released.folder), "--out", str(out)]) == 0
    for graph, owner in ((model.graph, model), (released.graph, released), (out, released)):
        meta = OnnxRuntime(graph, threads=1).meta  # the file alone, without its folder
        assert (meta["name"], meta["version"]) == (owner.name, owner.version)
        assert meta["temperature"] == owner.temperature and meta["thresholds"] == owner.thresholds
        assert meta["gate"] == owner.meta["gate"] and meta["inputs"] == ["image", "appearance"]
        assert "sha256" not in meta["graph"], "no file holds its own hash"
    assert released.meta["graph"]["sha256"] != model.meta["graph"]["sha256"]  # re-sealed, and loads: hash right


def test_what_needs_pytorch_weights_is_refused_by_name_and_points_at_the_float_model(int8_folder, capsys):
    from fracdet.models import NoWeightsError

    again = int8_folder.parent / "again"
    for argv in (["predict", str(FRACTURED), "--model", str(int8_folder), "--backend", "pytorch"],
                 ["quantize", str(int8_folder), "--data", str(SAMPLE), "--out", str(again)]):  # fmt: skip
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("error: tiny-int8 0.1.0+int8 is a compiled int8 graph") and "tiny 0.1.0 can" in error
    assert not again.exists()
    with pytest.raises(NoWeightsError, match=r"cannot give Grad-CAM heatmaps; its float model tiny 0\.1\.0 can"):
        load(int8_folder).network("give Grad-CAM heatmaps")
