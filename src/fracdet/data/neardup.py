"""Near-duplicate radiographs: embedding neighbours as candidates, local-feature geometry as proof.

Two files are near-duplicates when one is a re-encoded, rescaled, slightly rotated, cropped or flipped
copy of the other. Perceptual hashes miss rotated-and-cropped copies, and embeddings alone also pull
together *different* radiographs of the same body part. So the detection has two stages:

1. candidates: each content's nearest neighbours by cosine similarity of its embeddings, as it is,
   turned upright and by its centre disc alone (so copies rotated by any angle, their corners cut away
   on their own canvas, or mirrored, are candidates too);
2. confirmation: ORB keypoints matched between the two thumbnails must agree on one affine
   transform (optionally after a mirror flip), checked with RANSAC, and the thumbnails aligned by it
   (the alignment refined on the pixels where keypoints alone leave it a pixel or two off) must agree
   pixel for pixel at the scale of anatomy; with few keypoints, the refined alignment's pixels must
   agree everywhere, not only in the median. Different radiographs of the same anatomy
   rarely share dozens of geometrically consistent keypoints; two exposures of one patient that do
   (same detector, same position) still differ where the anatomy moved.

Confirmed pairs are joined with union-find into groups.
"""

from __future__ import annotations

import functools
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import scipy.fft

from fracdet.data.embed import FILL_LEVEL
from fracdet.data.features import load_thumbnail
from fracdet.utils.progress import progress_bar
from fracdet.utils.workers import opencv_on_calling_threads, worker_count

__all__ = [
    "GeometricMatch",
    "KeypointCache",
    "NearDuplicateConfig",
    "UnionFind",
    "candidate_pairs",
    "confirm_pairs",
    "match_thumbnails",
    "view_candidate_pairs",
]


@dataclass(frozen=True)
class NearDuplicateConfig:
    """Thresholds of the two stages, set on reviewed pairs (see ``docs/DATA.md``).

    A pair is a copy when an affine transform with enough RANSAC inliers maps one thumbnail onto the
    other and, once aligned, the pixels agree: the *mismatch* (median over textured tiles of the mean
    absolute difference after one global brightness/contrast fit, on thumbnails blurred to the scale
    of anatomy) is a few grey levels for copies. The blur removes what copying adds (resampling of
    rotated copies, JPEG noise) and keeps what a second exposure changes (the anatomy moved by more
    than a few pixels); the median weighs every textured tile alike, so a shared detector texture
    or collimator edge does not make two exposures of one patient agree.

    Three tiers: the usual copy passes the first. A copy damaged in part (a truncated file decoded with a
    grey band, a copy with burnt-in annotations) keeps almost all keypoints, far more than any pair of
    different exposures reaches (``strong_inliers``), and passes with a looser mismatch. Mirrored
    matches need more inliers, because the left and right wrist of one patient mirror each other
    closely without being one radiograph. The third tier is for copies with few keypoints (mirrored,
    turned, rescaled and re-encoded at once; smooth anatomy): aligned on the pixels, a copy agrees
    *everywhere* (median and 90th percentile of the tile mismatch both low), while a second exposure or the
    other limb of one patient, however close its median, differs somewhere by more.

    Attributes:
        neighbours: candidates per content (nearest by embedding as it is).
        min_similarity: cosine similarity (embedding as it is) below which a neighbour is not a candidate.
            Higher than the other views' floors: a copy turned, mirrored or cropped out of this view's
            reach meets its original in those, and the pairs that only this view proposes are
            nearly all different radiographs (on the full searches, multiregion 3,152 rejected and 12
            confirmed, FracAtlas 18,045 and 29), over 40% of the geometric check's time. Every one of those
            confirmed pairs had a similarity of 0.807 or more; at 0.80 the groups of both datasets stay the
            same, file for file (``docs/BENCHMARKS.md``).
        upright_neighbours: candidates per content nearest by the upright embedding. Copies at any
            angle meet there, but so do different radiographs of one body part in one position: fewer
            neighbours and a higher similarity keep the extra candidates (and their cost) few.
        upright_min_similarity: the similarity floor of upright candidates.
        disc_neighbours: candidates per content nearest by the centre-disc embedding, where copies turned
            on their own canvas (cut corners) and mirrored copies meet.
        disc_min_similarity: the similarity floor of centre-disc candidates.
        min_inliers: RANSAC inliers of the first tier.
        max_mismatch: mismatch (grey levels, 0-255 scale) allowed in the first tier.
        strong_inliers: inliers of the second tier.
        strong_max_mismatch: mismatch allowed in the second tier.
        flipped_inliers: inliers needed for a mirrored copy (with ``max_mismatch``).
        pixel_min_inliers: RANSAC inliers a match needs for its alignment to be refined on the pixels and
            judged by the third tier.
        refine_max_mismatch: the mismatch above which a keypoint match is not refined on the pixels. The
            refinement repairs an alignment that RANSAC left a pixel or two off, which on thumbnails blurred
            to the scale of anatomy costs a few grey levels; a match that far off is not one radiograph. On
            the full multiregion and FracAtlas searches, every match that a refinement confirmed started at
            12.2 or less (``docs/RELIABILITY.md``), and the refinement is most of the cost of a rejected pair.
        pixel_max_mismatch: the third tier's mismatch (median over tiles) once refined.
        pixel_max_spread: the third tier's 90th percentile of the tile mismatch once refined. On the 322
            pairs judged by eye (``docs/DATA.md``; ``scripts/near_duplicate_review.py score``), refined
            matches of different radiographs have a median of 3.6 or more and a 90th percentile of 6.8 or
            more.
        pixel_min_correlation: a match aligned on the pixels alone (:func:`_register`, tried when the
            keypoints fix no transform that the tiers confirm) counts by the third tier only, and only if the
            two aligned images also correlate this much over their shared content (blurred to the scale of
            anatomy). Aligned that freely, a knee can lie on a foot where only dark, faintly textured tiles
            overlap, and their median agrees (2.2 on the sample); the correlation is then below 0.3, while
            copies of a smooth shin on black, turned and mirrored, correlate 0.97 or more.
        turned_inliers: below this many inliers, a turned match (by more than 5 degrees) counts by the third
            tier only. A dozen keypoints can all lie on a detector's line texture, which two radiographs taken
            on one detector share: turned until the lines meet, two different hands agreed in the median
            (2.4, on the background) and not where the hands were.
        min_inlier_ratio: inliers over ratio-test matches, both keypoint tiers.
        min_overlap: fraction of the smaller thumbnail the aligned pair must share.
        max_scale: largest zoom between copies (and its inverse the smallest).
    """

    neighbours: int = 8
    min_similarity: float = 0.80
    upright_neighbours: int = 4
    upright_min_similarity: float = 0.70
    disc_neighbours: int = 4
    disc_min_similarity: float = 0.70
    min_inliers: int = 15
    max_mismatch: float = 4.0
    strong_inliers: int = 150
    strong_max_mismatch: float = 20.0
    flipped_inliers: int = 30
    pixel_min_inliers: int = 12
    refine_max_mismatch: float = 15.0
    pixel_max_mismatch: float = 2.5
    pixel_max_spread: float = 4.5
    pixel_min_correlation: float = 0.95
    turned_inliers: int = 20
    min_inlier_ratio: float = 0.20
    min_overlap: float = 0.20
    max_scale: float = 3.0

    @property
    def fewest_inliers(self) -> int:
        """The fewest RANSAC inliers with which any tier confirms a keypoint match or has it refined."""
        return min(self.min_inliers, self.strong_inliers, self.flipped_inliers, self.pixel_min_inliers)


@dataclass(frozen=True)
class GeometricMatch:
    """The outcome of matching two thumbnails."""

    inliers: int
    matches: int
    scale: float
    angle: float
    flipped: bool
    mismatch: float = float("inf")
    overlap: float = 0.0
    refined: bool = False
    spread: float = float("inf")
    registered: bool = False
    correlation: float = 0.0

    def confirms(self, config: NearDuplicateConfig) -> bool:
        """Whether this match makes the two images copies of one radiograph under ``config``.

        A match whose alignment was refined on the pixels (``refined``) counts by the tiers of keypoints
        only when unmirrored and turned (a rotation's resampling is what the refinement repairs); any
        refined match counts when its pixels agree everywhere (the third tier). Refined, the mirrored left
        and right wrist of one patient, and second exposures of one limb, came within the first tier's
        median; the third tier joins none of them (the full FracAtlas and multiregion searches, and the
        reviewed pairs, ``docs/RELIABILITY.md``). A turned match on fewer than ``turned_inliers`` keypoints
        counts by the third tier only (see :class:`NearDuplicateConfig`), and a match aligned on the pixels
        alone (``registered``) by the third tier with the correlation of the aligned images besides.
        """
        if self.overlap < config.min_overlap or not 1 / config.max_scale <= self.scale <= config.max_scale:
            return False
        pixels_agree = self.mismatch <= config.pixel_max_mismatch and self.spread <= config.pixel_max_spread
        if self.registered:
            return (
                self.inliers >= config.pixel_min_inliers
                and pixels_agree
                and self.correlation >= config.pixel_min_correlation
            )
        if self.refined and self.inliers >= config.pixel_min_inliers and pixels_agree:
            return True
        ratio = self.inliers / self.matches if self.matches else 0.0
        turned = abs(self.angle) > _REFINE_MIN_ANGLE
        if ratio < config.min_inlier_ratio or (self.refined and (self.flipped or not turned)):
            return False
        if turned and self.inliers < config.turned_inliers:
            return False
        if self.flipped:
            return self.inliers >= config.flipped_inliers and self.mismatch <= config.max_mismatch
        return (self.inliers >= config.min_inliers and self.mismatch <= config.max_mismatch) or (
            self.inliers >= config.strong_inliers and self.mismatch <= config.strong_max_mismatch
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


def view_candidate_pairs(
    views_a: list[np.ndarray], views_b: list[np.ndarray] | None, config: NearDuplicateConfig
) -> pd.DataFrame:
    """:func:`candidate_pairs` in the embedding as it is and, where given, upright and by centre disc; joined.

    A pair found in both views keeps its highest similarity; pairs are sorted most similar first.
    """
    settings = [
        (config.neighbours, config.min_similarity),
        (config.upright_neighbours, config.upright_min_similarity),
        (config.disc_neighbours, config.disc_min_similarity),
    ]
    frames = [
        candidate_pairs(a, None if views_b is None else views_b[k], neighbours=n, min_similarity=floor)
        for k, (a, (n, floor)) in enumerate(zip(views_a, settings, strict=False))
        if a is not None and (views_b is None or views_b[k] is not None)
    ]
    joined = pd.concat(frames, ignore_index=True).groupby(["i", "j"], as_index=False)["similarity"].max()
    return joined.sort_values("similarity", ascending=False, kind="stable").reset_index(drop=True)


class KeypointCache:
    """ORB keypoints of thumbnails, computed once per thumbnail, orientation and shape."""

    def __init__(self, thumbnails: dict[str, bytes]) -> None:
        import cv2

        self.cv2 = cv2
        self._orb = cv2.ORB_create(nfeatures=500, fastThreshold=10, edgeThreshold=15, patchSize=15)
        self._thumbs = thumbnails
        self._memo: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
        self._spectra: dict[tuple, tuple[np.ndarray, float]] = {}

    def get(
        self, sha: str, flipped: bool = False, shape: tuple[int, ...] | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Return (image, keypoint coordinates, descriptors), the image mirrored or resized to ``shape``."""
        key = (sha, flipped, shape)
        if key not in self._memo:
            image = load_thumbnail(self._thumbs[sha])
            if shape is not None and image.shape != shape:
                image = self.cv2.resize(image, (shape[1], shape[0]), interpolation=self.cv2.INTER_AREA)
            if flipped:
                image = np.ascontiguousarray(image[:, ::-1])
            # Keypoints on the equalised image: copies may differ in contrast and brightness.
            kps, des = self._orb.detectAndCompute(self.cv2.equalizeHist(image), None)
            pts = self.cv2.KeyPoint_convert(kps).reshape(-1, 2) if kps else np.zeros((0, 2), np.float32)
            self._memo[key] = (image, pts, des)
        return self._memo[key]

    def match(self, a: tuple, b: tuple, flipped: bool, config: NearDuplicateConfig | None = None) -> GeometricMatch:
        """Ratio-test ORB matches, a RANSAC affine transform, then the aligned pixels' mismatch.

        With ``config``, a match with fewer inliers than any tier uses (:attr:`NearDuplicateConfig.fewest_inliers`)
        is returned unmeasured (mismatch ``inf``), and a match that the keypoint tiers do not confirm but that has
        ``pixel_min_inliers`` and a mismatch within ``refine_max_mismatch`` gets its transform refined on the
        pixels (:func:`_refine`; a refined transform that stretches one axis more than ``_MAX_ANISOTROPY``
        times the other is dropped) and is measured again: RANSAC on a few dozen keypoints of a copy resampled
        by a rotation, or mirrored and rescaled, can leave the alignment a pixel or two off, which on textured
        tiles reads as a difference. The refined match is kept when it confirms (see
        :meth:`GeometricMatch.confirms` for what a refined match may count by) or its
        mismatch is lower.
        """
        cv2 = self.cv2
        image_a, pts_a, des_a = a
        image_b, pts_b, des_b = b
        if des_a is None or des_b is None or len(des_a) < 3 or len(des_b) < 3:
            return NO_MATCH
        query, train = _ratio_matches(des_a, des_b)
        if len(query) < 4:
            return GeometricMatch(0, len(query), 0.0, 0.0, flipped)
        src, dst = pts_a[query], pts_b[train]
        # A full affine transform: copies are rotated, cropped and often resized to a square, which
        # scales the two axes differently; a similarity transform would misalign them off-centre.
        transform, mask = cv2.estimateAffine2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=4.0, maxIters=2000, confidence=0.995
        )
        if transform is None:
            return GeometricMatch(0, len(query), 0.0, 0.0, flipped)
        scale, angle = _scale(transform), _angle(transform)
        if _anisotropy(transform) > _MAX_ANISOTROPY:
            return GeometricMatch(int(mask.sum()), len(query), 0.0, angle, flipped)
        if config is not None and mask.sum() < config.fewest_inliers:  # no tier would use the pixels' verdict
            return GeometricMatch(int(mask.sum()), len(query), scale, angle, flipped)
        mismatch, spread, overlap = _aligned_mismatch(cv2, image_a, image_b, transform)
        match = GeometricMatch(int(mask.sum()), len(query), scale, angle, flipped, mismatch, overlap, spread=spread)
        if config is None or match.confirms(config) or match.inliers < config.pixel_min_inliers:
            return match
        if match.mismatch > config.refine_max_mismatch:  # not a pixel or two off: a different radiograph
            return match
        refined = _refine(cv2, image_a, image_b, transform)
        if refined is not None and _anisotropy(refined) <= _MAX_ANISOTROPY:
            mismatch_r, spread_r, overlap_r = _aligned_mismatch(cv2, image_a, image_b, refined)
            better = replace(
                match, scale=_scale(refined), mismatch=mismatch_r, spread=spread_r, overlap=overlap_r, refined=True
            )
            return better if better.confirms(config) or mismatch_r < mismatch else match
        return match

    def spectrum(self, sha: str, flipped: bool = False) -> tuple[np.ndarray, float]:
        """The log-polar magnitude spectrum of a thumbnail (:func:`_log_polar_spectrum`), computed once."""
        key = (sha, flipped)
        if key not in self._spectra:
            self._spectra[key] = _log_polar_spectrum(self.cv2, self.get(sha, flipped)[0], _REGISTER_SIDE)
        return self._spectra[key]

    def register(self, sha_a: str, sha_b: str, flipped: bool, evidence: GeometricMatch) -> GeometricMatch:
        """``sha_a`` aligned onto ``sha_b`` (mirrored if ``flipped``) on the pixels alone (:func:`_register`),
        for a pair whose keypoints gave ``evidence`` (its inliers and matches are kept) but no transform that
        confirms; ``NO_MATCH`` when no alignment is found."""
        cv2 = self.cv2
        image_a, image_b = self.get(sha_a)[0], self.get(sha_b, flipped)[0]
        found = _register(cv2, image_a, image_b, self.spectrum(sha_a), self.spectrum(sha_b, flipped))
        if found is None:
            return NO_MATCH
        return GeometricMatch(evidence.inliers, evidence.matches, _scale(found.transform), _angle(found.transform),
                              flipped, found.mismatch, found.overlap, refined=True, spread=found.spread,
                              registered=True, correlation=found.correlation)  # fmt: skip


def _ratio_matches(des_a: np.ndarray, des_b: np.ndarray, ratio: float = 0.8) -> tuple[np.ndarray, np.ndarray]:
    """Lowe's ratio test on ORB descriptors: the rows of ``des_a`` whose nearest row of ``des_b`` (Hamming) is
    closer than ``ratio`` times the second nearest, and those nearest rows.

    The same matches as ``BFMatcher(NORM_HAMMING).knnMatch(des_a, des_b, k=2)`` followed by the test (and as
    ``cv2.batchDistance(..., K=2)``, which ``knnMatch`` calls), as two arrays. The distances are counted
    with numpy's popcount, one 64-bit word of the 256-bit descriptors at a time, in two thirds of
    ``batchDistance``'s time on the search's two threads (half on one; ``benchmarks/ratio_matches.py``);
    matching was a third of the duplicate search's thread time. Which of several equally near rows is
    "nearest" never matters: a tie at the smallest distance fails the test.
    """
    if len(des_b) < 2:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    words_a, words_b = _descriptor_words(des_a), _descriptor_words(des_b)
    if len(words_a) != 4 or len(words_b) != 4:
        raise ValueError("ORB descriptors are 32 bytes a row")
    shape = (len(des_a), len(des_b))
    word_xor, word_bits, bits = np.empty(shape, np.uint64), np.empty(shape, np.uint8), np.zeros(shape, np.uint8)
    for k in range(3):  # at most 64 bits differ in a word, so three words' count still fits in a byte
        np.bitwise_xor(words_a[k][:, None], words_b[k][None, :], out=word_xor)
        bits += np.bitwise_count(word_xor, out=word_bits)
    np.bitwise_xor(words_a[3][:, None], words_b[3][None, :], out=word_xor)
    distance = np.add(bits, np.bitwise_count(word_xor, out=word_bits), dtype=np.uint16)
    rows = np.arange(shape[0])
    nearest = distance.argmin(axis=1)
    first = distance[rows, nearest].astype(np.float64)
    distance[rows, nearest] = np.iinfo(np.uint16).max
    query = np.flatnonzero(first < ratio * distance.min(axis=1))
    return query, nearest[query]


def _descriptor_words(descriptors: np.ndarray) -> np.ndarray:
    """``(N, 32)`` uint8 ORB descriptors as ``(4, N)`` uint64: word ``k`` of every row, contiguous."""
    return np.ascontiguousarray(np.ascontiguousarray(descriptors, dtype=np.uint8).view(np.uint64).T)


_REFINE_MIN_ANGLE = 5.0  # degrees; below it a match's pixels were not resampled by a rotation
_MAX_ANISOTROPY = 2.0  # more shear than this is a wrong transform; squashed copies are matched stretched
_BLUR = (11, 11)  # Gaussian kernel on 256-px thumbnails: finer detail is what copying changes
_REGISTER_SIDE = 256  # side of the spectra that :func:`_register` correlates (the thumbnails' longest side)
_REGISTER_MIN_START = 0.8  # correlation below which a pixel alignment is not refined (copies start above 0.9)
_MIN_ZOOM = 0.25  # thumbnails share their longest side: a copy zoomed further is beyond the audit's reach


def _scale(transform: np.ndarray) -> float:
    """The zoom of an affine transform (geometric mean of its two axes' stretches)."""
    return float(np.sqrt(abs(np.linalg.det(transform[:, :2]))))


def _angle(transform: np.ndarray) -> float:
    """The rotation of an affine transform, in degrees."""
    return float(np.degrees(np.arctan2(transform[1, 0] - transform[0, 1], transform[0, 0] + transform[1, 1])))


def _anisotropy(transform: np.ndarray) -> float:
    """How much an affine transform stretches one axis more than the other (1: a similarity)."""
    singular = np.linalg.svd(transform[:, :2], compute_uv=False)
    return float(singular[0] / singular[1]) if singular[1] > 0 else float("inf")


def _grey_fill(cv2, image: np.ndarray) -> np.ndarray:
    """Pixels of the flat mid-grey that a lenient decoder writes where a truncated file ends."""
    x = image.astype(np.float32)
    local_var = cv2.blur(x * x, (5, 5)) - cv2.blur(x, (5, 5)) ** 2
    return (np.abs(x - 128) <= 3) & (local_var < 1.0)


@dataclass(frozen=True)
class _Aligned:
    """``image_a`` warped onto ``image_b`` and ``image_b``, both blurred to the scale of anatomy (``_BLUR``),
    the pixels that are content in both, and that shared area as a fraction of the smaller image."""

    warped: np.ndarray
    target: np.ndarray
    valid: np.ndarray
    overlap: float

    def mismatch(self) -> tuple[float, float]:
        """Median and 90th percentile over textured tiles of the difference (:func:`_tile_mismatch`);
        ``inf`` when the two share too little to tell."""
        if self.valid.sum() < 100:
            return float("inf"), float("inf")
        scores = _tile_mismatch(self.warped, self.target, self.valid)
        if len(scores) < 4:
            return float("inf"), float("inf")
        return float(np.median(scores)), float(np.percentile(scores, 90))

    def correlation(self) -> float:
        """Pearson correlation over the shared content; 0 when the two share too little."""
        x, y = self.warped[self.valid], self.target[self.valid]
        if x.size < 100 or x.std() == 0 or y.std() == 0:
            return 0.0
        return float(np.corrcoef(x, y)[0, 1])


def _align(cv2, image_a: np.ndarray, image_b: np.ndarray, transform: np.ndarray) -> _Aligned:
    """``image_a`` warped onto ``image_b`` by ``transform``, to be compared only where both hold content.

    Rotated copies are padded with black corners, and a lenient decoder fills a truncated file with flat
    mid-grey: neither is content, so neither agrees nor disagrees. The shared area is eroded so that the
    blurred edges of that fill do not count either.
    """
    h, w = image_b.shape
    a = cv2.GaussianBlur(image_a, _BLUR, 0).astype(np.float32)
    b = cv2.GaussianBlur(image_b, _BLUR, 0).astype(np.float32)
    warped = cv2.warpAffine(a, transform, (w, h), flags=cv2.INTER_LINEAR, borderValue=0)
    content_a = ((image_a > FILL_LEVEL) & ~_grey_fill(cv2, image_a)).astype(np.uint8)
    valid = cv2.warpAffine(content_a, transform, (w, h), flags=cv2.INTER_NEAREST, borderValue=0) > 0
    valid &= (image_b > FILL_LEVEL) & ~_grey_fill(cv2, image_b)
    valid = cv2.erode(valid.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    smaller = min(a.size * float(abs(np.linalg.det(transform[:, :2]))), b.size)
    return _Aligned(warped, b, valid, float(valid.sum()) / max(smaller, 1.0))


def _aligned_mismatch(
    cv2, image_a: np.ndarray, image_b: np.ndarray, transform: np.ndarray
) -> tuple[float, float, float]:
    """Mismatch of ``image_a`` warped onto ``image_b`` (median and 90th percentile over tiles) and their
    shared area (:func:`_align`)."""
    aligned = _align(cv2, image_a, image_b, transform)
    return (*aligned.mismatch(), aligned.overlap)


def _refine(cv2, image_a: np.ndarray, image_b: np.ndarray, transform: np.ndarray) -> np.ndarray | None:
    """The affine transform ``image_a -> image_b`` refined by ECC on the pixels, or ``None`` if it fails.

    OpenCV's ``findTransformECC`` maximises the correlation of the two images (so brightness and contrast
    changes between copies do not matter) from the keypoints' transform, over the content of ``image_b``.
    """
    h, w = max(image_a.shape[0], image_b.shape[0]), max(image_a.shape[1], image_b.shape[1])
    pad = [np.pad(x, ((0, h - x.shape[0]), (0, w - x.shape[1]))) for x in (image_a, image_b)]
    a, b = (cv2.GaussianBlur(x, (5, 5), 0).astype(np.float32) for x in pad)
    warp = cv2.invertAffineTransform(transform).astype(np.float32)  # ECC maps template (b) onto input (a)
    mask = (pad[1] > FILL_LEVEL).astype(np.uint8)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-4)
    try:
        _, warp = cv2.findTransformECC(b, a, warp, cv2.MOTION_AFFINE, criteria, mask, 5)
    except cv2.error:  # did not converge: keep the keypoints' transform
        return None
    return cv2.invertAffineTransform(warp)


def _log_polar_spectrum(cv2, image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The magnitude spectrum of ``image`` (padded square, resized to ``side``) in log-polar coordinates,
    and the factor by which that resize shrank it.

    A translation leaves the magnitude unchanged; a rotation and a zoom shift it along the angle and the
    log-radius axes. The low frequencies (the overall shape of bright content on black, which the cut
    corners and crop change) are damped by weighting with the radius. SciPy's FFT, not NumPy's: the same
    single precision, faster here (``benchmarks/log_polar_spectrum.py``).
    """
    windowed, shrink = _windowed_square(cv2, image, side)
    magnitude = np.fft.fftshift(np.abs(scipy.fft.fft2(windowed)))
    magnitude *= _spectrum_weights(cv2, side)[1]
    return _log_polar_sample(np.log1p(magnitude)).astype(np.float32), shrink


def _windowed_square(cv2, image: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """``image`` padded to a centred square, resized to ``side``, its mean removed and weighted by the
    Hanning window (what :func:`_log_polar_spectrum` transforms), and the factor the resize shrank it by."""
    h, w = image.shape
    longest = max(h, w)
    square = np.zeros((longest, longest), np.float32)
    square[(longest - h) // 2 : (longest - h) // 2 + h, (longest - w) // 2 : (longest - w) // 2 + w] = image
    square = cv2.resize(square, (side, side), interpolation=cv2.INTER_AREA)
    return (square - square.mean()) * _spectrum_weights(cv2, side)[0], side / longest


@functools.cache
def _spectrum_weights(cv2, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The Hanning window a ``side`` x ``side`` image is weighted by before its spectrum is taken, and the
    weight of each frequency by its radius (1 from half the side out); the same for every thumbnail, so
    computed once (read-only: threads share them)."""
    window = cv2.createHanningWindow((side, side), cv2.CV_32F)
    y, x = np.mgrid[:side, :side] - side / 2
    radius = np.clip(np.hypot(x, y) / (side / 2), 0, 1)
    window.flags.writeable = radius.flags.writeable = False
    return window, radius


def _log_polar_points(side: int) -> np.ndarray:
    """Where each log-polar cell samples a centred ``side`` x ``side`` spectrum: row ``i`` is the angle
    ``2 pi i / side``, column ``j`` the radius ``(side / 2) ** (j / side)``; (2, side, side), (y, x), all
    inside the spectrum (the largest radius is under ``side / 2``)."""
    rows, cols = np.mgrid[:side, :side].astype(np.float64)
    angle = 2 * np.pi * rows / side
    radius = np.exp(cols * np.log(side / 2) / side)
    return np.stack([side / 2 + radius * np.sin(angle), side / 2 + radius * np.cos(angle)])


@functools.cache
def _log_polar_grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """The four spectrum cells around each of :func:`_log_polar_points` (flat indices, (4, side, side)) and
    their bilinear weights (float64, the same shape): the same for every thumbnail, so computed once
    (read-only: threads share them).

    Sampled in floating point rather than by ``cv2.warpPolar``: OpenCV 4 interpolates in fixed point, whose
    rounding is the same pattern in every spectrum. Phase correlation, which whitens the spectra, finds that
    shared pattern at no turn and no zoom before the true peak, and turned copies went unaligned.
    """
    y, x = _log_polar_points(side)
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = y - y0, x - x0
    y0, x0 = y0.astype(np.intp), x0.astype(np.intp)
    cells = np.stack([y0 * side + x0, y0 * side + x0 + 1, (y0 + 1) * side + x0, (y0 + 1) * side + x0 + 1])
    weights = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    cells.flags.writeable = weights.flags.writeable = False
    return cells, weights


def _log_polar_sample(values: np.ndarray) -> np.ndarray:
    """A square ``values`` (a centred spectrum) in log-polar coordinates, interpolated bilinearly (float64):
    ``ndimage.map_coordinates``'s order-1 samples at :func:`_log_polar_points`, to the bit, in a fraction of
    its time (``benchmarks/log_polar_spectrum.py``)."""
    cells, weights = _log_polar_grid(values.shape[0])
    return (values.ravel()[cells] * weights).sum(axis=0)


def _turn_and_zoom(
    cv2, spectrum_a: tuple[np.ndarray, float], spectrum_b: tuple[np.ndarray, float]
) -> tuple[float, float] | None:
    """The turn (degrees, up to a half-turn) and the zoom that take the image of ``spectrum_a`` to that of
    ``spectrum_b`` (:func:`_log_polar_spectrum`): phase correlation of the log-polar spectra, whose shift
    along the rows is the turn and along the columns the log of the zoom (:func:`_log_polar_points`).
    ``None`` when the correlation has no peak inside the spectra (a featureless thumbnail)."""
    (polar_a, shrink_a), (polar_b, shrink_b) = spectrum_a, spectrum_b
    side = polar_a.shape[0]
    (shift_radius, shift_angle), _ = cv2.phaseCorrelate(polar_a, polar_b)
    if not (abs(shift_radius) <= side / 2 and abs(shift_angle) <= side / 2):  # also false for NaN
        return None
    # A zoom shrinks the spectrum: a radius r goes to r / zoom, a shift of -log(zoom) in log-radius.
    return -shift_angle * 360.0 / side, float(np.exp(-shift_radius * np.log(side / 2) / side)) * shrink_a / shrink_b


@dataclass(frozen=True)
class _Registration:
    """A transform found by :func:`_register` and how well the pixels it aligns agree (:class:`_Aligned`)."""

    transform: np.ndarray
    mismatch: float
    spread: float
    overlap: float
    correlation: float


def _register(
    cv2,
    image_a: np.ndarray,
    image_b: np.ndarray,
    spectrum_a: tuple[np.ndarray, float],
    spectrum_b: tuple[np.ndarray, float],
) -> _Registration | None:
    """The similarity transform ``image_a -> image_b`` found on the pixels alone (Fourier-Mellin), with how
    well the pixels it aligns agree, or ``None``.

    For copies whose keypoints fix no usable transform (a smooth long bone on black keeps a dozen ORB
    matches along one edge). Phase correlation of the two log-polar spectra (:func:`_log_polar_spectrum`)
    gives the turn and the zoom; the spectrum's symmetry leaves a half-turn open, so both are tried, each
    placed by phase correlation of the turned image on the other, and the one whose aligned pixels
    correlate better is kept. ``None`` when even that one correlates less than ``_REGISTER_MIN_START``
    (most candidate pairs, different radiographs: they cost no refinement); else it is refined by ECC
    (:func:`_refine`) if that makes the pixels agree better (:meth:`_Aligned.mismatch`).
    """
    if min(*image_a.shape, *image_b.shape) < 16:
        return None
    found = _turn_and_zoom(cv2, spectrum_a, spectrum_b)
    if found is None or not _MIN_ZOOM <= found[1] <= 1 / _MIN_ZOOM:
        return None
    turn, zoom = found
    (ha, wa), (hb, wb) = image_a.shape, image_b.shape
    a, b = (cv2.GaussianBlur(x.astype(np.float32), (5, 5), 0) for x in (image_a, image_b))
    window = cv2.createHanningWindow((wb, hb), cv2.CV_32F)
    best, best_aligned, best_correlation = None, None, _REGISTER_MIN_START
    for degrees in (turn, turn + 180.0):
        transform = cv2.getRotationMatrix2D((wa / 2, ha / 2), degrees, zoom)
        transform[:, 2] += (wb / 2 - wa / 2, hb / 2 - ha / 2)
        turned = cv2.warpAffine(a, transform, (wb, hb), borderMode=cv2.BORDER_REPLICATE)
        (dx, dy), _ = cv2.phaseCorrelate(turned, b, window)
        transform[:, 2] += (dx, dy)
        aligned = _align(cv2, image_a, image_b, transform)
        correlation = aligned.correlation()
        if correlation >= best_correlation:
            best, best_aligned, best_correlation = transform, aligned, correlation
    if best is None:
        return None
    found = _Registration(best, *best_aligned.mismatch(), best_aligned.overlap, best_correlation)
    refined = _refine(cv2, image_a, image_b, best)
    if refined is not None and _anisotropy(refined) <= _MAX_ANISOTROPY:
        aligned = _align(cv2, image_a, image_b, refined)
        mismatch, spread = aligned.mismatch()
        if mismatch < found.mismatch:
            return _Registration(refined, mismatch, spread, aligned.overlap, aligned.correlation())
    return found


def _tile_mismatch(x: np.ndarray, y: np.ndarray, valid: np.ndarray, tile: int = 24) -> np.ndarray:
    """The mean absolute difference in each textured tile, after a global linear fit.

    The fit absorbs brightness and contrast changes between copies; flat tiles (a lenient decoder's
    grey band, empty background) abstain, so they neither confirm nor refute.
    """
    xv, yv = x[valid], y[valid]
    var = float(xv.var())
    gain = float(((xv - xv.mean()) * (yv - yv.mean())).mean()) / var if var > 0 else 0.0
    offset = float(yv.mean()) - gain * float(xv.mean())
    h, w = (y.shape[0] // tile) * tile, (y.shape[1] // tile) * tile

    def per_tile(a: np.ndarray) -> np.ndarray:  # (h, w) -> sums over each tile, (h / tile, w / tile)
        return a[:h, :w].reshape(h // tile, tile, w // tile, tile).sum(axis=(1, 3))

    m = valid.astype(np.float64)
    n = per_tile(m)
    full = n >= 0.8 * tile * tile
    n = np.maximum(n, 1.0)

    def tile_std(a: np.ndarray) -> np.ndarray:
        mean = per_tile(a * m) / n
        return np.sqrt(np.maximum(per_tile(a * a * m) / n - mean * mean, 0.0))

    textured = full & (np.minimum(tile_std(x), tile_std(y)) >= _MIN_TILE_STD)
    return (per_tile(np.abs(y - (gain * x + offset)) * m) / n)[textured]


_MIN_TILE_STD = 2.0  # grey levels; a flatter tile carries no evidence


def match_thumbnails(keypoints: KeypointCache, sha_a: str, sha_b: str, config: NearDuplicateConfig) -> GeometricMatch:
    """Match two contents, trying the mirror image of ``sha_b`` when the plain match does not confirm.

    When the two differ in aspect ratio, ``sha_a`` is also stretched to the shape of ``sha_b``: a copy
    squashed into a square (a common augmentation) distorts keypoints beyond what ORB matches. When no
    keypoint match confirms but one has ``pixel_min_inliers``, the two are aligned on the pixels alone,
    plain and mirrored (:meth:`KeypointCache.register`): a copy of a smooth long bone on black keeps a dozen
    matches along one edge, which fix no transform, in either orientation.
    """
    shape_a, shape_b = keypoints.get(sha_a)[0].shape, keypoints.get(sha_b)[0].shape
    aspect_change = abs(np.log((shape_a[1] / shape_a[0]) / (shape_b[1] / shape_b[0])))
    shapes = [None, shape_b] if aspect_change > _STRETCH_ASPECT else [None]
    best = NO_MATCH
    for shape in shapes:
        a = keypoints.get(sha_a, shape=shape)
        for flipped in (False, True):
            b = keypoints.get(sha_b, flipped=flipped)
            m = keypoints.match(a, b, flipped, config)
            if m.confirms(config):
                return m
            if m.inliers > best.inliers:
                best = m
    if best.inliers < config.pixel_min_inliers:
        return best
    for flipped in (False, True):
        m = keypoints.register(sha_a, sha_b, flipped, best)
        if m.confirms(config):
            return m
    return best


_STRETCH_ASPECT = np.log(1.15)  # aspect ratios further apart than this are also matched stretched


def confirm_pairs(
    candidates: pd.DataFrame,
    shas_a: list[str],
    shas_b: list[str],
    thumbnails: dict[str, bytes],
    config: NearDuplicateConfig,
    *,
    union: UnionFind | None = None,
    first_only: bool = False,
    workers: int | None = None,
    window: int | None = None,
) -> pd.DataFrame:
    """Check candidate pairs; adds the :class:`GeometricMatch` fields and ``confirmed``.

    With ``union`` (a within-set search), pairs whose contents are already joined through other
    confirmed pairs are not matched again: it changes no group and saves most of the work in big groups.
    With ``first_only`` (a search of another set, which asks only whether each content of ``shas_a`` is
    there), the pairs of a content are not matched once one of its pairs has confirmed. Skipped pairs'
    ``confirmed`` is NA ("implied").

    Pairs are matched on ``workers`` threads (OpenCV releases the GIL), at most ``window`` at a time (default 4
    per worker), taken in candidate order: whether a pair is skipped is decided when its turn comes, by the
    results of every pair submitted before it except the last ``window - 1``, which may still be running. A
    slow pair (a registration on the pixels) holds up no other worker until ``window - 1`` pairs have gone
    past it, where fixed batches made every worker wait for each batch's slowest pair; and since what decides
    a pair is its place in the order, not which thread finished first, a run gives the same rows every time.
    The groups, and each content's first confirmed pair in candidate order, are the same whatever
    ``workers`` and ``window`` are.
    """
    keypoints = KeypointCache(thumbnails)
    workers = workers or worker_count()
    pairs = list(zip(candidates["i"], candidates["j"], strict=True))
    rows: list[tuple] = [()] * len(pairs)
    matched: set[int] = set()  # contents of shas_a with a confirmed pair (``first_only``)

    def check(k: int) -> tuple:
        i, j = pairs[k]
        m = match_thumbnails(keypoints, shas_a[i], shas_b[j], config)
        return (m.inliers, m.matches, m.scale, m.angle, m.flipped, m.mismatch, m.overlap, m.confirms(config))

    window = window or 4 * workers
    running: deque[tuple[int, Future]] = deque()
    with (
        opencv_on_calling_threads(),
        ThreadPoolExecutor(workers) as pool,
        progress_bar(total=len(pairs), desc="confirming", unit="pair") as bar,
    ):

        def settle() -> None:  # the oldest pair still in the window: wait for it and record what it found
            k, future = running.popleft()
            rows[k] = row = future.result()
            if row[-1] and union is not None:
                union.union(*pairs[k])
            if row[-1] and first_only:
                matched.add(pairs[k][0])
            bar.update(1)

        for k, (i, j) in enumerate(pairs):
            if len(running) == window:
                settle()
            if shas_a[i] not in thumbnails or shas_b[j] not in thumbnails:
                rows[k] = (0, 0, 0.0, 0.0, False, np.inf, 0.0, False)
            elif i in matched or (union is not None and union.find(i) == union.find(j)):
                rows[k] = (-1, -1, np.nan, np.nan, False, np.nan, np.nan, pd.NA)
            else:
                running.append((k, pool.submit(check, k)))
                continue
            bar.update(1)
        while running:
            settle()
    columns = ["inliers", "matches", "scale", "angle", "flipped", "mismatch", "overlap", "confirmed"]
    extra = pd.DataFrame(rows, columns=columns, index=candidates.index)
    return pd.concat([candidates, extra], axis=1)
