"""The itae-embed output folder: manifest.json, sources.parquet, shards/shard-NNNNN.parquet (+ its
.failed.parquet), failed.parquet and summary.json; written through the output transaction, read by
itae-cluster.

A shard holds rows [s * shard_size, (s + 1) * shard_size) of the sorted listing: `index` (the row of the
listing), `path`, `embedding` (fixed-size list of float32) and `model_digest`; the images of those rows
that could not be read are in the shard's .failed.parquet (index, path, reason), committed with it in
one transaction (the shard itself last). A shard file that exists is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, UsageError
from .outputs import OutputTransaction

MANIFEST = "manifest.json"
SOURCES = "sources.parquet"
FAILED = "failed.parquet"
SUMMARY = "summary.json"
SHARD_DIR = "shards"
FORMAT = 1
DIGEST_KEY = b"itae_embed.model_digest"
RESERVED = ".itae-"  # the output transaction's staging and lock folders


def shard_path(out: Path, s: int) -> Path:
    return out / SHARD_DIR / f"shard-{s:05d}.parquet"


def failed_path(out: Path, s: int) -> Path:
    return out / SHARD_DIR / f"shard-{s:05d}.failed.parquet"


def n_shards(count: int, shard_size: int) -> int:
    return (count + shard_size - 1) // shard_size


def shard_done(out: Path, s: int, digest: str) -> bool:
    """A committed shard of this model (its footer is readable and names the digest)."""
    import pyarrow.parquet as pq

    p = shard_path(out, s)
    if not p.is_file():
        return False
    try:
        meta = pq.read_schema(p).metadata or {}
    except Exception:  # noqa: BLE001 - a damaged file is redone
        return False
    return meta.get(DIGEST_KEY) == digest.encode()


def _embedding_array(emb: np.ndarray):
    import pyarrow as pa

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])


def write_shard(out: Path, s: int, digest: str, rows: dict, failures: dict) -> None:
    """Commit shard `s`: rows {index, path, embedding [n, D]} and failures {index, path, reason}."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest, fdest = shard_path(out, s), failed_path(out, s)
    n = len(rows["index"])
    table = pa.table({
        "index": pa.array(rows["index"], type=pa.int64()),
        "path": pa.array(rows["path"], type=pa.string()),
        "embedding": _embedding_array(rows["embedding"]),
        "model_digest": pa.array([digest] * n, type=pa.string()),
    }).replace_schema_metadata({DIGEST_KEY: digest.encode(), b"itae_embed.shard": str(s).encode()})
    failed = pa.table({
        "index": pa.array(failures["index"], type=pa.int64()),
        "path": pa.array(failures["path"], type=pa.string()),
        "reason": pa.array(failures["reason"], type=pa.string()),
    })
    with OutputTransaction(dest, extra=[fdest], force=True, flag="--out") as tx:
        pq.write_table(failed, tx.stage_path(fdest))
        pq.write_table(table, tx.stage_path(dest))
        tx.add(tx.stage_path(fdest), fdest)
        tx.add(tx.stage_path(dest), dest)
        tx.commit()


def write_manifest(out: Path, manifest: dict, keys: list[str], inputs: list[Path]) -> None:
    """manifest.json and sources.parquet (index, path: the listing), one commit, before any shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest, src = out / MANIFEST, out / SOURCES
    with OutputTransaction(dest, extra=[src], inputs=inputs, flag="--out") as tx:
        pq.write_table(pa.table({"index": pa.array(np.arange(len(keys)), type=pa.int64()),
                                 "path": pa.array(keys, type=pa.string())}), tx.stage_path(src))
        tx.stage_path(dest).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        tx.add(tx.stage_path(src), src)
        tx.add(tx.stage_path(dest), dest)
        tx.commit()


def read_manifest(out: Path, flag: str = "DIR") -> dict:
    p = out / MANIFEST
    if not p.is_file():
        raise DataError(f"{flag} {out} is not an itae-embed output folder (no {MANIFEST}); run itae-embed first")
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{p} is not readable JSON ({type(e).__name__}); run itae-embed again into a new folder") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or "model" not in m or "source" not in m:
        raise DataError(f"{p} is not an itae-embed manifest of format {FORMAT}; run itae-embed again into a new folder")
    return m


def write_summary(tx: OutputTransaction, out: Path, summary: dict) -> Path:
    """failed.parquet (every shard's failures, in listing order) and summary.json, committed by `tx` (the
    run's transaction, open since the start: OutputTransaction(out/summary.json, extra=[out/failed.parquet]))."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [pq.read_table(failed_path(out, s)) for s in range(summary["shards"])]
    failed = pa.concat_tables(parts) if parts else pa.table({"index": [], "path": [], "reason": []})
    dest, fdest = out / SUMMARY, out / FAILED
    pq.write_table(failed, tx.stage_path(fdest))
    tx.stage_path(dest).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tx.add(tx.stage_path(fdest), fdest)
    tx.add(tx.stage_path(dest), dest)
    tx.commit()
    return fdest


# --------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class EmbeddingRun:
    """A finished itae-embed folder, for itae-cluster."""

    folder: Path
    manifest: dict
    shards: tuple[Path, ...]
    count: int  # embedded rows
    dim: int

    @property
    def digest(self) -> str:
        return self.manifest["model"]["digest"]


def open_run(folder: str | Path, flag: str = "DIR") -> EmbeddingRun:
    """Check that every shard of an itae-embed folder is there (reading only the Parquet footers)."""
    import pyarrow.parquet as pq

    out = Path(folder).absolute()
    m = read_manifest(out, flag)
    total = n_shards(m["source"]["count"], m["shard_size"])
    missing = [s for s in range(total) if not shard_done(out, s, m["model"]["digest"])]
    if missing:
        raise DataError(f"{flag} {out} is incomplete: {len(missing)} of {total} shards are missing (first: "
                        f"{shard_path(out, missing[0]).name}); rerun the same itae-embed command to finish it")
    shards = tuple(shard_path(out, s) for s in range(total))
    count = sum(pq.ParquetFile(p).metadata.num_rows for p in shards)
    if count == 0:
        raise DataError(f"{flag} {out} holds no embeddings (every image failed; see {out / FAILED})")
    emb_type = pq.read_schema(shards[0]).field("embedding").type
    return EmbeddingRun(out, m, shards, count, int(emb_type.list_size))


def iter_shards(run: EmbeddingRun, columns=("index", "path", "embedding")) -> Iterator[dict]:
    """One shard at a time: {index int64 [n], path list[str], embedding float32 [n, D]}."""
    import pyarrow.parquet as pq

    for p in run.shards:
        t = pq.read_table(p, columns=list(columns))
        out: dict = {}
        if "index" in columns:
            out["index"] = t.column("index").to_numpy()
        if "path" in columns:
            out["path"] = t.column("path").to_pylist()
        if "embedding" in columns:
            flat = t.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            out["embedding"] = np.asarray(flat, dtype=np.float32).reshape(t.num_rows, run.dim)
        yield out


def check_out_folder(out: Path, manifest: dict) -> bool:
    """Whether `out` already holds this run's manifest (True: resume); refuses another model's or another
    listing's folder and a non-empty folder that is not an itae-embed output."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder (new or from an earlier itae-embed run)")
    if not out.is_dir():
        return False
    if not (out / MANIFEST).is_file():
        if any(not p.name.startswith(RESERVED) for p in out.iterdir()):
            raise UsageError(f"--out {out} is a non-empty folder that itae-embed did not write; give a new folder")
        return False
    old = read_manifest(out, "--out")
    if old["model"]["digest"] != manifest["model"]["digest"]:
        raise UsageError(f"--out {out} holds shards of another model ({old['model']['path']}, sha256 "
                         f"{old['model']['digest'][:12]}...); give a new folder for --model {manifest['model']['path']}")
    for key, what in (("source", "source listing"), ("shard_size", "--shard-size"), ("preprocessing", "preprocessing")):
        if old[key] != manifest[key]:
            raise UsageError(f"--out {out} was written for another {what} ({json.dumps(old[key])[:120]}); "
                             "give a new folder, or rerun with the same SOURCE and flags to resume")
    return True
