"""A content-addressed feature cache that lives outside the datasets.

Keys are ``(kind, content hash)``, so a file that changes gets a new key and is recomputed, while a
renamed or copied file is free. The store is one SQLite file: safe against interrupted runs (each write
is a transaction) and readable by several processes at once. Every value carries a BLAKE2 checksum of
itself; a value that no longer matches it (a damaged disk, a tampered file, an entry from before checksums)
is not trusted: it is dropped and reported missing, so the caller recomputes it. A write that fails (a full
disk) is rolled back, logged once, and the cache stops writing for the rest of the run: the work it was
saving goes on uncached, and what the cache held stays whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import closing, suppress
from pathlib import Path

__all__ = ["FeatureCache", "default_cache_dir"]

log = logging.getLogger(__name__)


def _checksum(value: bytes) -> str:
    return hashlib.blake2b(value, digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    """``$FRACDET_CACHE``, else ``$XDG_CACHE_HOME/fracdet``, else ``~/.cache/fracdet``."""
    if env := os.environ.get("FRACDET_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fracdet"


class FeatureCache:
    """Blobs keyed by kind and content hash.

    Args:
        directory: where the SQLite file lives; ``None`` means :func:`default_cache_dir`.
        enabled: ``False`` makes every lookup miss and every write a no-op (for ``--no-cache``).
    """

    def __init__(self, directory: str | Path | None = None, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.path = self.directory / "features.sqlite"
        self._conn: sqlite3.Connection | None = None
        self._writable = True

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=60)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS blobs (kind TEXT, key TEXT, value BLOB, PRIMARY KEY (kind, key))"
            )
            columns = {row[1] for row in self._conn.execute("PRAGMA table_info(blobs)")}
            if "checksum" not in columns:  # a cache from before checksums: its values will be recomputed
                with self._conn:
                    self._conn.execute("ALTER TABLE blobs ADD COLUMN checksum TEXT")
        return self._conn

    def get_many(self, kind: str, keys: Iterable[str]) -> dict[str, bytes]:
        """Return the cached values of ``keys`` that exist (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        if not self.enabled or not keys:
            return {}
        try:
            conn = self._connect()
        except (sqlite3.DatabaseError, OSError) as exc:  # cannot even create the file: a full disk
            log.warning("cache %s: cannot open (%s); going on without it", self.path, exc)
            self.close()
            self.enabled = False
            return {}
        found: dict[str, bytes] = {}
        damaged: list[str] = []
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, value, checksum FROM blobs WHERE kind = ? AND key IN ({marks})"
            for key, value, checksum in conn.execute(query, (kind, *chunk)):
                if checksum is not None and _checksum(bytes(value)) == checksum:
                    found[key] = bytes(value)
                else:
                    damaged.append(key)
        if damaged:
            log.warning("cache %s: %d %s entries failed their checksum; recomputing them", self.path, len(damaged),
                        kind)  # fmt: skip
            with suppress(sqlite3.DatabaseError), conn:  # dropping them is tidiness; they are not returned
                conn.executemany("DELETE FROM blobs WHERE kind = ? AND key = ?", ((kind, k) for k in damaged))
        return found

    def contains(self, kind: str, keys: Iterable[str]) -> set[str]:
        """The keys of ``keys`` stored for ``kind``, without reading their values (checksums are checked when
        a value is read: :meth:`get_many`)."""
        keys = list(dict.fromkeys(keys))
        if not self.enabled or not keys or not self.path.exists():
            return set()
        try:
            conn = self._connect()
        except (sqlite3.DatabaseError, OSError):
            return set()
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            query = f"SELECT key FROM blobs WHERE kind = ? AND key IN ({','.join('?' * len(chunk))})"
            found.update(row[0] for row in conn.execute(query, (kind, *chunk)))
        return found

    @property
    def writable(self) -> bool:
        """Whether values put now are kept (not ``--no-cache``, and no write has failed in this run)."""
        return self.enabled and self._writable

    def put_many(self, kind: str, items: Iterable[tuple[str, bytes]]) -> None:
        """Store ``(key, value)`` pairs in one transaction."""
        if not self.enabled or not self._writable:
            return
        try:
            conn = self._connect()
            with conn:  # one transaction: all of it is stored or none
                conn.executemany(
                    "INSERT OR REPLACE INTO blobs (kind, key, value, checksum) VALUES (?, ?, ?, ?)",
                    ((kind, key, sqlite3.Binary(value), _checksum(value)) for key, value in items),
                )
        except (sqlite3.DatabaseError, OSError) as exc:
            # SQLITE_FULL ("database or disk is full"), a quota, a file-size limit, a read-only folder.
            log.warning("cache %s: cannot write (%s); going on without storing more", self.path, exc)
            self._writable = False

    def keys(self, kind: str) -> Iterator[str]:
        """Iterate over the keys stored for ``kind`` (used by tests and diagnostics)."""
        if not self.enabled or not self.path.exists():
            return iter(())
        with closing(self._connect().execute("SELECT key FROM blobs WHERE kind = ?", (kind,))) as cur:
            return iter([row[0] for row in cur])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
