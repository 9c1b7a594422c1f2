"""The fast path: one ONNX graph per model, the same answers as PyTorch, concurrent and batched predictions.

Timings are not tested here (they live in ``benchmarks/realtime.py``); what is tested is that the fast path
gives the same outputs as the PyTorch path, which it must to be worth measuring.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracdet.data.decode import ImageReadError
from fracdet.explain import Explainer
from fracdet.inference import Prediction, Predictor, collect_inputs
from fracdet.inference.onnx import OnnxRuntime, cached_export
from fracdet.models import create_model, load
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel
from tests.conftest import SAMPLE


@pytest.fixture(autouse=True)
def _isolated_onnx_cache(cache_dir, monkeypatch):
    monkeypatch.setenv("FRACDET_CACHE", str(cache_dir))


@pytest.fixture(scope="module")
def shipped() -> TrainedModel:
    return load("fracatlas-default")  # an int8 graph: ONNX Runtime only


@pytest.fixture(scope="module")
def localiser() -> TrainedModel:
    return load("fracatlas-localiser")  # the float model the default was quantised from


@pytest.fixture(scope="module")
def samples() -> list[Path]:
    return collect_inputs([SAMPLE / "images"])


def tiny(arch: str, size: int = 64, seed: int = 0) -> TrainedModel:
    import torch

    torch.manual_seed(seed)
    module = create_model(arch, input_size=size).eval()
    return TrainedModel(module=module, name=f"tiny-{arch}", arch=arch, preprocess=PreprocessCfg(size),
                        thresholds={"sens90": 0.3, "spec95": 0.6}, threshold=0.3, operating_point="sens90")  # fmt: skip


def test_the_float_localiser_answers_alike_in_onnx_runtime_and_pytorch_on_every_bundled_sample(localiser, samples):
    fast = Predictor(localiser, backend="onnxruntime")
    reference = Predictor(localiser, backend="pytorch")
    assert (fast.backend, reference.backend) == ("onnxruntime", "pytorch")
    assert fast.runtime.appearance, "the gate's appearance embedder runs inside the same graph"
    answered = 0
    for path in samples:
        a, b = (outcome(p, path) for p in (fast, reference))
        if isinstance(a, str) or isinstance(b, str):  # unreadable or refused: alike, with the same reason
            assert a == b, path.name
            continue
        answered += 1
        assert abs(a.probability - b.probability) <= 1e-4, path.name
        assert np.abs(a.heatmap - b.heatmap).max() <= 1e-3, path.name
        assert (a.label, a.level, a.input_check, a.box is None) == (b.label, b.level, b.input_check, b.box is None)
    assert answered >= 40


def outcome(predictor: Predictor, path: Path) -> Prediction | str:
    try:
        return predictor.predict_bytes(path.read_bytes(), path.name)
    except ImageReadError as exc:
        return str(exc)


def test_the_graphs_cam_is_the_librarys_grad_cam():
    model = tiny("efficientnet_lite0")
    image = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    predicted = Predictor(model, gate=False, backend="onnxruntime").predict_pixels(image / 255.0)
    library = Explainer(model, exact=True)(image[None]).heatmaps[0]
    assert np.abs(predicted.heatmap - library).max() <= 1e-3


def test_a_localisers_map_and_boxes_are_the_same_in_both_back_ends():
    model = tiny("localiser_lite0")
    images = np.random.default_rng(2).random((3, 80, 96)).astype(np.float32)
    fast = Predictor(model, gate=False, backend="onnxruntime").predict_batch(list(images))
    reference = Predictor(model, gate=False, backend="pytorch").predict_batch(list(images))
    for a, b in zip(fast, reference, strict=True):
        assert abs(a.probability - b.probability) <= 1e-4 and np.abs(a.heatmap - b.heatmap).max() <= 1e-3
        assert [x.level for x in a.boxes] == [x.level for x in b.boxes]
        assert all(np.allclose(x.xyxy, y.xyxy, atol=1e-3) for x, y in zip(a.boxes, b.boxes, strict=True))


@pytest.mark.parametrize("name", ["fracatlas-localiser", "fracatlas-classifier"])
def test_export_writes_a_self_describing_graph_with_a_dynamic_batch(name, tmp_path, cache_dir):
    model, out = load(name), tmp_path / f"{name}.onnx"
    done = subprocess.run([sys.executable, "-m", "fracdet", "export", "--model", name, "--format", "onnx",
                           "--out", str(out)], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    runtime = OnnxRuntime(out, threads=1)
    assert runtime.inputs == ["image", "appearance"]
    own = {"localise": "dense", "classify": "cams"}[model.task]  # a localiser's map, a classifier's CAM
    assert runtime.outputs == ["margin", own, "features", "embedding"]
    assert runtime.meta["version"] == model.version and runtime.meta["temperature"] == model.temperature
    assert runtime.meta["thresholds"] == model.thresholds and runtime.meta["mean"] == [0.5, 0.5, 0.5]
    images = np.random.default_rng(3).integers(0, 256, (3, 320, 320), dtype=np.uint8)
    small = np.random.default_rng(4).integers(0, 256, (3, 128, 128), dtype=np.uint8)
    batch, one = runtime(images, small), runtime(images[:1], small[:1])
    assert batch.margins.shape == (3,) and batch.embedding.shape == (3, 1280)
    per_image = batch.dense if own == "dense" else batch.cams
    assert per_image.ndim == 4 and per_image.shape[0] == 3  # (N, channels or members, h, w)
    np.testing.assert_allclose(batch.margins[:1], one.margins, atol=1e-4)


def test_a_damaged_cached_graph_is_exported_again_not_trusted(cache_dir):
    model = tiny("paper_cnn", size=32, seed=5)
    path = cached_export(model)
    assert cached_export(model) == path, "a second use takes the cached file"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cached_export(model) == path
    OnnxRuntime(path)  # loads: it was written anew
    before = path.read_bytes()
    assert cached_export(tiny("paper_cnn", size=32, seed=6)) != path, "other weights get another graph"
    assert path.read_bytes() == before


def test_concurrent_predictions_on_one_predictor_equal_sequential_ones(shipped, samples):
    predictor = Predictor(shipped)
    files = [p.read_bytes() for p in samples[:12]]
    sequential = [predictor.predict_bytes(data).probability for data in files]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda data: predictor.predict_bytes(data).probability, files))
    assert concurrent == pytest.approx(sequential, abs=1e-6)


def test_batched_folder_prediction_gives_the_rows_of_one_at_a_time(shipped, samples, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in samples[:9]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(folder / "blank.png")
    paths = collect_inputs([folder])
    predictor = Predictor(shipped, heatmaps=False)
    batched = predictor.predict_files(paths, batch_size=4, decoders=3)
    single = predictor.predict_files(paths, batch_size=1, decoders=1)
    concurrent = predictor.predict_files(paths, batch_size=2, decoders=2, scorers=3)  # batches scored at once
    assert list(batched["path"]) == [str(p) for p in paths], "rows keep the order of the files"
    errors = batched.set_index("path")["error"]
    assert errors.notna().sum() == 2 and "blank" in errors[str(folder / "blank.png")], "read and gate errors kept"
    for other in (single, concurrent):
        assert batched.drop(columns="probability").equals(other.drop(columns="probability"))
        np.testing.assert_allclose(batched["probability"].astype(float), other["probability"].astype(float),
                                   atol=1e-5)  # fmt: skip
    for boxes in batched["boxes"].dropna():  # the shipped localiser's boxes, at most 3, in [0, 1]
        assert len(json.loads(boxes)) <= 3
        assert all(0 <= b[k] <= 1 for b in json.loads(boxes) for k in ("x0", "y0", "x1", "y1"))


def test_predicting_and_serving_start_without_the_libraries_only_training_and_evaluation_need():
    # Each of these costs a half to one second of every command's start, and `fracdet predict` over a folder
    # pays it once per run: torchvision (transforms, box ops), pytorch-grad-cam (Grad-CAM++ only), scipy.stats.
    code = (
        "import sys; import fracdet.cli, fracdet.serve, fracdet.inference, fracdet.training, fracdet.dicom; "
        "from fracdet.models import load; from fracdet.inference import Predictor; "
        "Predictor(load('fracatlas-default')).predict_bytes(open(sys.argv[1], 'rb').read()); "
        "print(sorted(m for m in ('torchvision', 'pytorch_grad_cam', 'scipy.stats') if m in sys.modules))"
    )
    sample = SAMPLE / "images" / "Fractured" / "IMG0000261.jpg"
    out = subprocess.run([sys.executable, "-c", code, str(sample)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_lone_call_takes_the_spinning_session_and_one_among_others_the_sleeping_one():
    import threading

    runtime = OnnxRuntime(cached_export(tiny("paper_cnn", size=32, seed=5)), threads=2)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    first_running, release, used = threading.Event(), threading.Event(), []

    class Watched:  # the real session, recording which one ran; the first call holds until released
        def __init__(self, session, name: str) -> None:
            self.session, self.name = session, name

        def run(self, *args):
            used.append(self.name)
            if len(used) == 1:
                first_running.set()
                release.wait(10)
            return self.session.run(*args)

    spinning, sleeping = runtime._alone, runtime.session
    runtime._alone, runtime.session = Watched(spinning, "spinning"), Watched(sleeping, "sleeping")
    with ThreadPoolExecutor(1) as pool:
        lone = pool.submit(runtime, images)
        assert first_running.wait(10)
        during = runtime(images)  # while the lone call runs
        release.set()
        alone = lone.result()
    after = runtime(images)
    assert used == ["spinning", "sleeping", "spinning"]
    for outputs in (during, after):  # one graph: the same answers whichever session ran
        np.testing.assert_array_equal(outputs.margins, alone.margins)
    assert OnnxRuntime(cached_export(tiny("paper_cnn", size=32, seed=5)), threads=1)._alone is None
    with pytest.raises(ValueError, match="spin"):
        OnnxRuntime(cached_export(tiny("paper_cnn", size=32, seed=5)), spin="sometimes")
