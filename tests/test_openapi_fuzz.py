"""Schemathesis walks the whole OpenAPI surface with generated requests: nothing it sends may cause a 5xx."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, settings  # noqa: E402

from fracdet.models import create_model  # noqa: E402
from fracdet.models._registry import PreprocessCfg  # noqa: E402
from fracdet.models.release import TrainedModel  # noqa: E402
from fracdet.serve import create_app  # noqa: E402

MODEL = TrainedModel(module=create_model("paper_cnn", input_size=32).eval(), name="test-model", arch="paper_cnn",
                     preprocess=PreprocessCfg(32), threshold=0.3, meta={"version": "0.0-test"})  # fmt: skip
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(MODEL))


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:200]}"
