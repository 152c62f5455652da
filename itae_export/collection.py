"""Image collections for itae-embed: the source listing (a folder, a text or Parquet file of paths, or a
Parquet file of encoded images), its deterministic split into shards, and reading one image from it.

The listing is sorted (paths) or kept in row order (image bytes), so the same source always gives the
same rows in the same shards; a rerun of itae-embed finds its finished shards by number. Images are
checked before decoding (file size, then the header's pixel count in safe_io) and a bad one becomes a
failure record, never an exception that stops the run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from .data import IMAGE_EXTENSIONS
from .errors import DataError, MissingDependencyError
from .safe_io import MAX_IMAGE_PIXELS, open_image_bytes_rgb, open_image_rgb, read_text_checked

MAX_IMAGE_BYTES = 256 << 20  # an encoded image above this is refused before it is read
MAX_ROW_GROUP_BYTES = 2 << 30  # an image-bytes Parquet row group is read whole by a decoding task
KINDS = ("folder", "paths", "parquet-paths", "parquet-bytes")
PATH_COLUMNS = ("path", "paths", "file", "filename", "url")
BYTES_COLUMNS = ("image", "bytes", "image_bytes", "jpg", "png", "content")


def require_scale(what: str) -> None:
    """itae-embed / itae-cluster need the [scale] extra; say so in one sentence when a part is missing."""
    import importlib.util

    missing = [m for m in ("ray", "faiss", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed; "
            "run pip install 'itae-export[scale]'")


@dataclass(frozen=True)
class Source:
    """A listing: `keys` (the path, or `<parquet>#<row>` / the row's path column for image bytes), in
    shard order. kind: one of KINDS; parquet/column: where image bytes come from."""

    kind: str
    location: Path
    keys: list[str]
    column: str | None = None
    rows: list[int] = field(default_factory=list)  # parquet-bytes: the row of each key

    def __len__(self) -> int:
        return len(self.keys)

    def listing_sha256(self) -> str:
        h = hashlib.sha256()
        for k in self.keys:
            h.update(k.encode("utf-8", "surrogateescape") + b"\n")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"kind": self.kind, "location": str(self.location), "column": self.column, "count": len(self),
                "listing_sha256": self.listing_sha256()}


def list_source(source: str | Path, *, column: str | None = None) -> Source:
    """The sorted listing of `source` (see the module docstring); an empty one is refused."""
    p = Path(source).absolute()
    if p.is_dir():
        src = Source("folder", p, _folder_files(p))
    elif not p.is_file():
        raise DataError(f"SOURCE {p} does not exist; give a folder of images, a text file of paths or a Parquet file")
    elif p.suffix.lower() in (".parquet", ".pq"):
        src = _parquet_source(p, column)
    else:
        src = Source("paths", p, _text_paths(p))
    if not len(src):
        raise DataError(f"SOURCE {p} lists no images ({_expected(src.kind)}); give a non-empty source")
    return src


def _expected(kind: str) -> str:
    exts = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
    return {
        "folder": f"a folder is searched recursively for {exts} files",
        "paths": "a text file lists one image path a line; # starts a comment",
        "parquet-paths": "a Parquet file of paths has a string column named path",
        "parquet-bytes": "a Parquet file of images has a binary column of encoded images",
    }[kind]


def _folder_files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.join(dirpath, f) for f in filenames
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(out)


def _text_paths(p: Path) -> list[str]:
    lines = read_text_checked(p, "SOURCE list of image paths", max_bytes=8 << 30).splitlines()
    paths = {str((p.parent / s).absolute()) if not os.path.isabs(s) else s
             for s in (line.strip() for line in lines) if s and not s.startswith("#")}
    return sorted(paths)


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MissingDependencyError("reading Parquet needs pyarrow; run pip install 'itae-export[scale]'") from None
    return pyarrow, pyarrow.parquet


def _parquet_source(p: Path, column: str | None) -> Source:
    pa, pq = _pyarrow()
    try:
        schema = pq.read_schema(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError... for garbage
        raise DataError(f"SOURCE {p} is not a readable Parquet file ({type(e).__name__}); replace it") from None
    names = {f.name: f.type for f in schema}
    if column is not None and column not in names:
        raise DataError(f"--column {column} is not a column of {p} (it has {', '.join(names)}); name one of them")
    binary = [c for c in ([column] if column else BYTES_COLUMNS) if c in names and
              (pa.types.is_binary(names[c]) or pa.types.is_large_binary(names[c]))]
    text = [c for c in ([column] if column else PATH_COLUMNS) if c in names and
            (pa.types.is_string(names[c]) or pa.types.is_large_string(names[c]))]
    if binary:
        check_row_groups(p, binary[0])
        n = pq.ParquetFile(p).metadata.num_rows
        keys = _row_keys(p, pq, names, n)
        return Source("parquet-bytes", p, keys, binary[0], list(range(n)))
    if text:
        values = pq.read_table(p, columns=[text[0]]).column(0).to_pylist()
        paths = {str((p.parent / s).absolute()) if not os.path.isabs(s) else s for s in values if s}
        return Source("parquet-paths", p, sorted(paths), text[0])
    raise DataError(f"SOURCE {p} has no column of image paths (string: {', '.join(PATH_COLUMNS)}) or image bytes "
                    f"(binary: {', '.join(BYTES_COLUMNS)}); name one with --column")


def _row_keys(p: Path, pq, names: dict, n: int) -> list[str]:
    """The key of each row of an image-bytes Parquet file: its path column when it has one, else <file>#<row>."""
    col = next((c for c in PATH_COLUMNS if c in names and str(names[c]) in ("string", "large_string")), None)
    if col is None:
        return [f"{p}#{i}" for i in range(n)]
    values = pq.read_table(p, columns=[col]).column(0).to_pylist()
    return [v if v else f"{p}#{i}" for i, v in enumerate(values)]


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Limits:
    """What an image may be before it is decoded."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    root: str | None = None  # a folder SOURCE: images must resolve (symlinks followed) inside it


def open_file_image(path: str, limits: Limits):
    """A PIL RGB image from a file, or DataError naming why not (missing, empty, oversized, corrupt, or a
    symlink out of a folder SOURCE)."""
    if limits.root is not None:
        real, root = os.path.realpath(path), os.path.realpath(limits.root)
        if os.path.commonpath([real, root]) != root:
            raise DataError(f"image {path} resolves to {real}, outside the SOURCE folder {root}; not read")
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise DataError(f"image {path} cannot be read ({e.strerror})") from None
    if size == 0:
        raise DataError(f"image {path} is empty (0 bytes)")
    if size > limits.max_bytes:
        raise DataError(f"image {path} is {size} bytes, over the {limits.max_bytes}-byte limit")
    return open_image_rgb(path, max_pixels=limits.max_pixels)


def open_bytes_image(data: bytes | None, key: str, limits: Limits):
    if data is None or len(data) == 0:
        raise DataError(f"image {key} is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise DataError(f"image {key} is {len(data)} bytes, over the {limits.max_bytes}-byte limit")
    return open_image_bytes_rgb(data, key, max_pixels=limits.max_pixels)


_GROUP_CACHE: dict = {}  # per process: the last row group read, (path, column, group) -> cells


def read_parquet_cells(path: str | Path, column: str, rows: list[int]) -> list[bytes | None]:
    """The cells `rows` of a binary column, reading only the row groups that hold them; the last group
    read stays cached in the process, so consecutive batches of one group read it once."""
    _, pq = _pyarrow()
    pf = pq.ParquetFile(path)
    starts, acc = [], 0
    for g in range(pf.metadata.num_row_groups):
        starts.append(acc)
        acc += pf.metadata.row_group(g).num_rows
    out: list[bytes | None] = []
    for r in rows:
        g = _group_of(starts, r)
        key = (str(path), column, g)
        if key not in _GROUP_CACHE:
            _GROUP_CACHE.clear()
            _GROUP_CACHE[key] = pf.read_row_group(g, columns=[column]).column(0)
        out.append(_GROUP_CACHE[key][r - starts[g]].as_py())
    return out


def check_row_groups(path: Path, column: str) -> None:
    """Refuse row groups too big to read per batch (each decoding task holds one in memory)."""
    _, pq = _pyarrow()
    meta = pq.ParquetFile(path).metadata
    for g in range(meta.num_row_groups):
        size = meta.row_group(g).total_byte_size
        if size > MAX_ROW_GROUP_BYTES:
            raise DataError(f"SOURCE {path}: row group {g} holds {size} bytes of images, over the "
                            f"{MAX_ROW_GROUP_BYTES}-byte limit a decoding task reads at once; rewrite it with "
                            "smaller row groups (pyarrow.parquet.write_table(..., row_group_size=1000))")


def _group_of(starts: list[int], row: int) -> int:
    import bisect

    return bisect.bisect_right(starts, row) - 1


def load_image(kind: str, location: str | Path, column: str | None, index: int, key: str,
               limits: Limits | None = None):
    """Row `index` (key `key`) of a listing as described by Source.describe(): a file, or a Parquet cell."""
    limits = limits or Limits()
    if kind != "parquet-bytes":
        return open_file_image(key, limits)
    assert column is not None
    return open_bytes_image(read_parquet_cells(location, column, [index])[0], key, limits)
