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


# ------------------------------------------------------------------------- tolerances per precision
# What `itae-validate` (itae_export.validation) requires of an artifact against the PyTorch reference,
# per kind of artifact. max_abs None: not checked (reported only); flag_agreement: the fraction of
# images whose flagged token set must equal the reference's (None: the artifact exposes no flags).
# Why these values: docs/validate.md.
ONNX_TOLERANCES: dict[str, dict[str, float | None]] = {
    # exact fp32 graphs: the figures the export itself enforces (pipeline.validate_graph)
    "fp32": {"max_abs": 1e-4, "cos_min": 0.99999, "flag_agreement": 1.0},
    # fp32 with fused attention (fastpath.FUSED_MIN_COSINE; measured max abs 1.9e-6 on ViT-L)
    "fused": {"max_abs": 1e-4, "cos_min": 0.99999, "flag_agreement": 1.0},
    # dynamic int8 before the final block (docs/performance.md: cosine min 0.99983-0.99996 measured on
    # ViT-S/L; the export's own target, fastpath.TARGET_COSINE = 0.99, is a usefulness floor, not parity)
    "int8": {"max_abs": None, "cos_min": 0.999, "flag_agreement": 0.9},
    # float16 graphs (foreign exports): the fp16 engine figure
    "fp16": {"max_abs": None, "cos_min": 0.999, "flag_agreement": 0.9},
}


# OpenVINO IRs (itae-export --out *.xml): the export's gates (openvino_target.GATES) on any images;
# max abs only for fp32 (OpenVINO's kernels: 1.8e-6 measured on the tiny models); bf16 keeps ITAE and
# the final block f32, so its flags agree with fp32 (identical on the planted test model)
OPENVINO_TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"max_abs": 1e-3, "cos_min": 0.99999, "flag_agreement": 1.0},
    "bf16": {"max_abs": None, "cos_min": 0.9999, "flag_agreement": 0.99},
    "int8": {"max_abs": None, "cos_min": 0.99, "flag_agreement": 0.9},
}


def tolerance_for(precision: str) -> dict[str, float | None]:
    """The tolerance of one precision: an ONNX kind (fp32, fused, int8, fp16), an engine precision
    ("engine-fp32", "engine-fp16", "engine-bf16": itae_export.engine.PARITY_TOLERANCES) or an OpenVINO
    IR's ("openvino-fp32", "openvino-bf16", "openvino-int8")."""
    if precision.startswith("openvino-"):
        return dict(OPENVINO_TOLERANCES[precision.removeprefix("openvino-")])
    if precision.startswith("engine-"):
        from .engine import PARITY_TOLERANCES  # engine imports this module: import late

        tol = PARITY_TOLERANCES[precision.removeprefix("engine-")]
        return {"max_abs": tol.get("max_abs"), "cos_min": tol["cos_min"], "flag_agreement": None}
    return dict(ONNX_TOLERANCES[precision])


def loosest(a: dict[str, float | None], b: dict[str, float | None]) -> dict[str, float | None]:
    """The looser of two tolerances, figure by figure (comparing two artifacts with each other)."""
    out: dict[str, float | None] = {}
    for key in ("max_abs", "cos_min", "flag_agreement"):
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            out[key] = None
        else:
            out[key] = max(x, y) if key == "max_abs" else min(x, y)
    return out
