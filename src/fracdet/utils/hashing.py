"""Content hashes: the identity of a file is its bytes, never its name."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read through one small reused buffer
    (:func:`hashlib.file_digest`), so large files and many threads stay cheap in memory."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
