"""What the ONNX Runtime benchmarks share: a model's scoring graph as served, and distinct radiographs for it."""

from __future__ import annotations

import random
from pathlib import Path


def served_graph(model) -> Path:
    """The ONNX graph ``model`` is served with: a compiled model's own, else its export with the gate's
    appearance embedder inside (as :class:`fracdet.inference.Predictor` runs it)."""
    from fracdet.inference.gate import InputGate
    from fracdet.inference.onnx import cached_export

    if model.graph is not None:
        return model.graph
    gate = InputGate.of(model)
    return cached_export(model, embedder=gate.embedder().network if gate.checks_appearance else None)


def radiographs(data: str | Path, count: int, size: int) -> tuple[list[Path], list]:
    """The first ``count`` readable JPEGs of a seeded shuffle of ``data/images`` and their pixels squashed to
    ``size`` (uint8, as the graph takes them)."""
    from fracdet.data import ImageReadError, read_image
    from fracdet.data.pixels import resize_square

    paths = sorted(Path(data, "images").rglob("*.jpg"))
    random.Random(0).shuffle(paths)
    chosen, images = [], []
    for path in paths:
        try:
            images.append(resize_square(read_image(path), size))
        except ImageReadError:
            continue
        chosen.append(path)
        if len(images) == count:
            break
    return chosen, images
