"""Shared fixtures: the bundled sample, the shared datasets (skip or fail), an isolated feature cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "fracatlas"

#: ``tests/netns`` runs inside a private network namespace that ``tests/test_pacs.py`` makes; never directly.
collect_ignore_glob = [] if os.environ.get("FRACDET_IN_NETNS") == "1" else ["netns/*"]


def _shared_root() -> Path:
    return Path(os.environ.get("FRACDET_SHARED", REPO.parent / "shared")).resolve()


@pytest.fixture(autouse=True, scope="session")
def _quiet_progress() -> None:
    os.environ["FRACDET_PROGRESS"] = "0"


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session (features, exported ONNX graphs), also for the commands tests start: tests
    share warm entries, and the user's cache is untouched."""
    if env := os.environ.get("FRACDET_CACHE"):
        return Path(env)
    path = tmp_path_factory.mktemp("cache")
    os.environ["FRACDET_CACHE"] = str(path)
    return path


@pytest.fixture
def sample_root() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``$FRACDET_SHARED/data``: skipped when absent, a failure when absent under ``CI=true``."""
    data = _shared_root() / "data"
    if not (data / "fracatlas").is_dir() or not (data / "multiregion").is_dir():
        message = f"shared datasets not found at {data} (set FRACDET_SHARED)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + "; CI=true requires them")
        pytest.skip(message)
    return data
