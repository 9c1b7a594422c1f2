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

import pytest

CHROMIUM = Path(os.environ.get("FRACDET_CHROMIUM", "/usr/bin/chromium"))


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
    import uvicorn

    from fracdet.models import create_model
    from fracdet.models._registry import PreprocessCfg
    from fracdet.models.release import TrainedModel
    from fracdet.serve import create_app

    model = TrainedModel(module=create_model("paper_cnn", input_size=64).eval(), name="browser-test",
                         arch="paper_cnn", preprocess=PreprocessCfg(64), threshold=0.4)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning"))
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
    page.on("request", lambda r: external.append(r.url) if not r.url.startswith((server_url, "data:")) else None)
    page.goto(server_url)
    page.set_input_files("#file", str(sample_root / "images" / "Fractured" / "IMG0000261.jpg"))
    page.wait_for_selector("#result", state="visible", timeout=30_000)
    verdict = page.inner_text("#verdict")
    assert "%" in verdict and ("Fracture suspected" in verdict or "No fracture detected" in verdict)
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 0
    assert page.evaluate("document.getElementById('radiograph').naturalWidth") > 0
    # the overlay toggles off and on
    page.uncheck("#show-heatmap")
    assert page.evaluate("getComputedStyle(document.getElementById('heatmap')).display") == "none"
    page.check("#show-heatmap")
    # readable at phone width: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    page.screenshot(path=str(_shots(tmp_path) / f"web-{name}.png"), full_page=True)
    assert not external, f"the page fetched outside resources: {external}"
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
