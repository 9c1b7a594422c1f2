"""Near-duplicate radiographs: embedding neighbours as candidates, local-feature geometry as proof.

Two files are near-duplicates when one is a re-encoded, rescaled, slightly rotated, cropped or flipped
copy of the other. Perceptual hashes miss rotated-and-cropped copies, and embeddings alone also pull
together *different* radiographs of the same body part. So the detection has two stages:

1. candidates: each content's nearest neighbours by cosine similarity of its embedding;
2. confirmation: ORB keypoints matched between the two thumbnails must agree on one similarity
   transform (rotation + uniform scale + translation, optionally after a mirror flip), checked with
   RANSAC. Different radiographs of the same anatomy do not share dozens of geometrically
   consistent keypoints; copies of one radiograph do.

Confirmed pairs are joined with union-find into groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fracdet.data.features import load_thumbnail
from fracdet.utils.progress import progress

__all__ = [
    "GeometricMatch",
    "NearDuplicateConfig",
    "UnionFind",
    "candidate_pairs",
    "confirm_pairs",
    "match_thumbnails",
]


@dataclass(frozen=True)
class NearDuplicateConfig:
    """Thresholds of the two stages, calibrated by eye on multiregion pairs (see ``docs/DATA.md``).

    A pair is a copy when a similarity transform with enough RANSAC inliers maps one thumbnail onto
    the other and the aligned pixels agree tile by tile. Two tiers trade keypoints against pixel
    agreement: the usual copy has both; a copy damaged in part (a truncated file decoded with a grey
    band) keeps almost all its keypoints but agrees on fewer tiles. Mirrored matches need more
    keypoints, because the left and right wrist of one patient mirror each other closely without
    being one radiograph. Two exposures of one patient on one detector share the detector's texture
    at the identity transform; tile agreement, not keypoints, tells them apart.

    Attributes:
        neighbours: candidates per content (nearest by embedding).
        min_similarity: cosine similarity below which a neighbour is not a candidate.
        min_inliers: RANSAC inliers of the first tier.
        min_correlation: tile agreement (see :func:`_tile_agreement`) in the first tier.
        strong_inliers: inliers of the second tier.
        strong_correlation: tile agreement of the second tier.
        flipped_inliers: inliers needed for a mirrored copy (with ``min_correlation``).
        min_inlier_ratio: inliers over ratio-test matches, both tiers.
        min_overlap: fraction of the smaller thumbnail the aligned pair must share.
        max_scale: largest zoom between copies (and its inverse the smallest).
    """

    neighbours: int = 8
    min_similarity: float = 0.70
    min_inliers: int = 15
    min_correlation: float = 0.85
    strong_inliers: int = 150
    strong_correlation: float = 0.60
    flipped_inliers: int = 30
    min_inlier_ratio: float = 0.20
    min_overlap: float = 0.30
    max_scale: float = 3.0


@dataclass(frozen=True)
class GeometricMatch:
    """The outcome of matching two thumbnails."""

    inliers: int
    matches: int
    scale: float
    angle: float
    flipped: bool
    correlation: float = 0.0
    overlap: float = 0.0

    def confirms(self, config: NearDuplicateConfig) -> bool:
        """Whether this match makes the two images copies of one radiograph under ``config``."""
        ratio = self.inliers / self.matches if self.matches else 0.0
        if ratio < config.min_inlier_ratio or self.overlap < config.min_overlap:
            return False
        if not 1 / config.max_scale <= self.scale <= config.max_scale:
            return False
        if self.flipped:
            return self.inliers >= config.flipped_inliers and self.correlation >= config.min_correlation
        return (self.inliers >= config.min_inliers and self.correlation >= config.min_correlation) or (
            self.inliers >= config.strong_inliers and self.correlation >= config.strong_correlation
        )


NO_MATCH = GeometricMatch(inliers=0, matches=0, scale=0.0, angle=0.0, flipped=False)


class UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)

    def labels(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))])


def candidate_pairs(
    emb_a: np.ndarray, emb_b: np.ndarray | None = None, *, neighbours: int = 8, min_similarity: float = 0.7
) -> pd.DataFrame:
    """Nearest-neighbour pairs by cosine similarity (embeddings are L2-normalised).

    Args:
        emb_a: (n, d) embeddings.
        emb_b: (m, d) embeddings of a second set; ``None`` searches ``emb_a`` against itself.
        neighbours: neighbours kept per row of ``emb_a`` (and per row of ``emb_b`` when given).
        min_similarity: drop pairs less similar than this.

    Returns:
        Columns ``i`` (row in ``emb_a``), ``j`` (row in ``emb_b`` or ``emb_a``), ``similarity``; within one
        set each unordered pair appears once with ``i < j``.
    """
    same = emb_b is None
    emb_b = emb_a if same else emb_b
    pairs: dict[tuple[int, int], float] = {}

    def scan(left: np.ndarray, right: np.ndarray, flip: bool) -> None:
        k = min(neighbours + int(same), right.shape[0])
        if k == 0:
            return
        for start in range(0, left.shape[0], 1024):
            sims = left[start : start + 1024] @ right.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            for r, cols in enumerate(top):
                i = start + r
                for j in cols:
                    s = float(sims[r, j])
                    if s < min_similarity or (same and i == j):
                        continue
                    key = (min(i, j), max(i, j)) if same else ((j, i) if flip else (i, j))
                    pairs[key] = max(pairs.get(key, -1.0), s)

    scan(emb_a, emb_b, flip=False)
    if not same:
        scan(emb_b, emb_a, flip=True)
    frame = pd.DataFrame([(i, j, s) for (i, j), s in pairs.items()], columns=["i", "j", "similarity"])
    return frame.sort_values("similarity", ascending=False, kind="stable").reset_index(drop=True)


class _Keypoints:
    """ORB keypoints of thumbnails, computed once per thumbnail and orientation."""

    def __init__(self, thumbnails: dict[str, bytes]) -> None:
        import cv2

        self.cv2 = cv2
        self._orb = cv2.ORB_create(nfeatures=500, fastThreshold=10, edgeThreshold=15, patchSize=15)
        self._matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._thumbs = thumbnails
        self._memo: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    def get(self, sha: str, flipped: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Return (image, keypoint coordinates, descriptors)."""
        key = (sha, flipped)
        if key not in self._memo:
            image = load_thumbnail(self._thumbs[sha])
            if flipped:
                image = np.ascontiguousarray(image[:, ::-1])
            # Keypoints on the equalised image: copies may differ in contrast and brightness.
            kps, des = self._orb.detectAndCompute(self.cv2.equalizeHist(image), None)
            pts = np.array([kp.pt for kp in kps], np.float32).reshape(-1, 2)
            self._memo[key] = (image, pts, des)
        return self._memo[key]

    def match(self, a: tuple, b: tuple, flipped: bool) -> GeometricMatch:
        """Ratio-test ORB matches, a RANSAC similarity transform, then the aligned pixels' correlation."""
        cv2 = self.cv2
        image_a, pts_a, des_a = a
        image_b, pts_b, des_b = b
        if des_a is None or des_b is None or len(des_a) < 3 or len(des_b) < 3:
            return NO_MATCH
        pairs = self._matcher.knnMatch(des_a, des_b, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
        if len(good) < 4:
            return GeometricMatch(0, len(good), 0.0, 0.0, flipped)
        src = pts_a[[m.queryIdx for m in good]]
        dst = pts_b[[m.trainIdx for m in good]]
        transform, mask = cv2.estimateAffinePartial2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0, maxIters=2000, confidence=0.995
        )
        if transform is None:
            return GeometricMatch(0, len(good), 0.0, 0.0, flipped)
        scale = float(np.hypot(transform[0, 0], transform[1, 0]))
        angle = float(np.degrees(np.arctan2(transform[1, 0], transform[0, 0])))
        correlation, overlap = _aligned_correlation(cv2, image_a, image_b, transform)
        return GeometricMatch(int(mask.sum()), len(good), scale, angle, flipped, correlation, overlap)


_FILL_LEVEL = 4  # grey level at or below which a pixel counts as padding


def _aligned_correlation(cv2, image_a: np.ndarray, image_b: np.ndarray, transform: np.ndarray) -> tuple[float, float]:
    """Tile agreement of ``image_a`` warped onto ``image_b`` (:func:`_tile_agreement`) and their shared area."""
    h, w = image_b.shape
    a = cv2.GaussianBlur(image_a, (5, 5), 0).astype(np.float32)
    b = cv2.GaussianBlur(image_b, (5, 5), 0).astype(np.float32)
    # Rotated copies are padded with black corners; compare only pixels that are content in both.
    content_a = (image_a > _FILL_LEVEL).astype(np.uint8)
    content_b = image_b > _FILL_LEVEL
    warped = cv2.warpAffine(a, transform, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    valid = cv2.warpAffine(content_a, transform, (w, h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    valid = cv2.erode((valid & content_b).astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    smaller = min(a.size * float(abs(np.linalg.det(transform[:, :2]))), b.size)
    overlap = float(valid.sum()) / max(smaller, 1.0)
    if valid.sum() < 100:
        return 0.0, overlap
    return _tile_agreement(warped, b, valid), overlap


def _tile_agreement(x: np.ndarray, y: np.ndarray, valid: np.ndarray, tile: int = 24) -> float:
    """Fraction of textured tiles whose aligned pixels correlate (NCC >= 0.8).

    A global correlation is dominated by what the images share most: two exposures of one patient on
    one detector share its background texture at the identity transform even when the hand moved.
    Counting agreeing tiles weighs every textured region equally, and flat tiles (a lenient decoder's
    grey band, uniform background) abstain.
    """
    votes = agree = 0
    h, w = y.shape
    for r in range(0, h - tile + 1, tile):
        for c in range(0, w - tile + 1, tile):
            m = valid[r : r + tile, c : c + tile]
            if m.mean() < 0.8:
                continue
            a = x[r : r + tile, c : c + tile][m]
            b = y[r : r + tile, c : c + tile][m]
            a, b = a - a.mean(), b - b.mean()
            sa, sb = float((a * a).sum()), float((b * b).sum())
            if min(sa, sb) / a.size < _MIN_TILE_VARIANCE:
                continue
            votes += 1
            agree += float((a * b).sum()) / np.sqrt(sa * sb) >= 0.8
    return agree / votes if votes >= 4 else 0.0


_MIN_TILE_VARIANCE = 4.0  # grey levels squared; below this a tile is flat and carries no evidence


def match_thumbnails(keypoints: _Keypoints, sha_a: str, sha_b: str, config: NearDuplicateConfig) -> GeometricMatch:
    """Match two contents; the mirror image of ``sha_b`` is tried when the plain match does not confirm."""
    a = keypoints.get(sha_a)
    best = keypoints.match(a, keypoints.get(sha_b), flipped=False)
    if not best.confirms(config):
        mirrored = keypoints.match(a, keypoints.get(sha_b, flipped=True), flipped=True)
        if mirrored.confirms(config) or mirrored.inliers > best.inliers:
            best = mirrored
    return best


def confirm_pairs(
    candidates: pd.DataFrame,
    shas_a: list[str],
    shas_b: list[str],
    thumbnails: dict[str, bytes],
    config: NearDuplicateConfig,
    *,
    union: UnionFind | None = None,
) -> pd.DataFrame:
    """Check candidate pairs; adds the :class:`GeometricMatch` fields and ``confirmed``.

    With ``union`` (a within-set search), pairs whose contents are already joined through other
    confirmed pairs are not matched again: it changes no group and saves most of the work in big groups.
    Their ``confirmed`` is NA ("implied").
    """
    keypoints = _Keypoints(thumbnails)
    rows = []
    for i, j in progress(
        zip(candidates["i"], candidates["j"], strict=True), desc="confirming", total=len(candidates), unit="pair"
    ):
        sha_a, sha_b = shas_a[i], shas_b[j]
        if sha_a not in thumbnails or sha_b not in thumbnails:
            rows.append((0, 0, 0.0, 0.0, False, 0.0, 0.0, False))
            continue
        if union is not None and union.find(i) == union.find(j):
            rows.append((-1, -1, np.nan, np.nan, False, np.nan, np.nan, pd.NA))
            continue
        m = match_thumbnails(keypoints, sha_a, sha_b, config)
        ok = m.confirms(config)
        if ok and union is not None:
            union.union(i, j)
        rows.append((m.inliers, m.matches, m.scale, m.angle, m.flipped, m.correlation, m.overlap, ok))
    columns = ["inliers", "matches", "scale", "angle", "flipped", "correlation", "overlap", "confirmed"]
    extra = pd.DataFrame(rows, columns=columns, index=candidates.index)
    return pd.concat([candidates, extra], axis=1)
