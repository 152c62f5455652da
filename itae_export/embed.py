"""Embedding extraction with interchangeable backends, cached on disk.

Backends: the PyTorch baseline (the embedder), the PyTorch ITAE reference
(itae_export.reference.ITAEReference), ONNX Runtime on a given ONNX file, and TensorRT on a built engine
(itae_export.runtime.make_runner). A cache entry is a pair `<stem>.npy` + `<stem>.json`; the JSON says
how the embeddings were made (model and weights file digest, image size, preprocessing, backend and its
file digests, ITAE settings, data set, split, count) and an entry is used only when that JSON equals the
requested one exactly.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError, OutputBusyError, UsageError
from .hashing import sha256_file
from .outputs import OutputTransaction

CACHE_FORMAT = 1

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> dict:
    """{"path", "size", "sha256"} of a file; memoised per (path, size, mtime) within the process."""
    p = Path(path).resolve()
    if p.is_dir():
        raise UsageError(f"{p} is a folder; a file digest needs a file (weights folders: weights_digest)")
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(p)
    return {"path": str(p), "size": st.st_size, "sha256": _DIGESTS[key]}


def weights_digest(path: str | Path) -> dict:
    """The identity of a --weights path. A file: file_digest. A Hugging Face transformers checkpoint
    (a folder, or its model.safetensors[.index.json] with config.json beside it): config.json and every
    weights file (sharded: the index and each shard) in "files", and their combined "sha256" (of the
    sha256sum-style listing "<sha256>  <name>" per file, names relative to the folder) and "size"."""
    from .hf_weights import hf_checkpoint_files, is_hf_checkpoint

    p = Path(path).resolve()
    if not is_hf_checkpoint(p):
        return file_digest(p)
    files = [file_digest(f) for f in hf_checkpoint_files(p)]
    folder = p if p.is_dir() else p.parent
    listing = "".join(f"{d['sha256']}  {Path(d['path']).relative_to(folder)}\n" for d in files)
    return {
        "path": str(p),
        "format": "transformers",
        "size": sum(d["size"] for d in files),
        "sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "files": files,
    }


def model_identity(
    name: str,
    *,
    weights: str | Path | None,
    random_weights: bool,
    seed: int,
    img_size: int,
    depth: int | None = None,
    resolved_weights: str | Path | None = None,
) -> dict:
    """What determines the PyTorch model's numbers: name, weights digest (weights_digest: a file, or
    a transformers checkpoint's config and weight files) or the random seed, size."""
    ident: dict = {"name": name, "img_size": img_size}
    if random_weights:
        ident["weights"] = {"random": True, "seed": seed}
    else:
        w = resolved_weights if resolved_weights is not None else weights
        ident["weights"] = weights_digest(w) if w is not None else None
    if depth is not None:
        ident["depth"] = depth
    return ident


def onnx_identity(path: str | Path) -> dict:
    """Digests of an ONNX file and its external data files, and its metadata_props (where itae-export
    records the ITAE settings it applied)."""
    from .safe_io import load_onnx_with_data

    p = Path(path)
    m, data = load_onnx_with_data(p, "--onnx")
    files = [p, *data]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise UsageError(
            f"--onnx {p} references external data {missing} that is missing; keep it beside the model"
        )
    return {
        "files": [file_digest(f) for f in files],
        "metadata": {kv.key: kv.value for kv in m.metadata_props},
    }


@dataclass
class Backend:
    """A named way of computing embeddings: run(x float32 [B,3,S,S]) -> [B, D]."""

    name: str  # e.g. "torch-baseline", "torch-itae", "onnxruntime", "tensorrt"
    kind: str  # torch | onnxruntime | tensorrt
    run: Callable[[np.ndarray], np.ndarray]
    identity: dict = field(default_factory=dict)  # what the cache key needs beyond model/data/preprocessing
    itae: dict | None = None  # ITAE settings applied (None: baseline)
    # (dataset, preprocess, progress) -> (embeddings, seconds): the whole data set at once, e.g. on Ray Data
    # (itae-eval --ray-workers, collection_dataset.ray_bulk); None: batch by batch through run
    bulk: Callable | None = None


def _torch_run(module) -> Callable[[np.ndarray], np.ndarray]:
    from .runtime import make_runner

    return make_runner("torch", module).run


def torch_baseline_backend(embedder) -> Backend:
    return Backend(
        "torch-baseline", "torch", _torch_run(embedder), {"backend": "torch", "module": "embedder"}, None
    )


def torch_itae_backend(embedder, cfg) -> Backend:
    from .reference import ITAEReference

    ref = ITAEReference(embedder, cfg).eval()
    return Backend(
        "torch-itae", "torch", _torch_run(ref), {"backend": "torch", "module": "ITAEReference"}, cfg.to_dict()
    )


def onnx_backend(
    path: str | Path, *, name: str = "onnxruntime", itae: dict | None = None, providers=None
) -> Backend:
    from .runtime import OrtRunner

    ident = {
        "backend": "onnxruntime",
        "providers": list(providers) if providers else None,
        "onnx": onnx_identity(path),
    }
    runner = OrtRunner(str(path), providers=providers)
    return Backend(name, "onnxruntime", runner.run, ident, itae)


def tensorrt_backend(engine_path: str | Path, *, name: str = "tensorrt", itae: dict | None = None) -> Backend:
    from .runtime import make_runner

    p = Path(engine_path)
    if not p.is_file():
        raise UsageError(f"--engine {p} does not exist; build one with itae-export --engine")
    runner = make_runner("tensorrt", str(p))  # raises EngineError without TensorRT / a GPU
    return Backend(name, "tensorrt", runner.run, {"backend": "tensorrt", "engine": file_digest(p)}, itae)


def openvino_backend(xml_path: str | Path, *, name: str = "openvino", itae: dict | None = None) -> Backend:
    """An OpenVINO IR on the CPU, compiled with its sidecar's compile_config (itae-export --out *.xml)."""
    from .ov_runner import OpenVinoRunner, check_ir_files, read_sidecar

    xml, weights = check_ir_files(xml_path)
    runner = OpenVinoRunner(xml)
    side = read_sidecar(xml) or {}
    ident = {"backend": "openvino", "xml": file_digest(xml), "bin": file_digest(weights),
             "compile_config": runner.compile_config, "precision": side.get("precision")}
    return Backend(name, "openvino", runner.run, ident, itae)


def cache_meta(backend: Backend, model: dict, preprocess, dataset) -> dict:
    """The exact description an embeddings cache entry must match."""
    return {
        "format": CACHE_FORMAT,
        "model": model,
        "img_size": preprocess.img_size,
        "preprocessing": preprocess.to_dict(),
        "backend": backend.identity,
        "itae": backend.itae,
        "data": dataset.describe(),
    }


class EmbeddingCache:
    def __init__(self, directory: str | Path | None):
        self.dir = Path(directory) if directory is not None else None

    def stem(self, meta: dict) -> Path:
        assert self.dir is not None
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        d = meta["data"]
        return self.dir / f"{d['dataset']}-{d['split']}-{meta['backend']['backend']}-{key}"

    def get(self, meta: dict) -> tuple[np.ndarray | None, Path | None]:
        if self.dir is None:
            return None, None
        stem = self.stem(meta)
        js, npy = stem.with_suffix(".json"), stem.with_suffix(".npy")
        if not (js.is_file() and npy.is_file()):
            return None, None
        try:
            stored = json.loads(js.read_text())
            # Round-trip the request through JSON so tuples/lists compare equal.
            if stored != json.loads(json.dumps(meta)):
                return None, None
            emb = np.load(npy, allow_pickle=False)
        except (OSError, ValueError):
            return None, None  # damaged entry: recompute and overwrite
        if emb.ndim != 2 or emb.shape[0] != meta["data"]["count"]:
            return None, None
        return emb, npy

    def put(self, meta: dict, emb: np.ndarray) -> Path | None:
        """Store an entry: `<stem>.npy` and `<stem>.json` in one output transaction (the JSON is
        committed last: an entry without it is never read). An entry being written by another process
        at the same time is left to it (returns None)."""
        if self.dir is None:
            return None
        stem = self.stem(meta)
        npy, js = stem.with_suffix(".npy"), stem.with_suffix(".json")
        try:
            with OutputTransaction(js, extra=[npy], force=True, flag="--cache-dir") as tx:
                staged_npy, staged_js = tx.stage_path(npy), tx.stage_path(js)
                with open(staged_npy, "wb") as f:
                    np.save(f, emb, allow_pickle=False)
                staged_js.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
                tx.add(staged_npy, npy)
                tx.add(staged_js, js)
                tx.commit()
        except OutputBusyError:
            return None  # the same entry is being stored by another run
        return npy


def compute_embeddings(
    backend: Backend, dataset, preprocess, *, batch_size: int = 64, progress: bool = True, workers: int = 2
) -> tuple[np.ndarray, float]:
    """(embeddings [N, D], seconds spent in the backend alone, without image decoding and preprocessing).
    progress: a tqdm bar that counts the images embedded (advanced after the backend returns a batch)."""
    from tqdm import tqdm

    from .data import iter_batches

    if backend.bulk is not None:
        return backend.bulk(dataset, preprocess, progress)
    out: list[np.ndarray] = []
    run_s = 0.0
    batches = iter_batches(dataset, preprocess, batch_size, progress=False, desc=backend.name, workers=workers)
    with tqdm(total=len(dataset), desc=backend.name, unit="img", disable=not progress, leave=False) as bar:
        for x, _ in batches:
            t0 = time.perf_counter()
            y = np.asarray(backend.run(x), dtype=np.float32)
            run_s += time.perf_counter() - t0
            if y.ndim != 2 or y.shape[0] != x.shape[0]:
                raise DataError(
                    f"backend {backend.name} returned shape {y.shape} for a batch of {x.shape[0]}; expected [B, D]"
                )
            out.append(y)
            bar.update(x.shape[0])
    if not out:
        raise DataError(f"data set {dataset.name} ({dataset.split}) has no images")
    return np.concatenate(out), run_s


def get_embeddings(
    backend: Backend,
    dataset,
    preprocess,
    model: dict,
    cache: EmbeddingCache,
    *,
    batch_size: int = 64,
    progress: bool = True,
    workers: int = 2,
) -> tuple[np.ndarray, dict]:
    """Embeddings from the cache when the description matches exactly, else computed (and stored).
    Returns (embeddings [N, D], info: cached, seconds (wall, with image loading), backend_seconds (the
    backend alone), images_per_s (by backend time), cache_file)."""
    meta = cache_meta(backend, model, preprocess, dataset)
    emb, path = cache.get(meta)
    if emb is not None:
        return emb, {
            "cached": True,
            "seconds": 0.0,
            "backend_seconds": 0.0,
            "images_per_s": None,
            "cache_file": str(path),
        }
    t0 = time.perf_counter()
    emb, run_s = compute_embeddings(
        backend, dataset, preprocess, batch_size=batch_size, progress=progress, workers=workers
    )
    dt = time.perf_counter() - t0
    path = cache.put(meta, emb)
    return emb, {
        "cached": False,
        "seconds": dt,
        "backend_seconds": run_s,
        "images_per_s": len(dataset) / run_s if run_s > 0 else None,
        "cache_file": str(path) if path else None,
    }
