"""The search for contents shared with another dataset, each content searched until found, against every pair
checked: side by side, with the answers compared.

    python benchmarks/cross_check.py ../shared/data/multiregion ../shared/data/fracatlas [--rounds 1]
        [--out benchmarks/results-cross-check.json]

:func:`fracdet.data.duplicates.cross_dataset_matches` (what ``fracdet audit --against`` and
``--exclude-shared-with`` use) skips a content's remaining candidate pairs once one of them confirms; with
``every_pair=True`` it checks them all, as it did before. Both run here on the same features (cached after the
first run; the first round pays for them before either is timed), in alternating order over ``--rounds``: wall
and CPU seconds of each, how many candidate pairs there are and how many each geometrically checked, and
whether the answers agree: the same contents found, each by the same kind (exact or near) and, for a near
match, the same first confirmed pair in candidate order (what the audit's report lists). Exits 1 if not.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import fracdet.data.neardup as neardup
from fracdet.data import load_dataset
from fracdet.data.duplicates import DuplicateConfig, cross_dataset_matches, find_duplicates


def first_matches(matches) -> dict[int, tuple[str, int]]:
    """Each content found: the kind and the other set's content of its first row (the audit's answer)."""
    first: dict[int, tuple[str, int]] = {}
    for row in matches.itertuples():
        first.setdefault(int(row.i), (row.kind, int(row.j)))
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    config = DuplicateConfig()
    features_only = replace(config, near_duplicates=False)
    ours = find_duplicates(load_dataset(args.data), features_only)
    theirs = find_duplicates(load_dataset(args.other), features_only)
    candidates = len(neardup.view_candidate_pairs(ours.features.views, theirs.features.views, config.near))

    checked = itertools.count()  # next() on a count is atomic under the GIL: the matching threads share it
    match = neardup.match_thumbnails

    def counted(*a, **k):
        next(checked)
        return match(*a, **k)

    runs: dict[str, list[dict]] = {"first_only": [], "every_pair": []}
    answers = {}
    neardup.match_thumbnails = counted  # confirm_pairs looks it up in its module at each call
    try:
        for r in range(args.rounds):
            order = ["first_only", "every_pair"] if r % 2 == 0 else ["every_pair", "first_only"]
            for name in order:
                before = next(checked)
                cpu, start = time.process_time(), time.perf_counter()
                matches = cross_dataset_matches(ours, theirs, config, every_pair=name == "every_pair")
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                n = next(checked) - before - 1
                runs[name].append({"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "checked": n})
                answers[name] = first_matches(matches)
                print(name, runs[name][-1], file=sys.stderr, flush=True)
    finally:
        neardup.match_thumbnails = match

    found = answers["first_only"]
    same = found == answers["every_pair"]
    median = {name: statistics.median(run["wall_s"] for run in runs[name]) for name in runs}
    result = {
        "data": str(args.data),
        "other": str(args.other),
        "candidate_pairs": candidates,
        "runs": runs,
        "wall_ratio": round(median["first_only"] / median["every_pair"], 3),
        "contents_found": len(found),
        "exact": sum(kind == "exact" for kind, _ in found.values()),
        "same_answers": same,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
