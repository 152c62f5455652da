"""Parity figures between a reference output and another backend's output (polygraphy-style:
absolute error and per-row cosine similarity)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Parity:
    max_abs: float
    mean_abs: float
    cos_min: float
    cos_mean: float
    rows: int

    def ok(self, max_abs_tol: float = 1e-4, cos_tol: float = 0.99999) -> bool:
        return self.max_abs <= max_abs_tol and self.cos_min >= cos_tol

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"max abs diff {self.max_abs:.3g}, mean abs diff {self.mean_abs:.3g}, "
            f"cosine min {self.cos_min:.7f} / mean {self.cos_mean:.7f} over {self.rows} rows"
        )


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64 = a.reshape(a.shape[0], -1).astype(np.float64)
    b64 = b.reshape(b.shape[0], -1).astype(np.float64)
    num = (a64 * b64).sum(axis=1)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return num / np.maximum(den, 1e-30)


def compare(reference: np.ndarray, other: np.ndarray) -> Parity:
    if reference.shape != other.shape:
        raise ValueError(f"shape mismatch: reference {reference.shape} vs other {other.shape}")
    if not np.all(np.isfinite(other)):
        return Parity(float("inf"), float("inf"), -1.0, -1.0, int(reference.shape[0]))
    diff = np.abs(reference.astype(np.float64) - other.astype(np.float64))
    cos = cosine_rows(reference, other)
    return Parity(float(diff.max()), float(diff.mean()), float(cos.min()), float(cos.mean()), int(reference.shape[0]))
