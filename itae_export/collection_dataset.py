"""itae-eval on itae-embed's machinery: an exported backend's embeddings of a data set computed by the Ray
Data pipeline (decoding tasks overlapping an actor pool of runtime sessions) instead of one process.

Used by `itae-eval --ray-workers N` for --onnx / --onnx-baseline / --engine: a file data set (ImageFolder,
Tiny ImageNet) is read from its paths, an in-memory one (CIFAR, STL-10, digits) from one copy in Ray's
object store. Every image must be readable (an evaluation over a subset would mean something else).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .collection import Limits, Source, require_scale
from .collection_model import CollectionModel
from .collection_ray import RaySettings, ray_session, run_pipeline
from .errors import DataError


def dataset_model(path: str | Path, backend: str, img_size: int) -> CollectionModel:
    """The model description the actors need; the input format comes from the metadata when recorded."""
    fmt = "float32-nchw"
    if backend == "onnxruntime":
        import onnx

        from graph_passes.metadata import metadata_field

        if metadata_field(onnx.load(str(path), load_external_data=False), "uint8_nhwc_input") is not None:
            fmt = "uint8-nhwc"
    return CollectionModel(str(Path(path).absolute()), backend, img_size, fmt, "", None, None)


def _dataset_source(dataset) -> tuple[Source, np.ndarray | None]:
    if isinstance(dataset.images, np.ndarray):
        keys = [f"{dataset.name}#{i}" for i in range(len(dataset))]
        return Source("arrays", Path(dataset.name), keys), dataset.images
    return Source("paths", Path(str(dataset.root or dataset.name)), [str(p) for p in dataset.images]), None


def ray_embed_dataset(model: CollectionModel, dataset, preprocess, settings: RaySettings,
                      progress: bool = True) -> tuple[np.ndarray, float]:
    """(embeddings [N, D] in data set order, seconds of the pipeline)."""
    import ray
    from tqdm import tqdm

    require_scale("itae-eval --ray-workers")
    source, arrays = _dataset_source(dataset)
    out: np.ndarray | None = None
    t0 = time.perf_counter()
    with ray_session(settings), tqdm(total=len(source), desc=f"{Path(model.path).name} (Ray)", unit="img",
                                     disable=not progress, leave=False) as bar:
        ref = ray.put(np.ascontiguousarray(arrays)) if arrays is not None else None
        for batch in run_pipeline(source, np.arange(len(source)), model, preprocess, Limits(), settings, ref):
            bad = [str(e) for e in batch["error"] if e]
            if bad:
                raise DataError(f"{dataset.name}: {bad[0]}; itae-eval needs every image readable")
            emb = np.asarray(batch["embedding"], dtype=np.float32)
            if out is None:
                out = np.empty((len(source), emb.shape[1]), dtype=np.float32)
            out[np.asarray(batch["index"])] = emb
            bar.update(len(emb))
    if out is None:
        raise DataError(f"data set {dataset.name} ({dataset.split}) has no images")
    return out, time.perf_counter() - t0


def ray_bulk(model: CollectionModel, settings: RaySettings) -> Callable:
    """A Backend.bulk function: (dataset, preprocess, progress) -> (embeddings, seconds)."""

    def bulk(dataset, preprocess, progress: bool = True) -> tuple[np.ndarray, float]:
        return ray_embed_dataset(model, dataset, preprocess, settings, progress)

    return bulk
