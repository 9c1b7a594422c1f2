"""An earlier revision of this repository checked out beside it, for benchmarks that compare code side by side."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A temporary ``git worktree`` of ``revision``; yields its ``src`` (put it on ``PYTHONPATH``), removed after."""
    with tempfile.TemporaryDirectory(prefix="fracdet-baseline-") as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=REPO, check=True,
                       capture_output=True)  # fmt: skip
        try:
            yield tree / "src"
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)
