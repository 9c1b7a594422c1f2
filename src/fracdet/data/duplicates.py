"""Exact and near-duplicate groups of a sample table: the shared input of the audit and the splitter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fracdet.data.features import ContentFeatures, compute_content_features, hash_files
from fracdet.data.neardup import NearDuplicateConfig, UnionFind, confirm_pairs, view_candidate_pairs
from fracdet.data.table import absolute_paths
from fracdet.utils.cache import FeatureCache

__all__ = ["DuplicateConfig", "Duplicates", "cross_dataset_matches", "find_duplicates", "shared_with"]


@dataclass(frozen=True)
class DuplicateConfig:
    """How duplicates are searched.

    Attributes:
        near: thresholds of near-duplicate detection.
        near_duplicates: search near-duplicates at all (exact copies are always found).
        embedder_variant: EfficientNet-Lite variant for candidate search.
        embedder_size: input size of the embedder.
        cache_dir: feature cache folder (``None``: the default, see :func:`fracdet.utils.cache.default_cache_dir`).
        use_cache: read and write the cache.
    """

    near: NearDuplicateConfig = field(default_factory=NearDuplicateConfig)
    near_duplicates: bool = True
    embedder_variant: int = 0
    embedder_size: int = 128
    cache_dir: str | None = None
    use_cache: bool = True

    def cache(self) -> FeatureCache:
        return FeatureCache(self.cache_dir, enabled=self.use_cache)

    @property
    def embedder_name(self) -> str:
        return f"lite{self.embedder_variant}-{self.embedder_size}"

    def embedder_factory(self):
        from fracdet.data.embed import ImageEmbedder

        return lambda: ImageEmbedder(variant=self.embedder_variant, size=self.embedder_size)


@dataclass
class Duplicates:
    """Duplicate structure of one table.

    Attributes:
        files: aligned with the table: ``sha256``, ``file_size``, ``exact_group`` (one id per distinct
            content), ``near_group`` (one id per distinct radiograph: contents joined by confirmed
            near-duplicate pairs).
        features: per-content features (rows in ``features.props.index`` order).
        pairs: candidate pairs between contents (rows of ``features``) with their geometric check.
    """

    files: pd.DataFrame
    features: ContentFeatures
    pairs: pd.DataFrame


def _content_features(
    table: pd.DataFrame, config: DuplicateConfig, cache: FeatureCache
) -> tuple[pd.DataFrame, ContentFeatures]:
    paths = absolute_paths(table)
    hashes = hash_files(paths)
    unreadable = hashes["sha256"].isna()
    # A file we cannot even open gets a unique pseudo-hash so it still has a row.
    hashes.loc[unreadable, "sha256"] = [f"unreadable:{table['path'].iloc[k]}" for k in np.flatnonzero(unreadable)]
    sha_to_path: dict[str, Path] = {}
    for sha, path in zip(hashes["sha256"], paths, strict=True):
        sha_to_path.setdefault(sha, path)
    features = compute_content_features(sha_to_path, cache, config.embedder_factory(), config.embedder_name)
    return hashes, features


def find_duplicates(table: pd.DataFrame, config: DuplicateConfig | None = None) -> Duplicates:
    """Hash every file, compute content features (cached) and group exact and near-duplicates.

    Args:
        table: a sample table (see :func:`fracdet.data.load_dataset`).
        config: search settings; defaults are calibrated for radiographs.
    """
    config = config or DuplicateConfig()
    with config.cache() as cache:
        hashes, features = _content_features(table, config, cache)
    shas = list(features.props.index)
    row = features.row_of()
    union = UnionFind(len(shas))
    if config.near_duplicates and len(shas) > 1:
        readable = features.props["readable"].to_numpy()
        candidates = view_candidate_pairs(features.views, None, config.near)
        candidates = candidates[readable[candidates["i"]] & readable[candidates["j"]]].reset_index(drop=True)
        pairs = confirm_pairs(candidates, shas, shas, features.thumbnails, config.near, union=union)
    else:
        pairs = pd.DataFrame(columns=["i", "j", "similarity", "confirmed"])
    content_rows = hashes["sha256"].map(row).to_numpy()
    roots = union.labels()
    files = pd.DataFrame({
        "sha256": hashes["sha256"].to_numpy(),
        "file_size": hashes["file_size"].to_numpy(),
        "exact_group": content_rows,
        "near_group": roots[content_rows],
    }, index=table.index)  # fmt: skip
    return Duplicates(files=files, features=features, pairs=pairs)


def cross_dataset_matches(
    ours: Duplicates, theirs: Duplicates, config: DuplicateConfig | None = None, *, every_pair: bool = False
) -> pd.DataFrame:
    """Contents of ``ours`` that ``theirs`` holds too: byte-identical ones and confirmed near-duplicates (only
    byte-identical ones when ``config.near_duplicates`` is off).

    A content of ours is searched for until it is found: its candidate pairs are checked most similar first
    and the rest are skipped once one confirms. What two sets share often looks typical of the other set,
    so each such content is a candidate of hundreds of its radiographs, and those pairs, nearly all
    rejected, would change no answer (multiregion against FracAtlas: 10,759 of 36,598 pairs skipped, with
    the same answers; ``docs/BENCHMARKS.md``).

    Args:
        every_pair: check every candidate pair and keep every confirmed one (to study the candidates, as
            ``benchmarks/candidate_views.py`` does).

    Returns:
        One row per matched content of ours (every confirmed pair with ``every_pair``): ``i`` (row in
        ``ours.features``), ``j`` (row in ``theirs.features``; a near match's first confirmed pair in
        candidate order), ``kind`` (``exact`` or ``near``) and the geometric check columns.
    """
    config = config or DuplicateConfig()
    shas_a, shas_b = list(ours.features.props.index), list(theirs.features.props.index)
    rows_b = theirs.features.row_of()
    exact = pd.DataFrame(
        [(i, rows_b[s], 1.0) for i, s in enumerate(shas_a) if s in rows_b], columns=["i", "j", "similarity"]
    )
    exact["kind"] = "exact"
    if not config.near_duplicates:  # ``fracdet audit --exact-only``: no geometric check, here either
        return exact
    candidates = view_candidate_pairs(ours.features.views, theirs.features.views, config.near)
    candidates = candidates[~candidates["i"].isin(exact["i"])].reset_index(drop=True)
    thumbs = {**ours.features.thumbnails, **theirs.features.thumbnails}
    checked = confirm_pairs(candidates, shas_a, shas_b, thumbs, config.near, first_only=not every_pair)
    near = checked[checked["confirmed"] == True]  # noqa: E712 (nullable booleans)
    if not every_pair:  # pairs already in flight when the first confirmed may confirm too
        near = near.drop_duplicates("i")
    near = near.copy()
    near["kind"] = "near"
    return pd.concat([exact, near], ignore_index=True)


def shared_with(table: pd.DataFrame, other: pd.DataFrame, config: DuplicateConfig | None = None) -> pd.Series:
    """Which files of ``table`` show a radiograph that ``other`` also holds (exactly or as a near copy).

    A file counts as shared when any file of its near-duplicate group matches a content of ``other``,
    so an edited copy of a shared image is caught with it. Use it to test a model on another dataset
    without the images it was trained on.
    """
    config = config or DuplicateConfig()
    ours = find_duplicates(table, config)
    theirs = find_duplicates(other, DuplicateConfig(**{**config.__dict__, "near_duplicates": False}))
    matched = set(cross_dataset_matches(ours, theirs, config)["i"])
    content_row = ours.features.row_of()
    hit = ours.files["sha256"].map(lambda sha: content_row.get(sha) in matched)
    groups = set(ours.files.loc[hit, "near_group"])
    return pd.Series(ours.files["near_group"].isin(groups).to_numpy(), index=table.index, name="shared")
