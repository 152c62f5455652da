"""Clustering metrics against hand-computed cases, and k-means settings."""

from __future__ import annotations

import math

import numpy as np
import pytest

from itae_export.cluster import KMeansSettings, cluster_accuracy, clustering_metrics, kmeans
from itae_export.errors import UsageError


def test_permuted_labels_score_perfectly() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    perm = np.array([2, 0, 1])[y] + 10  # renamed clusters, ids need not start at 0
    m = clustering_metrics(y, perm)
    assert m == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_accuracy_of_a_known_confusion_matrix() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    y_pred = np.array([1, 1, 0, 0, 0, 0, 2, 2, 2])
    # Contingency (pred x true): p0 = (1, 3, 0), p1 = (2, 0, 0), p2 = (0, 0, 3). Best map p1->0, p0->1,
    # p2->2 gets 2 + 3 + 3 = 8 of 9; the identity map would get only 1 + 0 + 3.
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(8 / 9)


def test_accuracy_with_more_clusters_than_classes() -> None:
    # Each class split in two: only one half of each can be matched.
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([0, 1, 2, 3])) == pytest.approx(0.5)
    # Fewer clusters than classes: the unmatched class counts as wrong.
    assert cluster_accuracy(np.array([0, 1, 2, 2]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        cluster_accuracy(np.array([0, 1]), np.array([0]))


def test_nmi_and_ari_against_hand_computed_values() -> None:
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
    # ARI: sum C(n_ij,2) = 1; rows C(2,2)+C(2,2) = 2; cols C(2,2) = 1; C(4,2) = 6; expected 2*1/6;
    # max (2+1)/2. ARI = (1 - 1/3) / (3/2 - 1/3) = 4/7.
    # NMI (arithmetic): H(T) = ln 2, H(P) = 1.5 ln 2, H(T,P) = 1.5 ln 2, MI = ln 2; NMI = ln2 / (1.25 ln2).
    m = clustering_metrics(y_true, y_pred)
    assert m["ari"] == pytest.approx(4 / 7)
    assert m["nmi"] == pytest.approx(0.8)
    assert m["acc"] == pytest.approx(0.75)

    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 0, 0, 1])
    h_t = math.log(2)
    h_p = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h_tp = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    mi = h_t + h_p - h_tp
    assert clustering_metrics(y_true, y_pred)["nmi"] == pytest.approx(mi / ((h_t + h_p) / 2))
    # Crossed labellings, worse than chance: no pair agrees; ARI = (0 - 2/3) / (2 - 2/3) = -1/2.
    assert clustering_metrics(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))["ari"] == pytest.approx(-0.5)


def test_kmeans_recovers_separated_blobs_reproducibly() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 10
    labels = np.repeat(np.arange(4), 30)
    emb = centres[labels] + rng.normal(size=(120, 16))
    s = KMeansSettings(seed=3, n_init=2)
    a1, info = kmeans(emb, s, n_classes=4)
    a2, _ = kmeans(emb, s, n_classes=4)
    np.testing.assert_array_equal(a1, a2)
    assert info["k"] == 4 and info["seconds"] >= 0
    assert clustering_metrics(labels, a1)["acc"] == 1.0
    a3, info3 = kmeans(emb, KMeansSettings(n_clusters=6, n_init=1, normalize="l2"), n_classes=4)
    assert info3["k"] == 6 and len(set(a3.tolist())) == 6


def test_kmeans_settings_are_checked() -> None:
    with pytest.raises(UsageError, match="--n-clusters 50 exceeds"):
        kmeans(np.zeros((10, 3)), KMeansSettings(n_clusters=50))
    with pytest.raises(UsageError, match="--normalize"):
        KMeansSettings(normalize="zscore")
    with pytest.raises(UsageError, match="--n-init"):
        KMeansSettings(n_init=0)


def test_backend_agreement_of_near_identical_runs() -> None:
    pytest.importorskip("itae_export.parity")
    from itae_export.cluster import backend_agreement

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(50, 8)).astype(np.float32)
    other = emb + 1e-6 * rng.normal(size=emb.shape).astype(np.float32)
    a = rng.integers(0, 3, size=50)
    b = np.array([2, 0, 1])[a]  # same partition, renamed
    ag = backend_agreement(emb, other, a, b)
    assert ag["assignment_ari"] == pytest.approx(1.0) and ag["assignment_acc"] == 1.0
    assert ag["cos_mean"] > 0.99999 and ag["max_abs"] < 1e-4
    b[:5] = (b[:5] + 1) % 3
    assert backend_agreement(emb, other, a, b)["assignment_ari"] < 1.0
