"""Which embedding view proposes the audit's candidate pairs, what becomes of them, and what a higher floor for
the plain view would cut.

    python benchmarks/candidate_views.py ../shared/data/multiregion [--floors 0.75 0.8 0.85 0.9] \
        [--out benchmarks/results-candidate-views-multiregion.json]

Runs the duplicate search (features cached after the first run) with every view at the upright and
centre-disc views' floor, so that each pair any plain floor would keep is checked, and sorts its candidate
pairs by the views that proposed them (:func:`fracdet.data.neardup.candidate_pairs` per view) and their
outcome: confirmed, rejected, or implied (skipped, already joined). Then, for each plain floor, the pairs it
would cut and whether the groups stay the same. The groups are the connected components of the confirmed
pairs (an implied pair joins nothing new), so a floor keeps them exactly when the confirmed pairs it keeps
have the same components as all of them.
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
from fracdet.data.duplicates import DuplicateConfig, find_duplicates
from fracdet.data.neardup import candidate_pairs


def _components(pairs: pd.DataFrame, n: int) -> np.ndarray:
    """Each content's component, labelled by its first content, so two labellings compare directly."""
    graph = coo_matrix((np.ones(len(pairs)), (pairs["i"], pairs["j"])), shape=(n, n))
    labels = connected_components(graph, directed=False)[1]
    first = {}
    return np.array([first.setdefault(label, k) for k, label in enumerate(labels)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path)
    parser.add_argument("--floors", type=float, nargs="+", default=[0.75, 0.8, 0.85, 0.9])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    base = DuplicateConfig().near
    config = DuplicateConfig(near=replace(base, min_similarity=base.upright_min_similarity))
    dups = find_duplicates(load_dataset(args.data), config)
    pairs, near = dups.pairs.copy(), config.near
    settings = [(near.neighbours, near.min_similarity), (near.upright_neighbours, near.upright_min_similarity),
                (near.disc_neighbours, near.disc_min_similarity)]  # fmt: skip
    for k, (view, (n, floor)) in enumerate(zip(dups.features.views, settings, strict=True)):
        found = candidate_pairs(view, neighbours=n, min_similarity=floor).set_index(["i", "j"])["similarity"]
        pairs[f"view{k}"] = found.reindex(pd.MultiIndex.from_frame(pairs[["i", "j"]])).to_numpy()
    pairs["outcome"] = pairs["confirmed"].map({True: "confirmed", False: "rejected"}).fillna("implied")
    plain_only = pairs["view1"].isna() & pairs["view2"].isna()
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
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
