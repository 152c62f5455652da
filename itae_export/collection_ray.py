"""The Ray Data pipeline of itae-embed: the listing rows of the unfinished shards -> decode and crop in
parallel tasks -> normalise and run the model in an actor pool (one runtime session per actor) -> rows
back to the driver in listing order, where shards are committed as they complete.

Ray restarts a killed actor and retries its batch (Ray Data's defaults for actor pools: max_restarts -1,
max_task_retries -1); the driver checks that each shard receives every row exactly once before it is
written, so a retry can neither lose nor duplicate a row.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .collection import Limits, Source, open_bytes_image, open_file_image, read_parquet_cells
from .collection_model import CollectionModel, make_model_runner
from .data import Preprocess
from .errors import DataError, ItaeError, UsageError

TARGET_BLOCKS, MAX_BATCHES_PER_BLOCK = 1024, 64  # the driver holds one object per block
DECODE_CPUS = 0.5  # a decoding task's CPU share; different from the actors', so Ray does not fuse the stages


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: a local Ray on this machine
    num_cpus: int | None = None  # local Ray: logical CPUs (default: the machine's, at least workers + 1)
    workers: int = 2
    batch_size: int = 32
    num_gpus_per_worker: float = 0.0
    threads_per_worker: int | None = None  # ONNX Runtime intra-op threads (default: CPUs / workers)


@contextlib.contextmanager
def ray_session(settings: RaySettings) -> Iterator[None]:
    """Reuse a running Ray session (tests, notebooks), join --address, or start a local one (and stop it
    afterwards). address="local" makes sure a missing --address never joins a cluster found elsewhere."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": True,
                    "logging_level": logging.WARNING}
    if settings.address:
        try:
            ray.init(address=settings.address, **kwargs)
        except ConnectionError as e:
            raise UsageError(f"--address {settings.address}: no Ray cluster could be joined there "
                             f"({str(e).splitlines()[0][:160]}); check that `ray status --address "
                             f"{settings.address}` works from this machine (token authentication: Ray's "
                             "RAY_AUTH_TOKEN settings)") from None
    else:
        cpus = settings.num_cpus or max(os.cpu_count() or 1, settings.workers + 1)
        ray.init(address="local", num_cpus=cpus, runtime_env={"env_vars": {"PYTHONPATH": _package_path()}},
                 **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def _package_path() -> str:
    """PYTHONPATH for local workers: the folder holding itae_export first, so a source checkout works too."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return root + (os.pathsep + rest if rest else "")


def _decoder(source: Source, pre: Preprocess, limits: Limits, arrays=None):
    """The decoding task: rows {index, key} -> {index, key, pixels uint8 [B,S,S,3], error ('' = read)}.
    arrays: for an in-memory data set (itae-eval's CIFAR/STL arrays), an object ref of its uint8 images."""
    kind, location, column = source.kind, str(source.location), source.column
    size = pre.img_size

    def one(j: int, key: str, cells, images):
        if images is not None:
            from PIL import Image

            return Image.fromarray(np.asarray(images[j]))
        return open_bytes_image(cells[j], key, limits) if cells is not None else open_file_image(key, limits)

    def decode(batch: dict) -> dict:
        index = np.asarray(batch["index"], dtype=np.int64)
        keys = [str(k) for k in batch["key"]]
        pixels = np.zeros((len(index), size, size, 3), dtype=np.uint8)
        errors = [""] * len(index)
        cells = read_parquet_cells(location, column or "", index.tolist()) if kind == "parquet-bytes" else None
        images = _get(arrays)[index] if arrays is not None else None
        for j, key in enumerate(keys):
            try:
                pixels[j] = np.asarray(pre.crop_image(one(j, key, cells, images)))
            except DataError as e:
                errors[j] = str(e)
            except Exception as e:  # noqa: BLE001 - a decoder bug in one image must not stop the run
                errors[j] = f"image {key} could not be decoded ({type(e).__name__}: {str(e)[:160]})"
        return {"index": index, "key": np.asarray(keys, dtype=object), "pixels": pixels,
                "error": np.asarray(errors, dtype=object)}

    return decode


def _get(ref):
    import ray

    return ray.get(ref)  # a numpy array from the object store: zero-copy, read-only


class EmbedWorker:
    """A Ray actor holding one runtime session: rows with pixels -> rows with embeddings (zeros where the
    image failed, so every row comes back)."""

    def __init__(self, model: CollectionModel, pre: Preprocess, threads: int | None, gpu: bool):
        self.model, self.pre = model, pre
        self.runner = make_model_runner(model, threads=threads, gpu=gpu)
        probe = self._run(np.zeros((1, pre.img_size, pre.img_size, 3), dtype=np.uint8))
        self.dim = probe.shape[1]

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels if self.model.input_format == "uint8-nhwc" else self.pre.normalize(pixels)
        y = np.asarray(self.runner.run(x), dtype=np.float32)
        if y.ndim != 2 or y.shape[0] != len(pixels):
            raise DataError(f"--model {self.model.path} returned shape {y.shape} for {len(pixels)} images; "
                            "expected [B, D]")
        return y

    def __call__(self, batch: dict) -> dict:
        ok = np.asarray([e == "" for e in batch["error"]], dtype=bool)
        emb = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            emb[ok] = self._run(np.asarray(batch["pixels"])[ok])
        return {"index": batch["index"], "key": batch["key"], "error": batch["error"], "embedding": emb}


def _blocks(source: Source, todo: np.ndarray, block_rows: int):
    """The pending rows as Arrow blocks of `block_rows` (a multiple of the batch size) aligned to absolute
    row numbers, so a resumed run forms the same batches as an uninterrupted one."""
    import pyarrow as pa

    idx = np.asarray(todo, dtype=np.int64)
    cuts = np.flatnonzero(np.diff(idx // block_rows)) + 1
    return [pa.table({"index": pa.array(part), "key": pa.array([source.keys[i] for i in part.tolist()],
                                                               type=pa.string())})
            for part in np.split(idx, cuts)]


def run_pipeline(source: Source, todo: np.ndarray, model: CollectionModel, pre: Preprocess, limits: Limits,
                 settings: RaySettings, arrays=None) -> Iterator[dict]:
    """Yield result batches {index, key, error, embedding} for the rows `todo`, in listing order.
    arrays: see _decoder."""
    import ray.data
    from ray.data import ActorPoolStrategy

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its per-dataset INFO lines; tqdm shows progress
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows reach the driver in listing order: one open shard
    ctx.enable_progress_bars = False  # the driver's tqdm bar counts images
    threads = settings.threads_per_worker or max(1, (os.cpu_count() or 1) // settings.workers)
    gpu = settings.num_gpus_per_worker > 0
    # a block per batch for small runs; for millions of images up to 64 batches a block (about 1k blocks)
    per_block = min(MAX_BATCHES_PER_BLOCK, max(1, -(-len(todo) // (settings.batch_size * TARGET_BLOCKS))))
    ds: ray.data.Dataset = ray.data.from_arrow(_blocks(source, todo, settings.batch_size * per_block))
    ds = ds.map_batches(_decoder(source, pre, limits, arrays), batch_size=settings.batch_size, batch_format="numpy",
                        num_cpus=DECODE_CPUS)
    ds = ds.map_batches(EmbedWorker, fn_constructor_args=(model, pre, threads, gpu),
                        compute=ActorPoolStrategy(size=settings.workers), batch_size=settings.batch_size,
                        batch_format="numpy", num_gpus=settings.num_gpus_per_worker or None, num_cpus=1)
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except ItaeError:
        raise
    except Exception as e:  # ray.exceptions.RayTaskError wraps what an actor raised
        cause = getattr(e, "cause", None)
        if isinstance(cause, ItaeError):
            raise type(cause)(str(cause)) from None
        raise ItaeError(f"the Ray pipeline failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "rerun the same command to resume from the finished shards") from e
