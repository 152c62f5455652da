"""Output safety: never overwrite an input, never leave a half-written output."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputExistsError, UsageError


def check_output_path(out: str | Path, *, force: bool, inputs: tuple[str | Path, ...] = ()) -> Path:
    """Refuse an output that exists (unless force) or that is one of the inputs."""
    out_p = Path(out)
    for i in inputs:
        if i is not None and Path(i).exists() and out_p.exists() and os.path.samefile(out_p, i):
            raise UsageError(f"--out {out_p} is the input file; choose another output path (inputs are never modified)")
        if i is not None and Path(i).resolve() == out_p.resolve():
            raise UsageError(f"--out {out_p} is the input file; choose another output path (inputs are never modified)")
    if out_p.exists() and not force:
        raise OutputExistsError(f"{out_p} already exists; pass --force to overwrite it or choose another --out")
    if out_p.exists() and out_p.is_dir():
        raise UsageError(f"--out {out_p} is a directory; give a file path")
    return out_p


@contextlib.contextmanager
def atomic_path(final: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the same directory; rename it onto `final` only on success."""
    final_p = Path(final)
    final_p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final_p.name}.", suffix=suffix or ".tmp", dir=final_p.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    try:
        yield tmp_p
        os.replace(tmp_p, final_p)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


def atomic_write_bytes(final: str | Path, data: bytes) -> Path:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)
    return Path(final)


def atomic_write_text(final: str | Path, text: str) -> Path:
    return atomic_write_bytes(final, text.encode())


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
