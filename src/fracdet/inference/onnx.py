"""A trained model's network as ONNX, and the same network run by ONNX Runtime.

The exported graph takes the normalised ``(N, 3, S, S)`` float batch (any ``N``) and returns the model's
scores exactly as :func:`fracdet.models.predict.forward_scores` reads them: ``margin (N,)`` and, for a
localiser, ``map_logits (N, C, h, w)`` (the map, then any box channels). Everything after the network
(temperature, levels, boxes) stays in Python and is shared with the PyTorch path, so the two cannot disagree
on anything but arithmetic.
``model.json`` travels inside the file (metadata ``fracdet_model_json``): an ONNX file describes itself.

ONNX export needs the ``onnx`` extra (``pip install "fracdet[onnx]"``: onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fracdet.models.predict import forward_scores
from fracdet.models.release import TrainedModel

__all__ = ["OnnxNetwork", "export_onnx"]

_HINT = 'ONNX needs the onnx extra: pip install "fracdet[onnx]" (onnx, onnxscript, onnxruntime)'


class _Scores(nn.Module):
    """The network with the one output convention of :func:`forward_scores` (margins, then the map)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        margin, heat = forward_scores(self.module, image)
        return (margin,) if heat is None else (margin, heat)


def export_onnx(model: TrainedModel, path: str | Path, *, opset: int = 18) -> Path:
    """Write ``model``'s network to ``path`` as one self-contained ONNX file with a dynamic batch.

    Args:
        model: from :func:`fracdet.models.load` (weights on the CPU).
        opset: ONNX operator set.
    """
    try:
        import onnx
    except ImportError as exc:
        raise ImportError(_HINT) from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.preprocess.input_size
    wrapper = _Scores(model.module).eval()
    outputs = ["margin", "map_logits"] if model.task == "localise" else ["margin"]
    batch = torch.export.Dim("batch", min=1, max=1024)
    example = torch.zeros(2, 3, size, size)
    torch.onnx.export(wrapper, (example,), str(path), input_names=["image"], output_names=outputs,
                      dynamic_shapes={"image": {0: batch}}, opset_version=opset, dynamo=True, external_data=False,
                      verbose=False)  # fmt: skip
    graph = onnx.load(str(path))
    meta = {**model.meta, "input_size": size, "mean": list(model.preprocess.mean), "std": list(model.preprocess.std),
            "temperature": model.temperature, "thresholds": model.thresholds, "threshold": model.threshold,
            "operating_point": model.operating_point, "tta": model.tta, "task": model.task,
            "peak_weight": model.peak_weight}  # fmt: skip
    entry = graph.metadata_props.add()
    entry.key, entry.value = "fracdet_model_json", json.dumps(meta)
    onnx.save(graph, str(path))
    return path


class OnnxNetwork:
    """An exported network in ONNX Runtime: normalised batch -> ``(margins, map logits or None)``.

    Args:
        path: a file written by :func:`export_onnx`.
        threads: intra-op threads (``None``: ONNX Runtime's default, all cores).
    """

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(_HINT) from exc
        options = ort.SessionOptions()
        # Idle threads sleep instead of spinning: a server shares its cores with decoding, PNG encoding and
        # other requests, and spinning workers would take their time.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        raw = self.session.get_modelmeta().custom_metadata_map.get("fracdet_model_json")
        self.meta: dict[str, Any] = json.loads(raw) if raw else {}

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outputs = self.session.run(None, {"image": np.ascontiguousarray(batch, np.float32)})
        return outputs[0], (outputs[1] if len(outputs) > 1 else None)
