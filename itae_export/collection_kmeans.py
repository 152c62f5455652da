"""faiss k-means on the embeddings of an itae-embed folder, streamed shard by shard.

Training reads a seeded sample of at most k x max_points_per_centroid rows (faiss would subsample to
that anyway), so memory does not grow with the collection; assignment streams every shard through the
centroid index. Hierarchical mode (--levels, after Meta's ssl-data-curation, without its resampling
steps): level 1 clusters the embeddings into k1 groups, level l clusters level l-1's centroids into k_l,
and an image's cluster is its level-1 centroid's cluster at the top level.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .errors import UsageError
from .shards import EmbeddingRun, iter_shards


@dataclass(frozen=True)
class KMeansOptions:
    k: tuple[int, ...]  # one per level, finest first (k1 >= k2 >= ...)
    spherical: bool = True  # cosine geometry: unit-length embeddings and centroids
    seed: int = 0
    nredo: int = 1  # restarts; faiss keeps the best objective
    niter: int = 25
    max_points_per_centroid: int = 256
    gpu: bool | None = None  # None: the GPU build's GPUs when there are any

    def __post_init__(self) -> None:
        if not self.k or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.k):
            raise UsageError(f"--k must be positive integers (one per level), got {self.k!r}")
        if list(self.k) != sorted(self.k, reverse=True):
            raise UsageError(f"--k {','.join(map(str, self.k))}: each level must have at most as many clusters "
                             "as the one below it (finest first, e.g. --k 1000,100)")
        for name in ("nredo", "niter", "max_points_per_centroid"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")

    def describe(self) -> str:
        geo = "spherical (cosine)" if self.spherical else "Euclidean"
        levels = f"{len(self.k)}-level hierarchical, k = {' -> '.join(map(str, self.k))}" if len(self.k) > 1 \
            else f"k = {self.k[0]}"
        return f"faiss k-means, {geo}, {levels}, {self.niter} iterations, {self.nredo} restart(s), seed {self.seed}"


def _faiss():
    import faiss

    return faiss


def _prep(x: np.ndarray, spherical: bool) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if spherical:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def training_sample(run: EmbeddingRun, n: int, seed: int) -> np.ndarray:
    """A seeded random sample of n embedding rows (all of them when n >= count), read shard by shard."""
    rows = np.arange(run.count) if n >= run.count else \
        np.sort(np.random.default_rng(seed).choice(run.count, size=n, replace=False))
    out = np.empty((len(rows), run.dim), dtype=np.float32)
    start = filled = 0
    for part in iter_shards(run, columns=("embedding",)):
        m = len(part["embedding"])
        sel = rows[(rows >= start) & (rows < start + m)] - start
        out[filled:filled + len(sel)] = part["embedding"][sel]
        filled += len(sel)
        start += m
    return out


def train_kmeans(x: np.ndarray, k: int, opts: KMeansOptions, seed_offset: int = 0):
    """A trained faiss.Kmeans on x (already prepared)."""
    faiss = _faiss()
    gpu = opts.gpu if opts.gpu is not None else faiss.get_num_gpus() > 0
    km = faiss.Kmeans(x.shape[1], k, niter=opts.niter, nredo=opts.nredo, seed=opts.seed + seed_offset,
                      spherical=opts.spherical, max_points_per_centroid=opts.max_points_per_centroid,
                      min_points_per_centroid=1, gpu=bool(gpu), verbose=False)
    km.train(x)
    return km


@dataclass
class Model:
    """The trained hierarchy: centroids per level and, for l >= 1, the level-l cluster of each level-(l-1)
    centroid."""

    centroids: list[np.ndarray]
    parents: list[np.ndarray]
    objective: float
    seconds: float

    @property
    def top(self) -> np.ndarray:
        return self.centroids[-1]

    def lift(self, level1: np.ndarray) -> list[np.ndarray]:
        """Level-1 cluster ids -> the ids at every level."""
        out = [level1]
        for p in self.parents:
            out.append(p[out[-1]])
        return out


def fit(run: EmbeddingRun, opts: KMeansOptions) -> Model:
    """Train every level; K above the number of images is refused by the caller."""
    t0 = time.perf_counter()
    x = _prep(training_sample(run, opts.k[0] * opts.max_points_per_centroid, opts.seed), opts.spherical)
    km = train_kmeans(x, opts.k[0], opts)
    objective = float(km.obj[-1]) if len(km.obj) else float("nan")
    centroids, parents = [np.asarray(km.centroids, dtype=np.float32)], []
    for level, k in enumerate(opts.k[1:], start=1):
        prev = _prep(centroids[-1], opts.spherical)
        kml = train_kmeans(prev, k, opts, seed_offset=level)
        _, ids = kml.index.search(prev, 1)
        centroids.append(np.asarray(kml.centroids, dtype=np.float32))
        parents.append(ids[:, 0].astype(np.int64))
    return Model(centroids, parents, objective, time.perf_counter() - t0)


def assign(run: EmbeddingRun, model: Model, spherical: bool) -> Iterator[dict]:
    """Per shard: {index, path, levels (list of cluster id arrays, finest first), cluster (top level),
    distance (squared L2 to the top-level centroid, on unit vectors when spherical)}."""
    faiss = _faiss()
    index = faiss.IndexFlatL2(model.centroids[0].shape[1])
    index.add(model.centroids[0])
    top = model.top
    for part in iter_shards(run):
        x = _prep(part["embedding"], spherical)
        _, ids = index.search(x, 1)
        levels = model.lift(ids[:, 0].astype(np.int64))
        cluster = levels[-1]
        dist = ((x - top[cluster]) ** 2).sum(axis=1).astype(np.float32)
        yield {"index": part["index"], "path": part["path"], "levels": levels, "cluster": cluster,
               "distance": dist}
