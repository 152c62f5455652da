"""k-means clustering of embeddings and the clustering metrics the paper reports (ACC, NMI, ARI),
plus agreement between two backends' embeddings and assignments."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from .errors import UsageError

NORMALIZE = ("none", "l2")


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Clustering accuracy: the fraction of samples correctly labelled under the best one-to-one map from
    clusters to classes (Hungarian matching on the contingency table). With more clusters than classes
    (or fewer) the unmatched ones count as wrong."""
    from scipy.optimize import linear_sum_assignment

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(
            f"labels and assignments must be 1-D of equal length, got {y_true.shape} and {y_pred.shape}"
        )
    if y_true.size == 0:
        raise ValueError("no samples")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / y_true.size)


def clustering_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """ACC (Hungarian), NMI (sklearn, arithmetic-mean normalisation) and ARI (sklearn)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {
        "acc": cluster_accuracy(y_true, y_pred),
        "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
        "ari": float(adjusted_rand_score(y_true, y_pred)),
    }


@dataclass(frozen=True)
class KMeansSettings:
    n_clusters: int | None = None  # None -> number of classes
    seed: int = 0
    n_init: int = 10
    max_iter: int = 300
    normalize: str = "none"  # "l2": unit-length embeddings before k-means (cosine geometry)

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZE:
            raise UsageError(
                f"--normalize {self.normalize!r} is not valid; choose one of {', '.join(NORMALIZE)}"
            )
        if self.n_init < 1:
            raise UsageError(f"--n-init must be at least 1, got {self.n_init}")
        if self.n_clusters is not None and self.n_clusters < 2:
            raise UsageError(f"--n-clusters must be at least 2, got {self.n_clusters}")

    def to_dict(self) -> dict:
        return asdict(self)


def prepare(emb: np.ndarray, normalize: str) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float64)
    if normalize == "l2":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def kmeans(
    emb: np.ndarray, settings: KMeansSettings, n_classes: int | None = None
) -> tuple[np.ndarray, dict]:
    """sklearn KMeans (k-means++ init, Lloyd) -> (assignments, info with k, inertia, iterations, seconds)."""
    from sklearn.cluster import KMeans

    k = settings.n_clusters or n_classes
    if k is None:
        raise UsageError("--n-clusters is needed when the data set's number of classes is unknown")
    if k > len(emb):
        raise UsageError(
            f"--n-clusters {k} exceeds the number of images ({len(emb)}); lower it or drop --limit"
        )
    t0 = time.perf_counter()
    km = KMeans(n_clusters=k, n_init=settings.n_init, max_iter=settings.max_iter, random_state=settings.seed)
    assign = km.fit_predict(prepare(emb, settings.normalize))
    info = {
        "k": int(k),
        "inertia": float(km.inertia_),
        "n_iter": int(km.n_iter_),
        "seconds": time.perf_counter() - t0,
    }
    return assign.astype(np.int64), info


def backend_agreement(
    emb_ref: np.ndarray, emb_other: np.ndarray, assign_ref: np.ndarray, assign_other: np.ndarray
) -> dict:
    """How closely a backend reproduces the reference: embedding parity (itae_export.parity.compare:
    max/mean abs difference, min/mean cosine) and the ARI and exact-match rate of the two k-means runs'
    assignments (same seed and settings)."""
    from sklearn.metrics import adjusted_rand_score

    from .parity import compare

    parity = compare(np.asarray(emb_ref), np.asarray(emb_other))
    return {
        **parity.to_dict(),
        "assignment_ari": float(adjusted_rand_score(assign_ref, assign_other)),
        "assignment_acc": cluster_accuracy(assign_ref, assign_other),
    }
