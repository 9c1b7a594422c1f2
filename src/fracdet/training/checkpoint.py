"""Run folders and their checkpoints, written atomically, so an interrupted run never leaves a half-written file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fracdet.models.release import ModelLoadError
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
    """Load a checkpoint written by :func:`save_checkpoint` onto the CPU.

    Raises:
        FileNotFoundError: there is none at ``path``.
        fracdet.models.release.ModelLoadError: the file cannot be read as one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:  # the files are our own (optimizer state holds Python scalars and lists), hence weights_only=False
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # damaged or not ours: an UnpicklingError traceback ended `--resume` before
        raise ModelLoadError(
            f"{path}: cannot be read as a checkpoint ({type(exc).__name__}): it is damaged; "
            "move it aside to resume from the run's other checkpoint, or start the run again"
        ) from None
