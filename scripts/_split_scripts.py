"""What the scripts that score one model on one split of its own manifest share: arguments, rows, report.

Scripts run as ``python scripts/NAME.py``, so this folder is on the import path (as ``benchmarks/`` has its
``_checkout.py``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd

from fracdet.data import load_dataset
from fracdet.data.split import apply_manifest, split_rows
from fracdet.models import TrainedModel, load


def split_parser(doc: str | None, *, model_optional: bool = False) -> argparse.ArgumentParser:
    """MODEL, ``--data``, ``--split`` (validation unless asked: no test image is needed to find a cause) and
    ``--out``; the script adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?" if model_optional else None)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    return parser


def model_and_rows(args: argparse.Namespace, *, needed_for: str) -> tuple[TrainedModel, pd.DataFrame]:
    """The model named by ``args.model`` and the ``args.split`` rows of ``args.data`` in its own manifest."""
    model = load(args.model)
    table = apply_manifest(load_dataset(args.data), str(model.splits_path))
    return model, split_rows(table, args.split, needed_for=needed_for)


def report(figures: dict[str, Any], out: str | None) -> None:
    """Print ``figures`` as JSON and, with ``out``, write them there too."""
    text = json.dumps(figures, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
