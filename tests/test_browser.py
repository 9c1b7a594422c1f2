"""End to end in a real browser: Debian's chromium driven by Playwright opens the page, uploads a
radiograph and reads the verdict and the heatmap, at desktop and at phone size.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; ``.ci/run`` installs it). Skipped without it,
a failure without it under ``CI=true``. Screenshots go to ``$FRACDET_SCREENSHOTS`` (default: the test's
temporary folder).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path(os.environ.get("FRACDET_CHROMIUM", "/usr/bin/chromium"))
#: A radiograph the borderline server flags at its own score, and one it scores far from it.
BORDERLINE_FILES = ("images/Fractured/IMG0000261.jpg", "images/Non_fractured/IMG0000003.jpg")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        message = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires it")
        pytest.skip(message)
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server_url():
    from fracdet.models import create_model
    from fracdet.models._registry import PreprocessCfg
    from fracdet.models.release import TrainedModel

    model = TrainedModel(module=create_model("paper_cnn", input_size=64).eval(), name="browser-test",
                         arch="paper_cnn", preprocess=PreprocessCfg(64), threshold=0.4)  # fmt: skip
    yield from _serve(model)


@pytest.fixture(scope="module")
def localiser_url(sample_root_module):
    """A localiser (random weights) whose levels put its strongest box at *definite* and the next at *suspicious*."""
    import torch

    from fracdet.data import read_image
    from fracdet.data.pixels import resize_square
    from fracdet.models import create_model
    from fracdet.models._registry import PreprocessCfg
    from fracdet.models.release import TrainedModel

    torch.manual_seed(0)
    module = create_model("localiser_lite0").eval()
    torch.nn.init.normal_(module.map_head[-1].weight, std=0.5)  # a map with several peaks
    module.fusion.copy_(torch.tensor([1.0, 4.0, 0.0]))  # boxes then score by their own peak
    model = TrainedModel(module=module, name="browser-localiser", arch="localiser_lite0", preprocess=PreprocessCfg(64))
    image = resize_square(read_image(sample_root_module / "images" / "Fractured" / "IMG0000261.jpg"), 64)
    strongest, second = (b.score for b in model.score(image[None]).boxes[0][:2])
    model.thresholds = {"sens90": second - 1e-4, "spec95": (strongest + second) / 2}
    model.threshold = model.thresholds["sens90"]
    yield from _serve(model)


@pytest.fixture(scope="module")
def borderline_url(sample_root_module):
    """A classifier that scores the first of :data:`BORDERLINE_FILES` at its flag and the second far from it."""
    from fracdet.models import create_model
    from fracdet.models._registry import PreprocessCfg
    from fracdet.models.release import TrainedModel
    from tests.borderline import at_the_flag

    model = TrainedModel(module=create_model("paper_cnn", input_size=64).eval(), name="browser-borderline",
                         arch="paper_cnn", preprocess=PreprocessCfg(64))  # fmt: skip
    yield from _serve(at_the_flag(model, [(sample_root_module / name).read_bytes() for name in BORDERLINE_FILES]))


@pytest.fixture(scope="module")
def sample_root_module():
    from tests.conftest import SAMPLE

    return SAMPLE


def _serve(model, config=None):
    import uvicorn

    from fracdet.serve import create_app, uvicorn_config

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(model, config)
    server = uvicorn.Server(uvicorn_config(app, port=port, log_level="warning"))  # as `fracdet serve` runs it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FRACDET_SCREENSHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.mark.parametrize(("viewport", "name"), [({"width": 1280, "height": 900}, "desktop"),
                                                ({"width": 375, "height": 740}, "phone")])  # fmt: skip
def test_upload_shows_verdict_and_heatmap(browser, server_url, sample_root, tmp_path, viewport, name):
    page = browser.new_page(viewport=viewport)
    external = []
    local = (server_url, "data:", "blob:")  # blob: the user's own file, shown without a round trip
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith(local) else None)
    page.goto(server_url)
    chosen = sample_root / "images" / "Fractured" / "IMG0000261.jpg"
    page.set_input_files("#file", str(chosen))
    page.wait_for_selector("#result", state="visible", timeout=30_000)
    verdict = page.inner_text("#verdict")
    assert "%" in verdict and ("Fracture suspected" in verdict or "No fracture detected" in verdict)
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
    page.wait_for_function("document.getElementById('radiograph').naturalWidth > 0")
    assert page.evaluate("document.getElementById('radiograph').src").startswith("blob:"), "the file itself"
    # laid out in the radiograph's own aspect ratio, not squashed to a square
    width, height = Image.open(chosen).size
    box = page.evaluate("(() => { const r = document.getElementById('viewer').getBoundingClientRect();"
                        " return [r.width, r.height]; })()")  # fmt: skip
    assert box[0] / box[1] == pytest.approx(width / height, rel=0.02)
    # the overlay toggles off and on
    page.uncheck("#show-heatmap")
    assert page.evaluate("getComputedStyle(document.getElementById('heatmap')).display") == "none"
    page.check("#show-heatmap")
    # readable at phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    page.screenshot(path=str(_shots(tmp_path) / f"web-{name}.png"), full_page=True)
    assert not external, f"the page fetched outside resources: {external}"
    page.close()


def test_a_borderline_verdict_is_shown_as_uncertain_and_a_clear_one_is_not(browser, borderline_url, sample_root,
                                                                            tmp_path):  # fmt: skip
    page = browser.new_page(viewport={"width": 375, "height": 740})
    page.goto(borderline_url)
    near, far = (sample_root / name for name in BORDERLINE_FILES)
    page.set_input_files("#file", str(near))
    page.wait_for_selector("#result", state="visible", timeout=30_000)
    page.wait_for_selector("#borderline", state="visible", timeout=10_000)
    assert "Borderline" in page.inner_text("#borderline") and "uncertain" in page.inner_text("#borderline")
    page.screenshot(path=str(_shots(tmp_path) / "web-borderline.png"), full_page=True)
    page.set_input_files("#file", str(far))
    page.wait_for_selector("#borderline", state="hidden", timeout=30_000)
    assert "%" in page.inner_text("#verdict")
    page.close()


def test_a_bad_file_shows_a_clear_message(browser, server_url, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not an image")
    page = browser.new_page()
    page.goto(server_url)
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error", state="visible", timeout=30_000)
    assert "not an image" in page.inner_text("#error")
    page.close()


def test_a_localisers_boxes_are_drawn_by_level_with_a_legend_and_the_map_toggles(browser, localiser_url, sample_root,
                                                                                 tmp_path):  # fmt: skip
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(localiser_url)
    page.set_input_files("#file", str(sample_root / "images" / "Fractured" / "IMG0000261.jpg"))
    page.wait_for_selector("#result", state="visible", timeout=30_000)
    assert page.locator("#boxes rect.definite").count() == 1
    assert page.locator("#boxes rect.suspicious").count() >= 1
    assert page.get_attribute("#boxes rect.suspicious >> nth=0", "stroke-dasharray")
    assert not page.get_attribute("#boxes rect.definite", "stroke-dasharray")
    assert page.is_visible("#legend") and "definite (≥" in page.inner_text("#legend")
    assert "Fracture likely (definite level)" in page.inner_text("#verdict")
    assert page.inner_text("#heatmap-name") == "fracture map"
    page.uncheck("#show-heatmap")
    assert page.evaluate("getComputedStyle(document.getElementById('heatmap')).display") == "none"
    assert page.is_visible("#boxes rect.definite")  # the boxes stay while the map is off
    page.screenshot(path=str(_shots(tmp_path) / "web-localiser-boxes-no-map.png"))
    page.uncheck("#show-boxes")
    assert page.evaluate("getComputedStyle(document.getElementById('boxes')).display") == "none"
    page.check("#show-boxes")
    page.check("#show-heatmap")
    page.screenshot(path=str(_shots(tmp_path) / "web-localiser.png"), full_page=True)
    page.close()


def test_a_guarded_server_asks_for_its_token_once_and_a_dicom_upload_is_read(browser, sample_root, tmp_path):
    from fracdet.models import create_model
    from fracdet.models._registry import PreprocessCfg
    from fracdet.models.release import TrainedModel
    from fracdet.serve import ServeConfig

    pytest.importorskip("pydicom")
    from PIL import Image

    from tests.dicom_files import mono1_12bit, write_bytes

    grey = np.asarray(Image.open(sample_root / "images" / "Fractured" / "IMG0000261.jpg").convert("L"))
    (tmp_path / "x.dcm").write_bytes(write_bytes(mono1_12bit(grey)))
    model = TrainedModel(module=create_model("paper_cnn", input_size=64).eval(), name="browser-test",
                         arch="paper_cnn", preprocess=PreprocessCfg(64), threshold=0.4)  # fmt: skip
    asked = []

    def answer(dialog) -> None:
        asked.append(dialog.message)
        dialog.accept("ward-7-token-0123")

    for url in _serve(model, ServeConfig(access_token="ward-7-token-0123")):
        page = browser.new_page()
        page.on("dialog", answer)
        page.goto(url)
        page.set_input_files("#file", str(tmp_path / "x.dcm"))
        page.wait_for_selector("#result", state="visible", timeout=30_000)
        page.set_input_files("#file", str(sample_root / "images" / "Fractured" / "IMG0000261.jpg"))
        page.wait_for_selector("#status:empty", state="attached", timeout=30_000)
        assert len(asked) == 1 and "access token" in asked[0]  # asked once per session
        assert "%" in page.inner_text("#verdict")
        page.close()
