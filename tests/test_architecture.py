"""docs/ARCHITECTURE.md stays a true map: every module is on it, and imports flow one way along the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "src" / "fracdet"
#: The pipeline, left to right: a package imports only from its left (``utils`` from nowhere, ``cli`` from all).
PIPELINE = ("data", "models", "training", "evaluation", "explain", "inference", "serve", "dicom")
MODULES = sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def _fracdet_imports(path: Path) -> set[str]:
    """Every ``fracdet.X`` package a module imports, at the top or inside functions."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("fracdet.")}


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_is_on_the_map(module):
    assert f"{module.name} " in (REPO / "docs" / "ARCHITECTURE.md").read_text(), f"{module.name} is not described"


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(module):
    package = module.relative_to(PACKAGE).parts[0]
    if package == "cli.py":
        return
    imported = _fracdet_imports(module) - {package}
    if package == "utils":
        assert not imported, f"utils imports {imported}"
        return
    position = PIPELINE.index(package)
    right = {p for p in imported if p != "utils" and PIPELINE.index(p) >= position}
    assert not right, f"{module.relative_to(PACKAGE)} imports {right}, which sit to its right"
