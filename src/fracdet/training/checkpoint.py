"""Run folders and their checkpoints, written atomically, so an interrupted run never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fracdet.utils.atomic import atomic_write_bytes, write_json

__all__ = ["RunExistsError", "atomic_write_bytes", "load_checkpoint", "save_checkpoint", "write_json"]


class RunExistsError(RuntimeError):
    """The run folder already holds a run; resume it or choose another folder."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` ``state`` atomically."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # The files are our own (optimizer state holds Python scalars and lists), hence weights_only=False.
    return torch.load(path, map_location="cpu", weights_only=False)
