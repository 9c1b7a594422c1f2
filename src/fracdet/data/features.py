"""Per-file facts and per-content features, computed once and cached by content hash.

The audit needs, for every *distinct* content (files with equal bytes share one entry): whether it
decodes, its format, mode, size and mean intensity, a small grey thumbnail (for geometric matching and
pictures) and an embedding (for candidate near-duplicates). Computing these once per content and
caching them outside the dataset makes a second audit of a 10k-image set take seconds.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fracdet.data.decode import ImageReadError, decode_image, read_file
from fracdet.data.embed import centre_disc, upright
from fracdet.utils.cache import FeatureCache
from fracdet.utils.hashing import sha256_file
from fracdet.utils.progress import progress, progress_bar
from fracdet.utils.workers import opencv_on_calling_threads, worker_count

__all__ = ["THUMB_SIZE", "ContentFeatures", "compute_content_features", "hash_files", "load_thumbnail"]

THUMB_SIZE = 256  # longest side of the cached grey thumbnail
_PROPS_KIND = "props-v1"
_THUMB_KIND = "thumb-v1"
_EMBED_KIND = "embed-v1"
_UPRIGHT_KIND = "upright-v1"
_DISC_KIND = "disc-v1"
_EMBED_PIECE = 64  # images per embedding task


@dataclass
class ContentFeatures:
    """Features of distinct contents, aligned row for row.

    Attributes:
        props: one row per content hash (index ``sha256``): readable, error, truncated, format, mode,
            width, height, file_size, mean_intensity.
        embeddings: (n_contents, d) float32, L2-normalised; rows of unreadable contents are zero.
        thumbnails: content hash -> JPEG bytes of the grey thumbnail (absent when unreadable).
        upright_embeddings: like ``embeddings``, of the thumbnail turned upright
            (:func:`fracdet.data.embed.upright`): copies rotated by any angle meet there.
        disc_embeddings: like ``embeddings``, of the thumbnail's centre disc turned upright and mirrored
            into one hand (:func:`fracdet.data.embed.centre_disc`): copies turned on their own canvas, cut
            corners and all, and mirrored copies meet there.
    """

    props: pd.DataFrame
    embeddings: np.ndarray
    thumbnails: dict[str, bytes]
    upright_embeddings: np.ndarray | None = None
    disc_embeddings: np.ndarray | None = None

    @property
    def views(self) -> list[np.ndarray | None]:
        """The embeddings to search for candidates: as stored, upright and centre disc (``None`` if absent)."""
        return [self.embeddings, self.upright_embeddings, self.disc_embeddings]

    def row_of(self) -> dict[str, int]:
        """Map content hash -> row index in :attr:`embeddings`."""
        return {sha: i for i, sha in enumerate(self.props.index)}


def hash_files(paths: Sequence[Path], *, desc: str = "hashing") -> pd.DataFrame:
    """Return ``sha256`` and ``file_size`` per path (``sha256`` is None when the file cannot be read)."""

    def one(path: Path) -> tuple[str | None, int | None]:
        try:
            return sha256_file(path), path.stat().st_size
        except OSError:
            return None, None

    with ThreadPoolExecutor(worker_count()) as pool:
        rows = list(progress(pool.map(one, paths), desc=desc, total=len(paths), unit="file"))
    return pd.DataFrame(rows, columns=["sha256", "file_size"])


def _analyse(path: Path) -> tuple[dict, bytes | None]:
    """Decode one file leniently and summarise it; strictness is recorded, not enforced, here."""
    props: dict = {"readable": False, "error": None, "truncated": False}
    try:
        data = read_file(path)
        decoded = decode_image(data, allow_truncated=True, name=path.name)
    except (OSError, ImageReadError) as exc:
        props["error"] = str(exc)
        return props, None
    grey = decoded.pixels
    props.update(
        readable=True,
        truncated=decoded.truncated,
        format=decoded.format,
        mode=decoded.mode,
        width=int(grey.shape[1]),
        height=int(grey.shape[0]),
        mean_intensity=float(grey.mean()),
    )
    thumb = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=92)
    return props, buf.getvalue()


def load_thumbnail(data: bytes) -> np.ndarray:
    """Decode a cached thumbnail to a grey uint8 array."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def compute_content_features(
    sha_to_path: dict[str, Path],
    cache: FeatureCache,
    embedder_factory: Callable[[], Callable[[Sequence[np.ndarray]], np.ndarray]],
    embedder_name: str,
) -> ContentFeatures:
    """Compute (or read from ``cache``) the features of each distinct content.

    Args:
        sha_to_path: one representative file per content hash.
        cache: the feature cache.
        embedder_factory: builds the embedder only if some embedding is missing from the cache, so a
            warm run never loads the network.
        embedder_name: cache namespace of the embedder (a different model must not reuse vectors).
    """
    shas = list(sha_to_path)
    props_blobs = cache.get_many(_PROPS_KIND, shas)
    thumbs = cache.get_many(_THUMB_KIND, shas)
    # A readable content whose thumbnail is missing (a write that failed after its props were stored) is
    # decoded again: without its thumbnail it would silently drop out of the duplicate search.
    todo = [s for s in shas if s not in props_blobs or (s not in thumbs and json.loads(props_blobs[s])["readable"])]
    if todo:
        with ThreadPoolExecutor(worker_count()) as pool:
            results = pool.map(_analyse, (sha_to_path[s] for s in todo))
            new_props, new_thumbs = [], []
            for sha, (props, thumb) in zip(todo, progress(results, desc="decoding", total=len(todo)), strict=True):
                props_blobs[sha] = json.dumps(props).encode()
                new_props.append((sha, props_blobs[sha]))
                if thumb is not None:
                    thumbs[sha] = thumb
                    new_thumbs.append((sha, thumb))
        cache.put_many(_PROPS_KIND, new_props)
        cache.put_many(_THUMB_KIND, new_thumbs)
    props = pd.DataFrame([json.loads(props_blobs[s]) for s in shas], index=pd.Index(shas, name="sha256"))

    embed = _LazyEmbedder(embedder_factory)
    views = [
        _embeddings(shas, thumbs, cache, f"{kind}-{embedder_name}", embed, turn)
        for kind, turn in ((_EMBED_KIND, None), (_UPRIGHT_KIND, upright), (_DISC_KIND, centre_disc))
    ]
    return ContentFeatures(
        props=props, embeddings=views[0], thumbnails=thumbs, upright_embeddings=views[1], disc_embeddings=views[2]
    )


class _LazyEmbedder:
    """Builds the embedder on first use only, so a warm run never loads the network; safe to call from threads."""

    def __init__(self, factory: Callable[[], Callable[[Sequence[np.ndarray]], np.ndarray]]) -> None:
        self._factory, self._embed = factory, None
        self._lock = threading.Lock()

    def __call__(self, images: Sequence[np.ndarray]) -> np.ndarray:
        with self._lock:
            if self._embed is None:
                self._embed = self._factory()
        return self._embed(images)


def _embeddings(
    shas: list[str],
    thumbs: dict[str, bytes],
    cache: FeatureCache,
    kind: str,
    embed: Callable[[Sequence[np.ndarray]], np.ndarray],
    turn: Callable[[np.ndarray], np.ndarray] | None,
) -> np.ndarray:
    """One embedding per content (zero rows where unreadable), read from or written to ``cache``."""
    blobs = cache.get_many(kind, [s for s in shas if s in thumbs])
    missing = [s for s in shas if s in thumbs and s not in blobs]
    if missing:

        def embed_piece(piece: list[str]) -> np.ndarray:
            images = [load_thumbnail(thumbs[s]) for s in piece]
            return embed([turn(im) for im in images] if turn else images)

        # Pieces run side by side, one per worker thread: PyTorch runs the forward of a thread it did not
        # start on that thread alone, and small batches on one core each took 0.7 of the time of one batch
        # at a time spread over both cores (``benchmarks/embedder.py``); the thumbnails' decoding and turns
        # run in the threads too.
        pieces = [missing[start : start + _EMBED_PIECE] for start in range(0, len(missing), _EMBED_PIECE)]
        new = []
        desc = f"embedding ({kind.split('-')[0]})"
        with (
            opencv_on_calling_threads(),
            ThreadPoolExecutor(worker_count()) as pool,
            progress_bar(desc=desc, total=len(missing)) as bar,
        ):
            for piece, vectors in zip(pieces, pool.map(embed_piece, pieces), strict=True):
                for sha, vec in zip(piece, vectors, strict=True):
                    blobs[sha] = vec.astype(np.float16).tobytes()
                    new.append((sha, blobs[sha]))
                bar.update(len(piece))
        cache.put_many(kind, new)
    dim = len(next(iter(blobs.values()))) // 2 if blobs else 1
    embeddings = np.zeros((len(shas), dim), np.float32)
    for i, sha in enumerate(shas):
        if sha in blobs:
            embeddings[i] = np.frombuffer(blobs[sha], np.float16)
    return embeddings
