"""How far a lookup table gets on a test split: the score of pure memorisation, with no learning at all.

    python scripts/memorisation_baseline.py DATASET [--splits MANIFEST]

Each test file whose exact bytes also occur among the training files gets the label those training files
carry (majority); every other test file gets the training split's majority class. On a split where test
images are copies of training images this "model" scores what a network that memorised its training set
scores, which is the ceiling the paper's long training approaches; on a leakage-free split it scores the
majority-class rate.
"""

from __future__ import annotations

import argparse

import numpy as np

from fracdet.data import load_dataset
from fracdet.data.features import hash_files
from fracdet.data.split import apply_manifest
from fracdet.data.table import absolute_paths


def lookup_accuracy(table) -> dict[str, float]:
    sha = hash_files(absolute_paths(table), desc="hashing")["sha256"].to_numpy()
    train = (table["split"] == "train").to_numpy()
    test = (table["split"] == "test").to_numpy()
    labels = table["label"].to_numpy()
    majority = int(np.round(labels[train].mean()))
    train_label: dict[str, list[int]] = {}
    for s, y in zip(sha[train], labels[train], strict=True):
        train_label.setdefault(s, []).append(int(y))
    copied = np.array([s in train_label for s in sha[test]])
    guess = np.array([round(np.mean(train_label[s])) if s in train_label else majority for s in sha[test]])
    correct = guess == labels[test]
    return {
        "test files": int(test.sum()),
        "with a byte-copy in train": int(copied.sum()),
        "lookup accuracy": float(correct.mean()),
        "accuracy on the copies": float(correct[copied].mean()) if copied.any() else float("nan"),
        "majority-class rate": float(np.mean(labels[test] == majority)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--splits", help="split manifest (default: the dataset's own split)")
    args = parser.parse_args()
    table = load_dataset(args.dataset)
    if args.splits:
        table = apply_manifest(table, args.splits)
    for key, value in lookup_accuracy(table).items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")


if __name__ == "__main__":
    main()
