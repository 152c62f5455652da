"""Calibrating ITAE's absolute threshold: the valley of the histogram of patch-token lengths.

Method (implemented here, no library peak finder): work on log-lengths, since artifact tokens are
several times longer than normal ones and a log axis gives both modes similar widths.
  1. Histogram the log-lengths into `bins` equal bins between their min and max (default sqrt(n),
     clipped to 20..200).
  2. Take log(1 + count) per bin: the artifact mode holds only a few percent of the tokens, and on a
     log count scale it stands out as a mode of its own instead of a bump in the main mode's tail.
  3. Smooth with a Gaussian kernel (sigma `smooth` bins).
  4. Find local maxima and each one's topographic prominence (height above the higher of the two
     lowest points separating it from a higher peak, or from the ends of the axis).
  5. Keep peaks whose prominence is at least `min_prominence` x the tallest peak's height; if fewer
     than two remain there is NO VALLEY (unimodal data: typically a small model without artifacts) and
     no threshold is returned.
  6. Otherwise take the two most prominent peaks; the threshold is exp(centre of the lowest smoothed
     bin between them); where that lowest value is a flat stretch (an empty gap between two
     well-separated modes), the middle bin of the stretch.
Otsu's threshold on the log-lengths is reported beside it for comparison, never used.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import DataError
from .viz import plural


@dataclass
class ValleyResult:
    found: bool
    threshold: float | None
    message: str
    method: str = "valley of smoothed log(1+count) histogram of log-lengths"
    bins: int = 0
    smooth: float = 0.0
    min_prominence: float = 0.0
    peaks: list[dict] = field(
        default_factory=list
    )  # {"length", "height", "prominence"}, most prominent first
    valley_height: float | None = None
    otsu_threshold: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _smooth(h: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return h.astype(np.float64)
    r = max(1, int(np.ceil(4 * sigma)))
    xs = np.arange(-r, r + 1)
    kernel = np.exp(-0.5 * (xs / sigma) ** 2)
    kernel /= kernel.sum()
    # Zero padding: there are no tokens beyond the observed range.
    return np.convolve(h.astype(np.float64), kernel, mode="same")


def _local_maxima(s: np.ndarray) -> list[int]:
    """Indices of local maxima; a flat top counts once (its middle)."""
    peaks = []
    n = len(s)
    i = 0
    while i < n:
        j = i
        while j + 1 < n and s[j + 1] == s[i]:
            j += 1
        left_ok = i == 0 or s[i - 1] < s[i]
        right_ok = j == n - 1 or s[j + 1] < s[i]
        if left_ok and right_ok and s[i] > 0:
            peaks.append((i + j) // 2)
        i = j + 1
    return peaks


def _prominence(s: np.ndarray, p: int) -> float:
    """Height of peak p above the higher of its two key cols (lowest point on each side before a
    strictly higher point, or the axis end)."""
    h = s[p]
    left_min = h
    for i in range(p - 1, -1, -1):
        if s[i] > h:
            break
        left_min = min(left_min, s[i])
    else:
        left_min = min(left_min, 0.0)  # reached the end: the curve falls to zero outside the range
    right_min = h
    for i in range(p + 1, len(s)):
        if s[i] > h:
            break
        right_min = min(right_min, s[i])
    else:
        right_min = min(right_min, 0.0)
    return float(h - max(left_min, right_min))


def otsu_threshold(x: np.ndarray, bins: int = 256) -> float:
    """Otsu's between-class-variance maximiser on a 1-D sample (returned in the sample's units)."""
    counts, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(counts * centres)
    mu0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mu1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def find_valley_threshold(
    lengths: np.ndarray, *, bins: int | None = None, smooth: float = 2.0, min_prominence: float = 0.1
) -> ValleyResult:
    """The threshold at the valley between the two most prominent modes of the log-length histogram,
    or found=False with a "no valley" message on unimodal data. See the module docstring."""
    x = np.asarray(lengths, dtype=np.float64).ravel()
    x = x[np.isfinite(x) & (x > 0)]
    if bins is None:
        # sqrt(n) bins, 20..200: few samples per bin make log(1+count) noisy and invent modes.
        bins = int(np.clip(np.sqrt(x.size), 20, 200))
    common = {"bins": bins, "smooth": smooth, "min_prominence": min_prominence}
    if x.size < 10:
        return ValleyResult(
            False,
            None,
            f"no valley: only {plural(x.size, 'positive length')} collected; calibrate on more images",
            **common,
        )
    logx = np.log(x)
    if np.ptp(logx) < 1e-9:
        return ValleyResult(False, None, f"no valley: every token has the same length {x[0]:.4g}", **common)
    counts, edges = np.histogram(logx, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    s = _smooth(np.log1p(counts), smooth)
    tallest = float(s.max())
    cand = [(p, _prominence(s, p)) for p in _local_maxima(s)]
    kept = sorted((c for c in cand if c[1] >= min_prominence * tallest), key=lambda c: -c[1])
    peaks = [{"length": float(np.exp(centres[p])), "height": float(s[p]), "prominence": pr} for p, pr in kept]
    otsu = float(np.exp(otsu_threshold(logx, bins)))
    if len(kept) < 2:
        where = f" (one mode, at length {peaks[0]['length']:.4g})" if peaks else ""
        return ValleyResult(
            False,
            None,
            f"no valley: the histogram of {plural(x.size, 'token length')} is unimodal{where}; this model/data shows no "
            "separate high-norm artifact mode. Keep the relative rule (--relative-threshold) or set --threshold by hand",
            peaks=peaks,
            otsu_threshold=otsu,
            **common,
        )
    a, b = sorted((kept[0][0], kept[1][0]))
    v = a + int(np.argmin(s[a : b + 1]))
    # A flat bottom (an empty stretch between well-separated modes): its middle, not its first bin.
    w = v
    while w + 1 <= b and abs(s[w + 1] - s[v]) <= 1e-12:
        w += 1
    v = (v + w) // 2
    thr = float(np.exp(centres[v]))
    lo, hi = peaks[0]["length"], peaks[1]["length"]
    return ValleyResult(
        True,
        thr,
        f"valley at length {thr:.4g} between modes at {min(lo, hi):.4g} and {max(lo, hi):.4g}",
        peaks=peaks,
        valley_height=float(s[v]),
        otsu_threshold=otsu,
        **common,
    )


def length_summary(lengths: np.ndarray, threshold: float | None, direction: str = "high") -> dict:
    x = np.asarray(lengths, dtype=np.float64).ravel()
    qs = [0, 1, 5, 25, 50, 75, 95, 99, 99.9, 100]
    pct = np.percentile(x, qs) if x.size else []
    out = {
        "num_tokens": int(x.size),
        "percentiles": {str(q): float(v) for q, v in zip(qs, pct, strict=False)},
        "mean": float(x.mean()) if x.size else None,
    }
    if threshold is not None and x.size:
        flagged = x > threshold if direction == "high" else x <= threshold
        out["fraction_flagged"] = float(flagged.mean())
    return out


def collect_patch_lengths(
    embedder, batches: Iterable[np.ndarray], cfg, *, progress: bool = False, total: int | None = None,
    desc: str = "lengths",
) -> tuple[np.ndarray, dict]:
    """The chosen norm source's lengths of the PATCH tokens (CLS and registers dropped) in the final block,
    over every image of `batches` (float32 [B,3,S,S], preprocessed; itae_export.reference.last_block_stats).
    Token scope gives one length per token, head scope one per (head, token); all go into one sample.
    progress: a tqdm bar (of `total` images) that counts the images whose lengths are collected.
    Returns (lengths, info); info["flags"] is what cfg flags on those images (flag_summary)."""
    import torch
    from tqdm import tqdm

    from .reference import last_block_stats

    chunks = []
    npt = grid = None
    n = 0
    flags = _FlagTotals()
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for x in batches:
            st = last_block_stats(embedder, torch.as_tensor(x), cfg)
            npt = int(st["num_prefix_tokens"])
            grid = [int(g) for g in st["grid"]]
            chunks.append(np.asarray(st["norms"])[..., npt:].reshape(-1))
            flags.add(st, npt)
            n += len(x)
            bar.update(len(x))
    lengths = np.concatenate(chunks) if chunks else np.zeros(0)
    return lengths, {
        "num_images": n,
        "num_prefix_tokens": npt,
        "grid": grid,
        "seconds": time.perf_counter() - t0,
        "flags": flags.summary(),
    }


class _FlagTotals:
    """Running totals of what ITAE flags in the final block (reference.last_block_stats batches)."""

    def __init__(self) -> None:
        self.images = 0
        self.per_position: np.ndarray | None = None  # images in which each patch position is flagged
        self.mass_before = self.mass_after = 0.0

    def add(self, st: dict, npt: int) -> None:
        flagged = np.asarray(st["flagged"], dtype=bool)
        f = flagged if flagged.ndim == 3 else flagged[:, None, :]  # [B, 1|H, T]
        tokens = f.any(axis=1)[:, npt:]  # a patch token flagged in any head counts once
        counts = tokens.sum(axis=0)
        self.per_position = counts if self.per_position is None else self.per_position + counts
        # CLS attention mass on the flagged tokens: summed over them, averaged over the heads
        self.mass_before += float((np.asarray(st["cls_attn_before"]) * f).sum(-1).mean(1).sum())
        self.mass_after += float((np.asarray(st["cls_attn_after"]) * f).sum(-1).mean(1).sum())
        self.images += len(flagged)

    def summary(self) -> dict:
        n = self.images
        total = int(self.per_position.sum()) if self.per_position is not None else 0
        return {
            "images": n,
            "flagged_tokens": total,
            "flagged_per_image": total / n if n else None,
            "flagged_per_position": [] if self.per_position is None else [int(c) for c in self.per_position],
            "cls_attention_on_flagged_before": self.mass_before / n if n else None,
            "cls_attention_on_flagged_after": self.mass_after / n if n else None,
        }


def calibrated_config(cfg, threshold: float):
    """cfg with the absolute threshold set (and the relative rule cleared: the two are exclusive)."""
    return replace(cfg, threshold=float(threshold), relative_threshold=None)


def settings_document(cfg, calibration: dict) -> dict:
    """The settings file that itae-export / itae-patch / itae-eval read with --settings FILE."""
    return {"itae": cfg.to_dict(), "calibration": calibration}


def settings_text(cfg, calibration: dict) -> str:
    """The settings file's text (JSON, sorted keys)."""
    return json.dumps(settings_document(cfg, calibration), indent=2, sort_keys=True) + "\n"


def write_settings(path: str | Path, cfg, calibration: dict, *, force: bool = True) -> Path:
    """Write the settings file through an output transaction (replacing an existing one unless
    force=False). Callers with their own transaction stage `settings_text(...)` themselves."""
    from .outputs import write_text_atomic

    return write_text_atomic(path, settings_text(cfg, calibration), force=force)


def check_lengths(lengths: np.ndarray, source: str) -> None:
    if lengths.size == 0:
        raise DataError(f"no patch-token lengths were collected from {source}; is the calibration set empty?")
