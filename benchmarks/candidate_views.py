"""Which embedding view proposes the audit's candidate pairs, what becomes of them, and what a higher floor for
the plain view would cut.

    python benchmarks/candidate_views.py ../shared/data/multiregion [--floors 0.75 0.8 0.85 0.9] \
        [--against ../shared/data/fracatlas] [--out benchmarks/results-candidate-views-multiregion.json]

Runs the duplicate search (features cached after the first run) with every view at the upright and
centre-disc views' floor, so that each pair any plain floor would keep is checked, and sorts its candidate
pairs by the views that proposed them (:func:`fracdet.data.neardup.candidate_pairs` per view) and their
outcome: confirmed, rejected, or implied (skipped, already joined). Then, for each plain floor, the pairs it
would cut and whether the groups stay the same. The groups are the connected components of the confirmed
pairs (an implied pair joins nothing new), so a floor keeps them exactly when the confirmed pairs it keeps
have the same components as all of them.

With ``--against``, also the search for contents shared with another dataset
(:func:`fracdet.data.duplicates.cross_dataset_matches`, what ``fracdet audit --against`` and
``--exclude-shared-with`` use), every view at that floor again: its confirmed near pairs by view, and for each
plain floor the confirmed pairs it would cut and whether the same contents are still found in the other set.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fracdet.data import load_dataset
from fracdet.data.duplicates import DuplicateConfig, cross_dataset_matches, find_duplicates
from fracdet.data.neardup import candidate_pairs


def _components(pairs: pd.DataFrame, n: int) -> np.ndarray:
    """Each content's component, labelled by its first content, so two labellings compare directly."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs["i"], pairs["j"])), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    first = {}
    return np.array([first.setdefault(label, k) for k, label in enumerate(labels)])


def _views(pairs: pd.DataFrame, views_a: list, views_b: list | None, near) -> pd.DataFrame:
    """``pairs`` with each view's similarity (``view0`` plain, ``view1`` upright, ``view2`` centre disc), NaN
    where that view did not propose the pair, and ``plain_alone``."""
    settings = [(near.neighbours, near.min_similarity), (near.upright_neighbours, near.upright_min_similarity),
                (near.disc_neighbours, near.disc_min_similarity)]  # fmt: skip
    pairs = pairs.copy()
    for k, (n, floor) in enumerate(settings):
        other = None if views_b is None else views_b[k]
        found = candidate_pairs(views_a[k], other, neighbours=n, min_similarity=floor).set_index(["i", "j"])
        pairs[f"view{k}"] = found["similarity"].reindex(pd.MultiIndex.from_frame(pairs[["i", "j"]])).to_numpy()
    pairs["plain_alone"] = pairs["view1"].isna() & pairs["view2"].isna()
    return pairs


def _against(data: Path, other: Path, config: DuplicateConfig, floors: list[float]) -> dict:
    """The cross-dataset search at every view's lowest floor, and what each plain floor would cut of it."""
    features_only = replace(config, near_duplicates=False)
    ours = find_duplicates(load_dataset(data), features_only)
    theirs = find_duplicates(load_dataset(other), features_only)
    matches = cross_dataset_matches(ours, theirs, config, every_pair=True)
    near = _views(matches[matches["kind"] == "near"], ours.features.views, theirs.features.views, config.near)
    found = set(matches["i"])
    result = {
        "against": str(other),
        "contents_found": len(found),
        "exact": int((matches["kind"] == "exact").sum()),
        "near_confirmed": len(near),
        "near_confirmed_plain_alone": int(near["plain_alone"].sum()),
        "floors": {},
    }
    for floor in floors:
        cut = near["plain_alone"] & (near["view0"] < floor)
        kept = set(matches.loc[matches["kind"] == "exact", "i"]) | set(near.loc[~cut, "i"])
        result["floors"][str(floor)] = {"confirmed_cut": int(cut.sum()), "same_contents_found": kept == found}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--floors", type=float, nargs="+", default=[0.75, 0.8, 0.85, 0.9])
    parser.add_argument("--against", type=Path, help="also the search for contents shared with this dataset")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    base = DuplicateConfig().near
    config = DuplicateConfig(near=replace(base, min_similarity=base.upright_min_similarity))
    dups = find_duplicates(load_dataset(args.data), config)
    pairs = _views(dups.pairs, dups.features.views, None, config.near)
    pairs["outcome"] = pairs["confirmed"].map({True: "confirmed", False: "rejected"}).fillna("implied")
    plain_only = pairs["plain_alone"]
    confirmed = pairs[pairs["outcome"] == "confirmed"]
    n = len(dups.features.props)
    groups = _components(confirmed, n)
    result = {
        "data": str(args.data),
        "candidate_pairs": len(pairs),
        "outcomes": pairs["outcome"].value_counts().to_dict(),
        "plain_view_alone": pairs.loc[plain_only, "outcome"].value_counts().to_dict(),
        "lowest_similarity_confirmed_plain_alone": float(confirmed.loc[plain_only, "view0"].min()),
        "floors": {},
    }
    for floor in args.floors:
        cut = plain_only & (pairs["view0"] < floor)
        kept = confirmed[~cut[confirmed.index]]
        result["floors"][str(floor)] = {
            "pairs_cut": int(cut.sum()),
            "cut_by_outcome": pairs.loc[cut, "outcome"].value_counts().to_dict(),
            "same_groups": bool((_components(kept, n) == groups).all()),
        }
    if args.against:
        result["against"] = _against(args.data, args.against, config, args.floors)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
