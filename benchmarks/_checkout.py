"""An earlier revision of this repository checked out beside it, for benchmarks that compare code side by side."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator
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


def revisions(baseline: str) -> tuple[str, str]:
    """``baseline`` as a short commit, and this tree as ``git describe`` names it (``-dirty`` if edited):
    what a side-by-side result records of its two sides."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", baseline), git("describe", "--always", "--dirty")


def side_by_side(baseline: str | None, folder: Path, run: Callable[[Path, Path], dict]) -> dict:
    """``run(src, out)`` on this tree, then, with ``baseline``, on that commit checked out beside it; each side
    gets its own empty folder under ``folder`` and is printed as it ends. The report: ``this tree``,
    ``baseline`` and the ``revisions`` of both."""
    report: dict = {}
    if baseline:
        report["revisions"] = dict(zip(("baseline", "this"), revisions(baseline), strict=True))
    sides = [("this tree", contextlib.nullcontext(REPO / "src"))]
    if baseline:
        sides.append(("baseline", checkout(baseline)))
    for name, tree in sides:
        with tree as src:
            (folder / name).mkdir()
            report[name] = run(src, folder / name)
        print(json.dumps({name: report[name]}, indent=1), flush=True)
    return report
