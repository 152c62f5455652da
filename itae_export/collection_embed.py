"""itae_export.embed() / itae-embed: embed an image collection with an itae-export artifact on Ray Data,
into resumable Parquet shards (layout: itae_export.shards)."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .collection import MAX_IMAGE_BYTES, Limits, Source, list_source, require_scale
from .collection_model import CollectionModel, resolve_model
from .collection_ray import RaySettings, ray_session, run_pipeline
from .data import Preprocess
from .errors import ItaeError, UsageError
from .outputs import OutputTransaction
from .safe_io import MAX_IMAGE_PIXELS
from .shards import (
    FAILED,
    FORMAT,
    SUMMARY,
    check_out_folder,
    n_shards,
    shard_done,
    write_manifest,
    write_shard,
    write_summary,
)


@dataclass
class EmbedRequest:
    """What itae-embed does. source: a folder of images, a text/Parquet file of paths or a Parquet file
    of encoded images; model: an itae-export .onnx / .engine / .plan / .xml; out: the output folder
    (a rerun into it resumes)."""

    source: str | Path
    model: str | Path
    out: str | Path
    workers: int = 2
    batch_size: int = 32
    shard_size: int = 4096  # rounded up to a multiple of batch_size
    num_gpus_per_worker: float = 0.0
    address: str | None = None
    num_cpus: int | None = None
    threads_per_worker: int | None = None
    column: str | None = None  # the Parquet column of paths or image bytes (default: found by name)
    img_size: int | None = None  # only for artifacts that record no image size
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("workers", "batch_size", "shard_size", "max_image_bytes", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.num_gpus_per_worker < 0:
            raise UsageError(f"--num-gpus-per-worker must be >= 0, got {self.num_gpus_per_worker}")
        for name in ("num_cpus", "threads_per_worker"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        self.shard_size = -(-self.shard_size // self.batch_size) * self.batch_size

    def ray_settings(self) -> RaySettings:
        return RaySettings(self.address, self.num_cpus, self.workers, self.batch_size, self.num_gpus_per_worker,
                           self.threads_per_worker)


@dataclass
class EmbedResult:
    out: Path
    model: CollectionModel
    images: int  # rows in the listing
    embedded: int  # rows with an embedding (all shards)
    failed: int  # rows in failed.parquet
    shards: int
    resumed_shards: int  # shards found finished and skipped
    seconds: float
    images_per_s: float | None  # images processed by this run per second of its pipeline
    failed_path: Path
    extra: dict = field(default_factory=dict)

    def summary(self) -> str:
        rate = f", {self.images_per_s:.1f} images/s" if self.images_per_s else ""
        resumed = f" ({self.resumed_shards} finished shard(s) skipped)" if self.resumed_shards else ""
        from .viz import plural

        return (f"{self.embedded} of {plural(self.images, 'image')} embedded into {plural(self.shards, 'shard')} "
                f"in {self.out}{resumed}; {self.failed} failed (listed in {self.failed_path}){rate}")


def _manifest(req: EmbedRequest, model: CollectionModel, source: Source, pre: Preprocess) -> dict:
    return {"format": FORMAT, "model": model.to_dict(), "source": source.describe(), "shard_size": req.shard_size,
            "preprocessing": {**pre.to_dict(), "input_format": model.input_format}}


def embed(req: EmbedRequest) -> EmbedResult:
    """Run itae-embed (see EmbedRequest). Everything is checked before the output folder is touched."""
    require_scale("itae-embed")
    t0 = time.perf_counter()
    model = resolve_model(req.model, req.img_size)
    source = list_source(req.source, column=req.column)
    out = Path(req.out).absolute()
    if out == source.location or out in source.location.parents:
        raise UsageError(f"--out {out} is the SOURCE or holds it; give a folder outside the source")
    pre = Preprocess(img_size=model.img_size)
    manifest = _manifest(req, model, source, pre)
    resume = check_out_folder(out, manifest)  # read-only: refusals leave everything as it was
    # The run's last files (summary.json + failed.parquet) are claimed first: a second itae-embed into the
    # same folder is refused at once (exit 6), and a new folder is removed again when the run fails early.
    with OutputTransaction(out / SUMMARY, extra=[out / FAILED], inputs=[Path(req.model), source.location],
                           force=True, flag="--out") as run_tx:
        total = n_shards(len(source), req.shard_size)
        done = {s for s in range(total) if shard_done(out, s, model.digest)}
        todo = np.concatenate([np.arange(s * req.shard_size, min(len(source), (s + 1) * req.shard_size))
                               for s in range(total) if s not in done] or [np.zeros(0, np.int64)])
        t_run = time.perf_counter()
        # Ray first (a bad --address is refused before anything is written), then the manifest
        with ray_session(req.ray_settings()) if len(todo) else contextlib.nullcontext():
            if not resume:
                write_manifest(out, manifest, source.keys, [Path(req.model), source.location])
            timing = _run(req, source, todo, model, pre, out) if len(todo) else {}
        run_s = time.perf_counter() - t_run
        counts = _counts(out, total)
        summary = {"images": len(source), "embedded": counts[0], "failed": counts[1], "shards": total,
                   "model_digest": model.digest}
        failed_path = write_summary(run_tx, out, summary)
    return EmbedResult(out, model, len(source), counts[0], counts[1], total, len(done),
                       time.perf_counter() - t0, len(todo) / run_s if len(todo) and run_s > 0 else None, failed_path,
                       timing)


def _counts(out: Path, total: int) -> tuple[int, int]:
    import pyarrow.parquet as pq

    from .shards import failed_path, shard_path

    emb = sum(pq.ParquetFile(shard_path(out, s)).metadata.num_rows for s in range(total))
    bad = sum(pq.ParquetFile(failed_path(out, s)).metadata.num_rows for s in range(total))
    return emb, bad


class _ShardBuffer:
    """Collects result rows per shard and commits a shard once it holds each of its rows exactly once."""

    def __init__(self, out: Path, source: Source, shard_size: int, digest: str):
        self.out, self.source, self.size, self.digest = out, source, shard_size, digest
        self.parts: dict[int, list[dict]] = {}
        self.rows: dict[int, int] = {}

    def expected(self, s: int) -> int:
        return min(len(self.source), (s + 1) * self.size) - s * self.size

    def add(self, batch: dict) -> None:
        index = np.asarray(batch["index"], dtype=np.int64)
        shard = index // self.size
        for s in np.unique(shard).tolist():
            sel = shard == s
            self.parts.setdefault(s, []).append({k: np.asarray(v)[sel] for k, v in batch.items()})
            self.rows[s] = self.rows.get(s, 0) + int(sel.sum())
            if self.rows[s] >= self.expected(s):
                self._flush(s)

    def _flush(self, s: int) -> None:
        parts = self.parts.pop(s)
        index = np.concatenate([p["index"] for p in parts])
        order = np.argsort(index, kind="stable")
        index = index[order]
        start = s * self.size
        if not np.array_equal(index, np.arange(start, start + self.expected(s))):
            raise ItaeError(f"shard {s} received rows {index[:5].tolist()}... instead of each of rows {start}.."
                            f"{start + self.expected(s) - 1} once; rerun the same command to redo it")
        keys = np.concatenate([p["key"] for p in parts])[order]
        errors = np.concatenate([p["error"] for p in parts])[order]
        emb = np.concatenate([p["embedding"] for p in parts])[order]
        ok = np.asarray([e == "" for e in errors], dtype=bool)
        write_shard(self.out, s, self.digest,
                    {"index": index[ok], "path": [str(k) for k in keys[ok]], "embedding": emb[ok]},
                    {"index": index[~ok], "path": [str(k) for k in keys[~ok]],
                     "reason": [str(e) for e in errors[~ok]]})


def _run(req: EmbedRequest, source: Source, todo: np.ndarray, model: CollectionModel, pre: Preprocess,
         out: Path) -> dict:
    """Run the pipeline over `todo`; returns its timing: startup_s (Ray and the actors, until the first
    result), steady_images_per_s (the images after the first result batch, per second)."""
    from tqdm import tqdm

    buffer = _ShardBuffer(out, source, req.shard_size, model.digest)
    limits = Limits(req.max_image_bytes, req.max_pixels, str(source.location) if source.kind == "folder" else None)
    t0, first, after = time.perf_counter(), None, 0
    with tqdm(total=len(todo), desc="embedding", unit="img", disable=not req.progress, smoothing=0.1) as bar:
        for batch in run_pipeline(source, todo, model, pre, limits, req.ray_settings()):
            buffer.add(batch)
            bar.update(len(batch["index"]))
            if first is None:
                first = time.perf_counter()
            else:
                after += len(batch["index"])
    t_end = time.perf_counter()
    if buffer.parts:
        raise ItaeError(f"the pipeline ended with shards {sorted(buffer.parts)} incomplete; rerun the same "
                        "command to finish them")
    steady = after / (t_end - first) if first is not None and after and t_end > first else None
    return {"startup_s": (first or t_end) - t0, "steady_images_per_s": steady}
