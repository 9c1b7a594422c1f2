"""The web application's API and the batch predictor: good images answered, every bad input a clear 4xx."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fracdet.inference import Predictor, collect_inputs
from fracdet.models import create_model
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel
from fracdet.serve import ServeConfig, create_app
from tests.borderline import at_the_flag
from tests.images import truncate

FRACTURED = "images/Fractured/IMG0000261.jpg"


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    module = create_model("paper_cnn", input_size=32).eval()
    return TrainedModel(module=module, name="test-model", arch="paper_cnn", preprocess=PreprocessCfg(32),
                        threshold=0.3, operating_point="sens90", meta={"version": "0.0-test"})  # fmt: skip


@pytest.fixture(scope="module")
def client(model) -> TestClient:
    return TestClient(create_app(model))


def post(client: TestClient, data: bytes, name: str = "x.jpg", mime: str = "image/jpeg"):
    return client.post("/api/v1/predict", files={"file": (name, data, mime)})


def test_a_radiograph_gets_probability_label_threshold_heatmap_and_box(client, sample_root):
    response = post(client, (sample_root / FRACTURED).read_bytes())
    assert response.status_code == 200
    body = response.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["label"] == ("fracture" if body["probability"] >= 0.3 else "no fracture")
    assert body["threshold"] == 0.3 and body["operating_point"] == "sens90"
    assert body["model"] == {"name": "test-model", "version": "0.0-test", "arch": "paper_cnn"}
    assert f"{100 * body['probability']:.0f}%" in body["summary"]
    width, height = Image.open(sample_root / FRACTURED).size
    assert body["image_size"] == {"width": width, "height": height}
    heatmap = Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"])))
    assert heatmap.mode == "RGBA" and max(heatmap.size) == 64, "small: the map is coarse, the browser scales it"
    assert heatmap.size[0] / heatmap.size[1] == pytest.approx(width / height, rel=0.02), "the radiograph's aspect"
    assert body["image_png"] is None, "the client has its own JPEG: no copy is sent back"
    assert body["box"] is None or all(0 <= v <= 1 for v in body["box"])
    assert body["latency_ms"] > 0


def test_the_image_is_sent_back_only_when_a_browser_cannot_show_the_file_or_when_asked(client, sample_root):
    jpeg = (sample_root / FRACTURED).read_bytes()
    width, height = Image.open(io.BytesIO(jpeg)).size
    buffer = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).convert("L").save(buffer, format="TIFF")
    tiff = post(client, buffer.getvalue(), "x.tif", "image/tiff")
    asked = client.post("/api/v1/predict?image=true", files={"file": ("x.jpg", jpeg, "image/jpeg")})
    for response in (tiff, asked):
        assert response.status_code == 200
        shown = Image.open(io.BytesIO(base64.b64decode(response.json()["image_png"])))
        assert max(shown.size) == min(512, max(width, height))
        assert shown.size[0] / shown.size[1] == pytest.approx(width / height, rel=0.02), "never squashed to a square"


def test_the_model_endpoint_names_the_back_end_and_the_workers(client):
    info = client.get("/api/v1/model").json()
    assert info["backend"] == "onnxruntime", "ONNX Runtime is installed by default, so it serves"
    assert info["workers"] >= 1 and info["threads_per_worker"] is None, "every core by default: the fastest answer"
    assert client.get("/api/v1/health").json()["backend"] == "onnxruntime"


def test_threads_per_prediction_can_be_asked_for_and_are_reported(model):
    with TestClient(create_app(model, ServeConfig(threads=1))) as one_each:
        assert one_each.get("/api/v1/model").json()["threads_per_worker"] == 1


def test_png_and_16_bit_uploads_are_read(client, sample_root):
    grey = np.asarray(Image.open(sample_root / FRACTURED).convert("L"), dtype=np.uint16)
    grey16 = Image.fromarray(grey * 257)
    buffer = io.BytesIO()
    grey16.save(buffer, format="PNG")
    assert post(client, buffer.getvalue(), "x.png", "image/png").status_code == 200


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"hello, this is text", 415, "not an image"),
        (b"%PDF-1.7\n" + b"0" * 500, 415, "not an image"),
        (b"\0" * 128 + b"DICM" + b"\0" * 200, 415, "DICOM"),
    ],
)
def test_bad_uploads_get_a_4xx_naming_the_problem(client, payload, status, words):
    response = post(client, payload)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_truncated_image_is_refused(client, sample_root):
    response = post(client, truncate((sample_root / FRACTURED).read_bytes()))
    assert response.status_code == 422
    assert "truncated" in response.json()["detail"]


def test_missing_file_field_is_a_422(client):
    assert client.post("/api/v1/predict").status_code == 422


def test_limits_upload_size_and_pixel_count(model, sample_root):
    data = (sample_root / FRACTURED).read_bytes()
    small = TestClient(create_app(model, ServeConfig(max_upload_mb=len(data) / 2 / 2**20)))
    response = post(small, data)
    assert response.status_code == 413 and "too large" in response.json()["detail"]
    few_pixels = TestClient(create_app(model, ServeConfig(max_pixels=10_000)))
    response = post(few_pixels, data)
    assert response.status_code == 413 and "pixels" in response.json()["detail"]


def test_slow_predictions_time_out(model, sample_root):
    impatient = TestClient(create_app(model, ServeConfig(timeout_s=1e-6)))
    response = post(impatient, (sample_root / FRACTURED).read_bytes())
    assert response.status_code == 504


def test_server_stays_up_after_bad_input(client, sample_root):
    for payload in (b"", b"junk", truncate((sample_root / FRACTURED).read_bytes())):
        post(client, payload)
    assert client.get("/api/v1/health").json()["status"] == "ok"
    assert post(client, (sample_root / FRACTURED).read_bytes()).status_code == 200


def test_model_health_openapi_and_page(client):
    info = client.get("/api/v1/model").json()
    assert info["threshold"] == 0.3 and info["limits"]["max_upload_mb"] == 50
    assert info["tta"] is False  # said, because it changes what a probability means
    assert client.get("/docs").status_code == 200
    assert "/api/v1/predict" in client.get("/openapi.json").json()["paths"]
    page = client.get("/").text
    assert 'name="viewport"' in page
    # nothing fetched from outside: hospital networks are often offline
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)


# --- batch prediction ---------------------------------------------------------------------------


def test_predict_files_gives_one_row_per_file_and_error_rows(model, sample_root, tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    good = tmp_path / "in" / "sub" / "good.jpg"
    good.write_bytes((sample_root / FRACTURED).read_bytes())
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    paths = collect_inputs([tmp_path / "in"])
    assert {p.name for p in paths} == {"good.jpg", "broken.png"}
    table = Predictor(model).predict_files(paths, heatmap_dir=tmp_path / "heat")
    assert list(table.columns) == ["path", "probability", "label", "threshold", "heatmap", "error", "level", "boxes",
                                   "warning", "study", "borderline"]  # fmt: skip
    row = table.set_index(table["path"].map(lambda p: p.rsplit("/", 1)[-1]))
    assert row.loc["broken.png", "error"] and pd.isna(row.loc["broken.png", "probability"])
    assert pd.isna(row.loc["good.jpg", "error"]) and Image.open(row.loc["good.jpg", "heatmap"]).mode == "RGB"


def test_collect_inputs_takes_globs_and_refuses_nothing(sample_root, tmp_path):
    found = collect_inputs([str(sample_root / "images" / "Fractured" / "*.jpg")])
    assert found and all(p.suffix == ".jpg" for p in found)
    with pytest.raises(FileNotFoundError, match="no input files"):
        collect_inputs([tmp_path / "nothing*.png"])


def test_predict_command_writes_csv_json_and_exit_codes(tmp_path, sample_root, monkeypatch, model, capsys):
    from fracdet import cli

    monkeypatch.setattr("fracdet.models.load", lambda name: model)
    good = sample_root / FRACTURED
    (tmp_path / "bad.jpg").write_bytes(b"junk")
    assert cli.main(["predict", str(good), "--out", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert len(rows) == 1 and rows[0]["error"] is None and isinstance(rows[0]["borderline"], bool)
    assert f"({int(rows[0]['borderline'])} borderline)" in capsys.readouterr().out
    assert cli.main(["predict", str(good), str(tmp_path / "bad.jpg"), "--out", str(tmp_path / "r.csv")]) == 1
    assert cli.main(["predict", str(tmp_path / "bad.jpg")]) == 4
    assert cli.main(["predict", str(tmp_path / "missing.jpg")]) == 2


def test_an_access_token_guards_uploads_and_leaves_health_open(model, sample_root):
    guarded = TestClient(create_app(model, ServeConfig(access_token="s3cret-ward-7-token")))
    data = (sample_root / FRACTURED).read_bytes()
    missing = post(guarded, data)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = guarded.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                         headers={"Authorization": "Bearer nope"})  # fmt: skip
    assert wrong.status_code == 401
    right = guarded.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")},
                         headers={"Authorization": "Bearer s3cret-ward-7-token"})  # fmt: skip
    assert right.status_code == 200
    assert guarded.get("/api/v1/health").status_code == 200
    assert "s3cret" not in repr(ServeConfig(access_token="s3cret-ward-7-token"))


@pytest.mark.parametrize(("size", "expected"), [((2048, 2560), (51, 64)), ((3000, 600), (160, 32)),
                                                ((9000, 30), (256, 1))])  # fmt: skip
def test_the_heatmap_keeps_the_aspect_and_at_least_a_pixel_per_map_cell_across_its_short_side(size, expected):
    from fracdet.serve.app import _heatmap_size

    assert _heatmap_size(size) == expected


def test_a_verdict_near_the_flag_is_called_borderline_and_one_far_from_it_is_not(model, sample_root):
    """Within half a logit of the threshold a re-saved copy of the radiograph may get the other verdict, so the
    answer says so, and so does the batch table."""
    paths = [sample_root / FRACTURED, sample_root / "images/Non_fractured/IMG0000003.jpg"]
    flagged = at_the_flag(model, [p.read_bytes() for p in paths])
    client = TestClient(create_app(flagged))
    near, far = (post(client, p.read_bytes()).json() for p in paths)
    assert near["probability"] == pytest.approx(0.5, abs=0.05) and abs(far["probability"] - 0.5) > 0.49
    assert near["borderline"] is True and far["borderline"] is False
    assert Predictor(flagged).predict_files(paths)["borderline"].tolist() == [True, False]
