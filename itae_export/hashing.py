"""The one sha256 of a file (engine sidecars, Triton sidecar checks, embedding-cache identities)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of the file's bytes, read in `chunk`-sized blocks (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
