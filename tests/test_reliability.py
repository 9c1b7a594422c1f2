"""The server under load and faults: bounded queue, cancelled work, streaming limits, no leaks.

These are specifications of the execution model (:mod:`fracdet.serve.executor`, :mod:`fracdet.serve.guard`):
states are asserted, not times. Streaming limits are checked against a real uvicorn server on a socket,
since an in-process client reads the whole body before the app sees it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from fracdet.inference import Cancelled, Predictor
from fracdet.models import create_model, load
from fracdet.models._registry import PreprocessCfg
from fracdet.models.release import TrainedModel
from fracdet.serve import ServeConfig, create_app, uvicorn_config
from fracdet.serve.executor import InferenceExecutor, ServerBusyError
from fracdet.serve.guard import SECURITY_HEADERS

REPO = Path(__file__).resolve().parents[1]

FRACTURED = "images/Fractured/IMG0000261.jpg"
SAMPLE_RADIOGRAPH = Path(__file__).resolve().parents[1] / "samples" / "fracatlas" / FRACTURED


@pytest.fixture(scope="module")
def model() -> TrainedModel:
    module = create_model("paper_cnn", input_size=32).eval()
    return TrainedModel(module=module, name="test-model", arch="paper_cnn", preprocess=PreprocessCfg(32),
                        threshold=0.3, operating_point="sens90", meta={"version": "0.0-test"})  # fmt: skip


def wait_until(condition, seconds: float = 30.0) -> None:
    """Poll ``condition`` (a state, not a duration, is what the tests assert); fail after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def idle(executor: InferenceExecutor) -> bool:
    stats = executor.stats()
    return stats["waiting"] == 0 and stats["running"] == 0


# --- the executor --------------------------------------------------------------------------------


def test_the_executor_runs_a_bounded_number_and_refuses_beyond_its_queue():
    release = threading.Event()
    with InferenceExecutor(workers=1, queue_size=2) as executor:
        running, _ = executor.submit(lambda cancel: release.wait())
        wait_until(lambda: executor.stats()["running"] == 1)
        waiting = [executor.submit(lambda cancel, k=k: k)[0] for k in range(2)]
        with pytest.raises(ServerBusyError, match="busy") as refused:
            executor.submit(lambda cancel: None)
        assert refused.value.retry_after_s > 0
        assert (executor.stats()["running"], executor.stats()["waiting"], executor.stats()["refused"]) == (1, 2, 1)
        release.set()
        assert running.result(10) is True and [f.result(10) for f in waiting] == [0, 1]
        assert executor.stats()["completed"] == 3


def test_work_given_up_while_waiting_never_runs_and_running_work_stops_at_its_next_check():
    import asyncio

    release, started, ran = threading.Event(), threading.Event(), []

    def blocker(cancel: threading.Event) -> None:
        started.set()
        release.wait()

    def cooperative(cancel: threading.Event) -> None:
        started.set()
        while not cancel.is_set():
            time.sleep(0.001)
        raise Cancelled("stopped")

    with InferenceExecutor(workers=1, queue_size=4) as executor:
        executor.submit(blocker)
        started.wait(10)
        with pytest.raises(TimeoutError):
            asyncio.run(executor.run(lambda cancel: ran.append(1), timeout=0.05))
        release.set()
        wait_until(lambda: idle(executor))
        assert ran == [] and executor.stats()["cancelled"] == 1  # dropped when its turn came

        started.clear()
        with pytest.raises(TimeoutError):
            asyncio.run(executor.run(cooperative, timeout=0.05))
        wait_until(lambda: idle(executor))
        assert executor.stats()["cancelled"] == 2 and executor.stats()["running"] == 0


def test_a_failing_job_reaches_its_caller_and_the_worker_lives_on():
    with InferenceExecutor() as executor:
        future, _ = executor.submit(lambda cancel: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            future.result(10)
        assert executor.submit(lambda cancel: "still here")[0].result(10) == "still here"
        assert executor.stats()["failed"] == 1


# --- the application ------------------------------------------------------------------------------


def test_after_a_504_the_abandoned_prediction_never_runs_and_holds_nothing(model, sample_root):
    data = (sample_root / FRACTURED).read_bytes()
    with TestClient(create_app(model, ServeConfig(timeout_s=0.2))) as client:
        executor = client.app.state.executor
        release = threading.Event()
        try:
            for _ in range(executor.workers):  # every worker is busy
                executor.submit(lambda cancel: release.wait())
            wait_until(lambda: executor.stats()["running"] == executor.workers)
            response = client.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")})
            assert response.status_code == 504 and "longer than" in response.json()["detail"]
        finally:
            release.set()
        wait_until(lambda: idle(executor))
        stats = executor.stats()
        assert (stats["cancelled"], stats["running"], stats["waiting"]) == (1, 0, 0)
        assert stats["completed"] == executor.workers
        assert executor.submit(lambda cancel: "free")[0].result(10) == "free"  # nothing holds the worker


def test_a_full_queue_gets_503_with_retry_after_and_health_never_waits(model, sample_root):
    data = (sample_root / FRACTURED).read_bytes()
    with TestClient(create_app(model, ServeConfig(queue_size=1))) as client:
        executor = client.app.state.executor
        release = threading.Event()
        try:
            for k in range(executor.workers):  # one at a time: the queue holds only one waiting job
                executor.submit(lambda cancel: release.wait())
                wait_until(lambda k=k: executor.stats()["running"] == k + 1)
            executor.submit(lambda cancel: None)  # the one queue slot
            response = client.post("/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")})
            assert response.status_code == 503 and "busy" in response.json()["detail"]
            assert int(response.headers["Retry-After"]) > 0
            health = client.get("/api/v1/health").json()  # answered while every inference slot is taken
            assert health["status"] == "ok" and health["inference"]["running"] == executor.workers
            assert health["inference"]["refused"] == 1
        finally:
            release.set()


def test_two_file_parts_are_refused_rather_than_one_silently_winning(model, sample_root):
    data = (sample_root / FRACTURED).read_bytes()
    client = TestClient(create_app(model))
    response = client.post("/api/v1/predict", files=[("file", ("a.jpg", data, "image/jpeg")),
                                                     ("file", ("b.jpg", data, "image/jpeg"))])  # fmt: skip
    assert response.status_code == 422 and "2 'file' parts" in response.json()["detail"]


def test_every_response_carries_security_headers_and_docs_need_no_cdn(model):
    client = TestClient(create_app(model))
    for path in ("/", "/api/v1/health", "/docs"):
        response = client.get(path)
        assert response.status_code == 200
        assert all(response.headers.get(k) == v for k, v in SECURITY_HEADERS.items()), path
    docs = client.get("/docs").text
    assert "cdn" not in docs.lower() and client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


# --- a real server on a socket: limits while streaming ------------------------------------------------


@contextmanager
def live_server(model: TrainedModel, config: ServeConfig) -> Iterator[int]:
    server = uvicorn.Server(uvicorn_config(create_app(model, config), port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started and server.servers)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def multipart_head(boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()  # fmt: skip


def read_reply(s: socket.socket) -> bytes:
    """A whole HTTP response (headers and the body its ``content-length`` announces) from a socket."""
    s.settimeout(30)
    reply = b""
    while piece := s.recv(65536):
        reply += piece
        head, blank, body = reply.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: *(\d+)", head, re.IGNORECASE)
        if blank and length and len(body) >= int(length.group(1)):
            break
    return reply


def test_a_chunked_upload_over_the_limit_is_refused_while_it_streams(model):
    total, chunk = 64 * 2**20, b"\0" * 2**16
    with live_server(model, ServeConfig(max_upload_mb=1)) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n")  # fmt: skip
        head = multipart_head("b0")
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        sent = 0
        try:
            while sent < total and not select.select([s], [], [], 0)[0]:
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = read_reply(s)
    assert reply.startswith(b"HTTP/1.1 413") and b"upload too large: limit is 1 MB" in reply
    assert sent < total / 2  # refused while streaming, not after spooling it all


def test_a_stalled_upload_is_closed_with_408(model):
    with live_server(model, ServeConfig(upload_idle_s=0.3)) as port, socket.create_connection(("127.0.0.1", port)) as s:
        head = multipart_head("b0")
        s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n" + head)  # fmt: skip
        reply = read_reply(s)  # the client sends nothing more
    assert reply.startswith(b"HTTP/1.1 408") and b"upload stalled" in reply


def send_slowly(s: socket.socket, pieces: list[bytes], gap_s: float) -> bytes:
    """Send ``pieces`` ``gap_s`` apart until the server answers or closes; all it answered until it closed
    the connection (a ``TimeoutError`` if it has not closed it within 30 s)."""
    for piece in pieces:
        try:
            s.sendall(piece)
        except OSError:  # closed by the server before this piece
            break
        if select.select([s], [], [], gap_s)[0]:
            break
    s.settimeout(30)
    reply = b""
    with contextlib.suppress(ConnectionResetError):
        while piece := s.recv(65536):
            reply += piece
    return reply


def test_an_upload_that_trickles_gets_408_and_its_connection_is_closed_though_no_chunk_came_late(model):
    with live_server(model, ServeConfig(upload_idle_s=0.5)) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
                  b"Content-Type: multipart/form-data; boundary=b0\r\n\r\n" + multipart_head("b0"))  # fmt: skip
        # a byte every 0.1 s: never idle for 0.5 s, but far under 500 bytes/s; its bytes must not keep it open
        reply = send_slowly(s, [b"a"] * 100, 0.1)
    assert reply.startswith(b"HTTP/1.1 408") and b"upload too slow: under 500 bytes/s" in reply


def test_a_request_whose_headers_trickle_gets_408_and_its_connection_is_closed(model):
    headers = [b"GET /api/v1/health HTTP/1.1\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(200)]
    with live_server(model, ServeConfig(header_timeout_s=0.5)) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:  # a header line every 0.1 s, never the end
            reply = send_slowly(s, headers, 0.1)
        assert reply.startswith(b"HTTP/1.1 408") and b"request headers took over 0.5 s" in reply
        with socket.create_connection(("127.0.0.1", port)) as s:  # opened, and nothing sent: closed, no reply
            s.settimeout(30)
            assert s.recv(1) == b""
        with socket.create_connection(("127.0.0.1", port)) as s:  # the server still answers whole requests
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_reply(s).startswith(b"HTTP/1.1 200")


def test_a_kept_alive_connection_gets_a_new_header_deadline_for_each_request(model):
    request = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    config = ServeConfig(header_timeout_s=1.0)
    with live_server(model, config) as port, socket.create_connection(("127.0.0.1", port)) as s:
        for _ in range(3):  # each within its own second, 0.6 s apart: longer than one deadline in all
            time.sleep(0.6)
            s.sendall(request)
            assert read_reply(s).startswith(b"HTTP/1.1 200")
        s.sendall(request[:20])  # then part of a fourth, and nothing more
        assert send_slowly(s, [], 0).startswith(b"HTTP/1.1 408")


def test_a_server_raises_its_open_file_limit_to_the_hard_one():
    import resource

    from fracdet.serve.server import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        assert raise_open_file_limit()[0] == low
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- memory ---------------------------------------------------------------------------------------------


def rss_mib() -> float:
    with Path("/proc/self/status").open() as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_memory_stays_flat_over_1000_predictions_with_heatmaps():
    predictor = Predictor(load("fracatlas-default"))  # the shipped model: its map, boxes and gate on
    image = np.asarray(Image.open(SAMPLE_RADIOGRAPH).convert("L"), np.float32) / 255
    for _ in range(30):
        predictor.predict_pixels(image)
    before = rss_mib()
    for _ in range(1000):
        predictor.predict_pixels(image)
    assert rss_mib() - before < 20.0


def test_no_hook_outlives_a_grad_cam_prediction_in_pytorch():
    predictor = Predictor(load("fracatlas-classifier"), backend="pytorch")  # Grad-CAM heatmaps from its layer
    image = np.asarray(Image.open(SAMPLE_RADIOGRAPH).convert("L"), np.float32) / 255
    assert predictor.predict_pixels(image).heatmap is not None
    assert not any(m._forward_hooks for m in predictor.model.module.modules())


# --- inputs the decoder and the commands must not trust -------------------------------------------------


def test_only_radiograph_containers_are_opened_and_eps_never_reaches_ghostscript():
    from fracdet.data.decode import UnsupportedImageError, decode_image

    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(UnsupportedImageError, match=r"supported format .*JPEG, PNG"):
        decode_image(eps, name="x.eps")
    webp = io.BytesIO()
    Image.new("L", (50, 40), 128).save(webp, "WEBP")
    assert decode_image(webp.getvalue()).format == "WEBP"


def _edit_json(folder: Path, **changes) -> None:
    meta = json.loads((folder / "model.json").read_text())
    meta.update(changes)
    (folder / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def _flip_a_byte(path: Path, at: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF  # inside the tensors, past the header: the file still parses
    path.write_bytes(bytes(data))


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGED_MODELS = [  # (what happened to the folder, how, words the error must hold)
    ("model.json is not JSON", lambda f: (f / "model.json").write_text("{not json"), "not valid JSON"),
    ("model.json lost a key", lambda f: _edit_json(f, input_size=None), "no 'input_size'"),
    ("model.json names no known network", lambda f: _edit_json(f, model="resnet9000"), "resnet9000"),
    ("a weight's bytes changed", lambda f: _flip_a_byte(f / "model.safetensors"), "SHA-256"),
    ("the weights cut short", lambda f: _cut(f / "model.safetensors"), "SHA-256"),
    ("the weights cut short, from before checksums",
     lambda f: (_edit_json(f, weights_sha256=None), _cut(f / "model.safetensors")), "cannot be read"),
    ("another network's weights", lambda f: _edit_json(f, input_size=64, model="paper_cnn", weights_sha256=None,
                                                       dropout=0.9), "do not fit"),
]  # fmt: skip


@pytest.mark.parametrize(("damage", "how", "words"), DAMAGED_MODELS, ids=[d[0] for d in DAMAGED_MODELS])
def test_a_damaged_model_folder_is_refused_by_name_not_loaded_and_not_a_traceback(tmp_path, model, damage, how,
                                                                                  words, capsys):  # fmt: skip
    from fracdet.cli import main
    from fracdet.models import ModelLoadError, save_model

    folder = save_model(model, tmp_path / "model")
    if damage == "another network's weights":  # a model.json that describes another network than the weights
        other = create_model("efficientnet_lite0", input_size=64).eval()
        save_model(TrainedModel(module=other, name="other", arch="efficientnet_lite0", preprocess=PreprocessCfg(64)),
                   tmp_path / "other")  # fmt: skip
        (folder / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    how(folder)
    with pytest.raises(ModelLoadError, match=re.escape(words)):
        load(folder)
    assert main(["predict", str(SAMPLE_RADIOGRAPH), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err


def test_the_shipped_models_know_their_own_bytes(tmp_path):
    from fracdet.models import ModelLoadError
    from fracdet.models.release import releases_dir

    for name in ("fracatlas-classifier", "fracatlas-localiser"):  # the compiled default checks its graph
        copy = tmp_path / name
        shutil.copytree(releases_dir() / name, copy)
        _flip_a_byte(copy / "model.safetensors")
        with pytest.raises(ModelLoadError, match="SHA-256"):
            load(copy)
    shutil.copytree(releases_dir() / "fracatlas-classifier", tmp_path / "gate")
    _flip_a_byte(tmp_path / "gate" / "gate.safetensors")
    with pytest.raises(ModelLoadError, match=r"gate\.safetensors: its SHA-256"):
        create_app(load(tmp_path / "gate"))


def test_a_checkpoint_cut_short_is_refused_by_name(tmp_path, model):
    from fracdet.models import ModelLoadError, save_model

    folder = save_model(model, tmp_path / "run")
    checkpoint = folder / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": model.module.state_dict()}, checkpoint)
    _cut(checkpoint)
    with pytest.raises(ModelLoadError, match=r"last\.pt: cannot be read"):
        load(checkpoint)


def test_resuming_a_folder_that_is_no_run_or_a_damaged_checkpoint_says_so_in_one_line(tmp_path, sample_root, capsys):
    """Found 6 Dec (stop 74): `--resume` on a mistyped folder said `[Errno 2] ... splits.csv`, and on a run
    whose last.pt was damaged ended in pickle's UnpicklingError traceback."""
    from fracdet.cli import main

    from .test_training import sample_manifest

    resume = ["train", "--resume", "--data", str(sample_root), "--out"]
    with pytest.raises(SystemExit, match=r"not a run folder \(no config.yaml or splits.csv\)"):
        main([*resume, str(tmp_path / "typo")])
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text((REPO / "configs" / "paper.yaml").read_text())
    sample_manifest(sample_root).to_csv(run / "splits.csv", index=False)
    (run / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    assert main([*resume, str(run)]) == 2
    assert "last.pt: cannot be read as a checkpoint (UnpicklingError): it is damaged" in capsys.readouterr().err


@pytest.mark.parametrize("limit", ["max_upload_mb", "max_pixels", "timeout_s", "queue_size", "upload_idle_s",
                                   "workers", "threads"])  # fmt: skip
def test_a_server_limit_that_would_serve_nothing_is_refused_when_it_starts(limit):
    for value in (0, -1, float("nan")):
        with pytest.raises(ValueError, match=f"must be positive: {limit} "):
            ServeConfig(**{limit: value})


def test_a_server_setting_that_cannot_work_or_leaves_uploads_open_is_refused_when_it_starts(tmp_path, capsys,
                                                                                             monkeypatch):  # fmt: skip
    """Found trying `fracdet serve` as hospital IT would: an empty token file served with no token at all
    (uploads of patient data open to anyone who reached the port); `--workers 100000` started threads until
    the system refused one, then hung; `--port 99999` ended in a traceback from the event loop."""
    from fracdet.cli import main
    from fracdet.utils.workers import worker_count

    most = 4 * worker_count()
    for setting in ({"workers": most + 1}, {"threads": most + 1}):
        with pytest.raises(ValueError, match=f"at most 4 per core the process may use \\({most} here\\)"):
            ServeConfig(**setting)
    with pytest.raises(ValueError, match="at least 16 characters") as refused:
        ServeConfig(access_token="hunter2")
    assert "hunter2" not in str(refused.value)
    assert ServeConfig(workers=most, access_token="a" * 16).worker_count == most

    (tmp_path / "token").write_text("\n")
    monkeypatch.delenv("FRACDET_TOKEN", raising=False)
    assert main(["serve", "--token-file", str(tmp_path / "token"), "--model", str(tmp_path / "no-model")]) == 2
    assert "is empty: write the access token into it" in capsys.readouterr().err
    (tmp_path / "token").write_bytes(b"\xff\xfe")
    for where in (tmp_path / "token", tmp_path):  # bytes that are not text; a folder
        assert main(["serve", "--token-file", str(where), "--model", str(tmp_path / "no-model")]) == 2
        assert "cannot read the token file" in capsys.readouterr().err
    monkeypatch.setenv("FRACDET_TOKEN", "")
    assert main(["serve", "--model", str(tmp_path / "no-model")]) == 2
    assert "FRACDET_TOKEN is set but empty" in capsys.readouterr().err
    monkeypatch.delenv("FRACDET_TOKEN")
    assert main(["serve", "--workers", str(most + 1), "--model", str(tmp_path / "no-model")]) == 2
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--port", "99999"])
    assert stopped.value.code == 2 and "a port is 1 to 65535" in capsys.readouterr().err


def test_the_advertised_pixel_limit_is_the_one_that_holds():
    from fracdet.data.decode import ImageTooLargeError, decode_image

    side = 9_500  # 90.25 M pixels: above Pillow's own 89.5 M guard, below fracdet's 100 M
    png = io.BytesIO()
    Image.new("1", (side, side)).save(png, "PNG")  # a few KiB on disk
    with pytest.raises(ImageTooLargeError, match="exceeds the limit of 90,000,000"):
        decode_image(png.getvalue(), name="big.png", max_pixels=90_000_000)
    assert decode_image(png.getvalue(), name="big.png").pixels.shape == (side, side)


def test_predict_picks_up_webp_and_dicom_files_in_folders_and_names_what_it_cannot_read(model, tmp_path,
                                                                                        sample_root):  # fmt: skip
    from fracdet.inference import collect_inputs

    Image.open(sample_root / FRACTURED).save(tmp_path / "a.webp")
    (tmp_path / "b.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    paths = collect_inputs([tmp_path])
    assert [p.name for p in paths] == ["a.webp", "b.dcm"]
    table = Predictor(model, heatmaps=False).predict_files(paths)
    assert table["error"].isna().tolist() == [True, False] and "DICOM" in table["error"].iloc[1]


def test_what_is_named_like_an_image_but_is_no_file_gets_a_row_saying_so_and_never_blocks(model, tmp_path,
                                                                                          sample_root):  # fmt: skip
    from fracdet.inference import collect_inputs

    (tmp_path / "ok.jpg").write_bytes((sample_root / FRACTURED).read_bytes())
    (tmp_path / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    (tmp_path / "zero.png").symlink_to("/dev/zero")  # read to the end, it would fill memory
    os.mkfifo(tmp_path / "pipe.tif")  # opened for reading, it would wait for a writer forever
    (tmp_path / "folder.jpg").mkdir()
    paths = collect_inputs([tmp_path])
    assert [p.name for p in paths] == ["broken.jpg", "ok.jpg", "pipe.tif", "zero.png"]

    result: list = []
    reader = threading.Thread(target=lambda: result.append(Predictor(model, heatmaps=False).predict_files(paths)),
                              daemon=True)  # fmt: skip
    reader.start()
    reader.join(timeout=60)
    assert not reader.is_alive(), "a named pipe blocked the reader"
    errors = dict(zip(result[0]["path"].map(lambda p: Path(p).name), result[0]["error"], strict=True))
    assert pd.isna(errors["ok.jpg"])
    assert "a link to nothing" in errors["broken.jpg"]
    assert "a named pipe" in errors["pipe.tif"]
    assert "a character device" in errors["zero.png"]


@pytest.mark.parametrize(("command", "option", "kind"), [
    (["predict", str(SAMPLE_RADIOGRAPH)], "--out", "file"),
    (["predict", str(SAMPLE_RADIOGRAPH)], "--studies", "file"),
    (["audit", "DATA"], "--json", "file"),
    (["audit", "DATA"], "--html", "file"),
    (["audit", "DATA"], "--montage", "file"),
    (["split", "DATA"], "--out", "file"),
    (["export", "fracatlas-classifier"], "--out", "file"),
    (["pacs", "pull", "--dicomweb", "http://pacs/dicom-web", "--study", "1.2"], "--out", "file"),
    (["evaluate", "fracatlas-default", "--data", "DATA", "--split", "test"], "--out", "folder"),
    (["pack", "DATA"], "--out", "folder"),
])  # fmt: skip
def test_an_output_that_could_not_be_written_is_refused_before_any_work(tmp_path, monkeypatch, command, option,
                                                                        kind):  # fmt: skip
    """Found 6 Dec (stops 73-74): each wrote its output only after its work (a folder's predictions, an audit's
    or a split's duplicate search, an evaluation, an export: minutes to hours), then failed on the path."""
    from fracdet.cli import main

    def too_late(*args, **kwargs):
        pytest.fail("the work began before the output was checked")

    for target in ("fracdet.models.load", "fracdet.data.load_dataset", "fracdet.dicom.dicomweb.DicomWeb"):
        monkeypatch.setattr(target, too_late)
    (tmp_path / "a-file").write_text("")
    argv = [str(tmp_path) if word == "DATA" else word for word in command]
    cases = [(tmp_path, "is a folder"), (tmp_path / "a-file" / "x.out", "is not a folder fracdet may write in")]
    if kind == "folder":
        cases = [
            (tmp_path / "a-file", "is a file"),
            (tmp_path / "a-file" / "x", "is not a folder fracdet may write in"),
        ]
    for target, words in cases:
        with pytest.raises(SystemExit, match=re.escape(f"{option} {target}") + ".*" + re.escape(words)):
            main([*argv, option, str(target)])


@pytest.mark.parametrize(("argv", "words"), [
    (["predict", "IMAGE", "--batch-size", "0"], "a whole number is 1 or more"),
    (["predict", "IMAGE", "--batch-size", "-3"], "a whole number is 1 or more"),
    (["predict", "--manifest", "M", "--engine", "dask", "--out", "O", "--workers", "0"], "1 or more"),
    (["predict", "--manifest", "M", "--engine", "dask", "--out", "O", "--partition-size", "0"], "1 or more"),
    (["pack", "DATA", "--out", "O", "--quality", "0"], "a quality is 1 to 100"),
    (["evaluate", "fracatlas-default", "--bootstrap", "0"], "1 or more"),
    (["train", "--resume", "--out", "O", "--stop-after", "0"], "1 or more"),
    (["sweep", "--config", "C", "--data", "DATA", "--epochs", "0"], "1 or more"),
])  # fmt: skip
def test_a_count_that_is_not_one_or_more_is_refused_before_any_work(argv, words, capsys):
    """Found 6 Dec (stop 74): `predict --batch-size 0` scored none of a folder and said "0 images", -3 was a
    traceback, and a Dask cluster of `--workers 0` waited for ever."""
    from fracdet.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([str(SAMPLE_RADIOGRAPH) if word == "IMAGE" else word for word in argv])
    assert stopped.value.code == 2 and words in capsys.readouterr().err


def test_the_library_refuses_counts_that_would_do_nothing(model):
    from fracdet.inference.archive import predict_archive

    with pytest.raises(ValueError, match="batch_size, scorers and decoders must be 1 or more"):
        Predictor(model, heatmaps=False).predict_files([SAMPLE_RADIOGRAPH], batch_size=0)
    with pytest.raises(ValueError, match="workers and partition_size must be 1 or more"):
        predict_archive("fracatlas-default", [str(SAMPLE_RADIOGRAPH)], "out", workers=0)


def test_a_file_larger_than_the_limit_is_refused_before_it_is_read(tmp_path):
    from fracdet.data.decode import DEFAULT_MAX_FILE_BYTES, ImageTooLargeError, read_file

    huge = tmp_path / "disk-image.dcm"
    with huge.open("wb") as fh:  # sparse: nothing is written, the size is what it claims
        fh.truncate(DEFAULT_MAX_FILE_BYTES + 1)
    with pytest.raises(ImageTooLargeError, match="larger than the 1024 MiB limit"):
        read_file(huge)
    small = tmp_path / "small.png"
    small.write_bytes(b"x" * 11)
    assert read_file(small, max_bytes=11) == b"x" * 11
    with pytest.raises(ImageTooLargeError, match="limit"):
        read_file(small, max_bytes=10)


def test_audit_and_split_fail_on_a_dataset_with_no_readable_file(tmp_path, cache_dir, capsys):
    from fracdet.cli import main

    for label in ("Fractured", "Non_fractured"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for k in range(3):
            (tmp_path / "data" / label / f"{k}.jpg").write_bytes(b"not a jpeg at all")
    data, cache = str(tmp_path / "data"), ["--cache-dir", str(cache_dir)]
    assert main(["audit", data, *cache]) == 4
    assert "none of the 6 files could be decoded" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"no file .* can go into a split .*unreadable.*nothing written"):
        main(["split", data, "--out", str(tmp_path / "s.csv"), *cache])
    assert not (tmp_path / "s.csv").exists()


# --- the input gate -------------------------------------------------------------------------------------


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "PNG" if mode != "F" else "TIFF")
    return buffer.getvalue()


NOT_RADIOGRAPHS = {
    "tiny": (png(np.full((20, 30), 128, np.uint8)), "too small"),
    "blank": (png(np.zeros((300, 200), np.uint8)), "blank"),
    "nearly uniform": (png((np.random.default_rng(0).random((300, 200)) * 3 + 120).astype(np.uint8)), "blank"),
    "non-finite": (png(np.where(np.eye(200, dtype=bool), np.nan, 0.5).astype(np.float32), "F"), "non-finite"),
    "colour": (png(np.random.default_rng(1).integers(0, 255, (200, 240, 3), dtype=np.uint8)), "colour image"),
}


@pytest.mark.parametrize("kind", list(NOT_RADIOGRAPHS))
def test_what_cannot_be_a_radiograph_gets_no_verdict_and_a_reason(model, kind):
    data, words = NOT_RADIOGRAPHS[kind]
    client = TestClient(create_app(model))
    response = client.post("/api/v1/predict", files={"file": (f"{kind}.png", data, "image/png")})
    assert response.status_code == 422 and words in response.json()["detail"]
    assert "probability" not in response.json()
    assert client.get("/api/v1/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def gated_model(tmp_path_factory, cache_dir):
    from fracdet.inference.gate import fit_gate_on_splits, save_gate
    from fracdet.models import save_model
    from fracdet.utils.cache import FeatureCache
    from tests.conftest import SAMPLE
    from tests.test_training import sample_manifest

    folder = save_model(
        TrainedModel(module=create_model("paper_cnn", input_size=64).eval(), name="gated", arch="paper_cnn",
                     preprocess=PreprocessCfg(64), threshold=0.5, meta={"version": "0.0-test", "model": "paper_cnn"}),
        tmp_path_factory.mktemp("gated") / "model",
    )  # fmt: skip
    table = sample_manifest(SAMPLE)
    model = load(folder)
    distance, limits, summary, appearance = fit_gate_on_splits(model, table, cache=FeatureCache(cache_dir))
    save_gate(model, distance, limits, folder, appearance)
    return folder, summary


def test_a_fitted_gate_travels_with_the_model_answers_radiographs_and_refuses_noise(gated_model, sample_root):
    folder, summary = gated_model
    model = load(folder)
    limits = model.meta["gate"]
    assert limits["warn"] <= summary["val_distance_quantiles"]["1"] < limits["refuse"]
    assert "val splits" in limits["chosen_on"] and "train split" in limits["fitted_on"]
    client = TestClient(create_app(model))
    body = client.post("/api/v1/predict", files={"file": ("x.jpg", (sample_root / FRACTURED).read_bytes(),
                                                           "image/jpeg")}).json()  # fmt: skip
    assert body["input_check"] in ("radiograph", "unusual") and 0 <= body["probability"] <= 1
    noise = png(np.random.default_rng(2).integers(0, 255, (400, 300), dtype=np.uint8))
    response = client.post("/api/v1/predict", files={"file": ("noise.png", noise, "image/png")})
    assert response.status_code == 422 and "does not look like a radiograph" in response.json()["detail"]


def test_the_gates_features_come_from_the_forward_that_scored_the_image(gated_model, sample_root):
    from fracdet.data.pixels import resize_square
    from fracdet.inference.gate import InputGate, image_features
    from fracdet.inference.onnx import runtime_for

    model = load(gated_model[0])
    pixels = np.asarray(Image.open(sample_root / FRACTURED).convert("L"), np.float32) / 255
    image = resize_square(pixels, 64)
    fitted_on = image_features(model, image[None])  # as the gate was fitted
    for backend in ("pytorch", "onnxruntime"):
        assert np.allclose(runtime_for(model, backend)(image[None]).features, fitted_on, atol=1e-4), backend
    assert not any(m._forward_hooks for m in model.module.modules()), "no hooks: concurrent predictions share it"
    assert InputGate.of(model).fitted


# --- faults ---------------------------------------------------------------------------------------------


def test_a_damaged_cache_entry_is_recomputed_not_trusted(sample_root, tmp_path, caplog):
    import sqlite3

    from fracdet.data.pixels import load_pixels
    from fracdet.utils.cache import FeatureCache
    from tests.test_training import sample_manifest

    table = sample_manifest(sample_root).head(6)
    with FeatureCache(tmp_path) as cache:
        clean = load_pixels(table, 32, cache=cache).images
        kind = next(k for (k,) in sqlite3.connect(cache.path).execute("SELECT DISTINCT kind FROM blobs"))
    with sqlite3.connect(tmp_path / "features.sqlite") as db:  # flip bytes of one stored array
        key, value = db.execute("SELECT key, value FROM blobs WHERE kind = ? LIMIT 1", (kind,)).fetchone()
        db.execute("UPDATE blobs SET value = ? WHERE kind = ? AND key = ?", (bytes(255 - b for b in value), kind, key))
    with FeatureCache(tmp_path) as cache:
        assert key not in cache.get_many(kind, [key])  # not trusted
        assert "failed their checksum" in caplog.text
        again = load_pixels(table, 32, cache=cache).images
        assert key in cache.get_many(kind, [key])  # recomputed and stored again
    assert np.array_equal(clean, again)


def test_predict_killed_midway_leaves_no_half_table_and_a_rerun_gives_each_file_once(tmp_path, sample_root):
    import os
    import signal
    import subprocess
    import sys

    import pandas as pd

    folder = tmp_path / "in"
    folder.mkdir()
    for k, path in enumerate(sorted((sample_root / "images").rglob("*.jpg"))[:12]):
        (folder / f"{k:02d}.jpg").write_bytes(path.read_bytes())
    out = tmp_path / "out.csv"
    command = [sys.executable, "-m", "fracdet.cli", "predict", str(folder), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    running = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(4)  # somewhere in loading or predicting: the invariant must hold wherever it is killed
    running.send_signal(signal.SIGKILL)
    running.wait(30)
    assert not out.exists() or len(pd.read_csv(out)) == 12  # never half a table
    assert subprocess.run(command, env=env, capture_output=True).returncode in (0, 1)
    table = pd.read_csv(out)
    assert len(table) == 12 and table["path"].is_unique


def test_a_server_killed_during_requests_comes_back_on_the_same_port_and_answers(gated_model, sample_root):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "fracdet.cli", "serve", "--model", str(gated_model[0]), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    base, data = f"http://127.0.0.1:{port}", (sample_root / FRACTURED).read_bytes()

    def start() -> subprocess.Popen:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # a start takes about 25 s on two cores busy with other work: the limit is for a server that hangs
            wait_until(lambda: _healthy(base), seconds=180)
        except AssertionError:
            server.kill()  # never left running after the test
            server.wait(30)
            raise
        return server

    server = start()
    in_flight = threading.Thread(target=lambda: _post_quietly(base, data), daemon=True)
    in_flight.start()
    server.send_signal(signal.SIGKILL)  # mid-request: no shutdown handler runs
    server.wait(30)
    in_flight.join(30)
    server = start()
    try:
        response = httpx.post(f"{base}/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=60)
        assert response.status_code == 200 and 0 <= response.json()["probability"] <= 1
    finally:
        server.terminate()
        server.wait(30)


def _healthy(base: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base}/api/v1/health", timeout=1).is_success
    except httpx.HTTPError:
        return False


def _post_quietly(base: str, data: bytes) -> None:
    import httpx

    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{base}/api/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}, timeout=30)


# --- a full disk ------------------------------------------------------------------------------------


def _files_cannot_grow_past(limit: int):
    """For ``preexec_fn``: no file of the child may grow past ``limit`` bytes, so its writes fail as on a
    full disk (``EFBIG`` where a full disk gives ``ENOSPC``; Python ignores the SIGXFSZ signal)."""

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _cli(*args: str, limit: int | None = None, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "FRACDET_CACHE": str(cache), "FRACDET_PROGRESS": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fracdet.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_files_cannot_grow_past(limit) if limit else None,
    )


def test_a_full_disk_stops_training_with_a_clear_error_and_nothing_half_written(sample_root, tmp_path):
    from fracdet.training.checkpoint import load_checkpoint

    from .test_training import sample_manifest

    run, cache, splits = tmp_path / "run", tmp_path / "cache", tmp_path / "splits.csv"
    sample_manifest(sample_root)[["path", "label", "group", "split"]].to_csv(splits, index=False)
    train = ["train", "--config", str(REPO / "configs" / "paper.yaml"), "--data", str(sample_root), "--out", str(run)]
    train += ["--splits", str(splits)]
    train += ["--set=image_size=32", "--set=batch_size=8", "--set=epochs=1"]
    full = _cli(*train, limit=16 * 1024, cache=cache)  # room for the run's records, not for a checkpoint
    assert full.returncode == 74, full.stderr[-2000:]
    assert "no space left to write" in full.stderr and "Traceback" not in full.stderr
    assert str(run / "checkpoints") in full.stderr  # names what it could not write
    assert not list(run.rglob("*.tmp"))  # the checkpoint being written is not there at all
    assert not (run / "checkpoints" / "last.pt").exists()
    again = _cli(*train, cache=cache)  # space freed: the same command trains the run
    assert again.returncode == 0, again.stderr[-2000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 0


def test_a_second_training_in_a_run_folder_that_is_training_is_refused_and_the_run_goes_on(sample_root, tmp_path,
                                                                                            monkeypatch):  # fmt: skip
    """Found 6 Dec (stop 77): a second `fracdet train --resume` of a run still training trained beside it in
    the same folder, each overwriting the other's checkpoints, and both ended with exit 0."""
    from fracdet.cli import EXIT_IN_USE, main

    from .test_training import sample_manifest

    monkeypatch.setenv("FRACDET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FRACDET_PROGRESS", "0")
    run = tmp_path / "run"
    second: list[int] = []

    def meanwhile(epoch: int, row: dict) -> None:  # the run is training: its folder is held
        if epoch == 1:
            second.append(main(["train", "--resume", "--out", str(run), "--data", str(sample_root)]))

    from fracdet.training import train
    from fracdet.training.config import load_config

    config = load_config(REPO / "configs" / "paper.yaml", ["image_size=32", "batch_size=8", "epochs=2"])
    result = train(config, sample_manifest(sample_root), run, on_epoch_end=meanwhile)
    assert second == [EXIT_IN_USE]
    assert list(result.history["epoch"]) == [1, 2] and (run / "model.json").is_file()
    assert main(["train", "--resume", "--out", str(run), "--data", str(sample_root)]) != EXIT_IN_USE  # released


def test_a_folder_held_by_a_process_killed_with_sigkill_is_free_at_once(tmp_path):
    """The lock is the kernel's (``flock``): nothing is left behind to clear by hand when a run is killed."""
    from fracdet.utils.lock import FolderInUseError, exclusive

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom fracdet.utils.lock import exclusive\n"
                               f"with exclusive({str(tmp_path)!r}, 'a test'):\n print('held', flush=True)\n"
                               " time.sleep(600)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO / "src")})  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match="in use by another process"), exclusive(tmp_path, "a test"):
            pass
    finally:
        holder.kill()
        holder.wait(30)
    with exclusive(tmp_path, "a test"):
        assert list(tmp_path.iterdir()) == []  # and nothing was written into the folder


def test_a_full_disk_leaves_no_half_written_heatmap_figure_or_table(sample_root, tmp_path):
    """Found 6 Dec (stop 74): `fracdet predict --heatmaps` on a full disk left a truncated PNG while the error
    said nothing was left half-written; figures, reports, tables, packs and split manifests were written in
    place too. Every file fracdet keeps now goes through `fracdet.utils.atomic`."""
    heatmaps, rows = tmp_path / "heatmaps", tmp_path / "rows.csv"
    full = _cli("predict", str(sample_root / "images"), "--heatmaps", str(heatmaps), "--out", str(rows),
                limit=48 * 1024, cache=tmp_path / "cache")  # fmt: skip
    assert full.returncode == 74 and "no space left to write" in full.stderr, full.stderr[-2000:]
    assert "Traceback" not in full.stderr and str(heatmaps) in full.stderr
    assert not list(tmp_path.rglob("*.tmp"))
    for kept in heatmaps.iterdir():  # what is there is whole
        Image.open(kept).load()
    split = _cli("split", str(sample_root), "--out", str(tmp_path / "splits.csv"), limit=1024,
                 cache=tmp_path / "cache")  # fmt: skip
    assert split.returncode == 74 and "Traceback" not in split.stderr, split.stderr[-2000:]
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.rglob("*.tmp"))


def test_a_full_disk_under_the_cache_slows_an_audit_down_but_neither_stops_nor_corrupts_it(sample_root, tmp_path):
    import sqlite3

    cache = tmp_path / "cache"
    full = _cli("audit", str(sample_root), limit=96 * 1024, cache=cache)
    warm = _cli("audit", str(sample_root), cache=cache)
    assert "going on without" in full.stderr and "Traceback" not in full.stderr
    assert full.returncode == warm.returncode and full.stdout == warm.stdout  # the same findings
    with sqlite3.connect(cache / "features.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
