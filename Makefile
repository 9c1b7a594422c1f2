# The two entry points of a fresh clone: `make run` (the main job) and `make test` (all checks).
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fracdet-installed

.PHONY: run test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# torch/torchvision pinned here (the versions this project is tested with); pyproject keeps lower bounds.
	$(BIN)/python -m pip install --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --disable-pip-version-check -e ".[dev,lite12,onnx,dicom,archive]"
	touch $(STAMP)

# The web application with the bundled default model on http://127.0.0.1:8000 (Ctrl-C stops it).
run: $(STAMP)
	$(BIN)/fracdet serve --model fracatlas-default --host 127.0.0.1 --port 8000

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
