"""How the benchmarks draw their pictures: off-screen, laid out and saved beside their JSON."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib's ``pyplot``, drawing without a display (benchmarks run on machines that have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path, *, dpi: int = 120) -> Path:
    """Lay ``fig`` out, write it to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
