"""The official DINOv2 position-embedding interpolation written as two small matrix products, so that
a dynamic-size graph computes it from the input's height and width at run time.

The official code (facebookresearch/dinov2, `interpolate_pos_encoding`) resamples the 37x37 source
grid with `F.interpolate(mode="bicubic")`:

- plain models: by scale factor ((g + 0.1) / 37), antialias off. The output has g entries, but the
  sampling positions use the scale factor, not 37 / g: the 0.1 offset shifts every sample a little;
- `_reg` models: by size (g), antialias on (torch's antialiased bicubic is PIL's filter: a = -0.5,
  a support widened by the downscale factor, weights renormalised over the taps inside the grid);
- both return the source grid unchanged when the grid is 37x37 (no interpolation at all).

Bicubic resampling is separable, so the result is `Wh @ P @ Ww^T` per channel, with `Wh` [gh, 37]
and `Ww` [gw, 37] holding the filter taps. This module builds those matrices from torch ops only
(arange, floor, clamp, comparisons, where), so both exporters turn them into Range/Floor/Equal/
Where/MatMul nodes that follow the input size: no ONNX `Resize` (docs/dynamic-size.md says why:
TensorRT's Resize has no antialias, which the `_reg` rule needs). `interpolate_official` is the
eager reference: the official call itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ModelError

CUBIC_A = -0.75  # torch / ONNX Resize bicubic coefficient
CUBIC_A_ANTIALIAS = -0.5  # torch's antialiased bicubic (PIL's filter)
PLAIN_OFFSET = 0.1  # the official interpolate_offset of the plain models


def source_side(patch_pos: torch.Tensor) -> int:
    n = patch_pos.shape[1]
    m = math.isqrt(n)
    if m * m != n:
        raise ModelError(f"position embedding has {n} patch entries, not a square grid")
    return m


def interpolate_official(patch_pos: torch.Tensor, grid: tuple[int, int], *, registers: bool) -> torch.Tensor:
    """The official interpolation of patch positions [1, M*M, D] -> [1, gh*gw, D] (eager F.interpolate)."""
    dim, m = patch_pos.shape[2], source_side(patch_pos)
    gh, gw = grid
    if (gh, gw) == (m, m):
        return patch_pos.clone()
    src = patch_pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if registers:
        out = F.interpolate(src, size=(gh, gw), mode="bicubic", antialias=True)
    else:
        out = F.interpolate(src, scale_factor=((gh + PLAIN_OFFSET) / m, (gw + PLAIN_OFFSET) / m),
                            mode="bicubic", antialias=False)
    if tuple(out.shape[-2:]) != (gh, gw):
        raise ModelError(f"position embedding interpolation gave {tuple(out.shape[-2:])}, expected {(gh, gw)}")
    return out.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(patch_pos.dtype)


def _cubic(x: torch.Tensor, a: float) -> torch.Tensor:
    """Keys' cubic convolution kernel W(x), zero for |x| >= 2 (torch's cubic_convolution1/2)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _one_hot(index: torch.Tensor, m: int) -> torch.Tensor:
    """index [..., K] int64 -> [..., K, m] float32 (Equal + Cast: every runtime has both)."""
    return (index.unsqueeze(-1) == torch.arange(m, dtype=index.dtype)).to(torch.float32)


def _sides(n_out) -> tuple[torch.Tensor, torch.Tensor]:
    """(i = 0..n_out-1, n_out) as float32 tensors. n_out is an int, a symbolic int (torch.export) or
    an int64 scalar tensor (tracing): all three give a Range whose length follows the input, and the
    count is read back from it so that no Python arithmetic on the size is baked into the graph."""
    i = torch.arange(n_out, dtype=torch.float32)
    return i, (i[-1:] + 1).reshape(())


def scale_weights(i: torch.Tensor, m: int, inv_scale: torch.Tensor) -> torch.Tensor:
    """[n_out, m] taps of torch's non-antialiased bicubic with sampling step `inv_scale` (the
    reciprocal of the scale factor): source x = inv_scale * (i + 0.5) - 0.5, 4 taps around floor(x),
    indices clamped to the grid (torch's upsample_bicubic2d with align_corners=False).
    i: the output indices 0..n_out-1 (float32)."""
    real = inv_scale * (i + 0.5) - 0.5
    base = torch.floor(real)
    t = (real - base).unsqueeze(-1)  # [n, 1]
    offsets = torch.arange(-1, 3, dtype=torch.float32)  # taps at base-1 .. base+2
    coeffs = _cubic(t - offsets, CUBIC_A)  # [n, 4]: W(t+1), W(t), W(1-t), W(2-t)
    taps = (base.unsqueeze(-1) + offsets).clamp(0, m - 1).to(torch.int64)
    return (coeffs.unsqueeze(-1) * _one_hot(taps, m)).sum(dim=1)


def antialias_weights(i: torch.Tensor, n: torch.Tensor, m: int) -> torch.Tensor:
    """[n_out, m] taps of torch's antialiased bicubic by size (PIL's filter, a = -0.5): support
    2 * max(scale, 1) source pixels around center = scale * (i + 0.5), scale = m / n_out, the
    filter stretched by the downscale factor, taps outside [xmin, xmax) dropped and each row
    renormalised (aten's _compute_index_ranges_weights). i: 0..n_out-1, n: n_out (float32)."""
    scale = m / n
    wide = scale >= 1.0
    support = torch.where(wide, 2.0 * scale, torch.full_like(scale, 2.0))
    inv = torch.where(wide, 1.0 / scale, torch.ones_like(scale))
    center = scale * (i + 0.5)
    xmin = torch.clamp(torch.floor(center - support + 0.5), min=0.0).unsqueeze(-1)
    xmax = torch.clamp(torch.floor(center + support + 0.5), max=float(m)).unsqueeze(-1)
    j = torch.arange(m, dtype=torch.float32)
    w = _cubic((j - center.unsqueeze(-1) + 0.5) * inv, CUBIC_A_ANTIALIAS)
    w = torch.where((j >= xmin) & (j < xmax), w, torch.zeros_like(w))
    return w / w.sum(dim=-1, keepdim=True)


def interpolate_in_graph(patch_pos: torch.Tensor, gh, gw, *, registers: bool) -> torch.Tensor:
    """The official interpolation as Wh @ P @ Ww^T, with the grid sides gh, gw taken from the input
    shape (ints, symbolic ints or int64 scalar tensors): [1, M*M, D] -> [1, gh*gw, D]."""
    dim, m = patch_pos.shape[2], source_side(patch_pos)
    src = patch_pos.float().reshape(m, m, dim)
    (ih, nh), (iw, nw) = _sides(gh), _sides(gw)
    if registers:
        wh, ww = antialias_weights(ih, nh, m), antialias_weights(iw, nw, m)
    else:
        # the official code skips interpolation for a 37x37 grid: a sampling step of exactly 1
        # makes the taps the identity (W(0) = 1, W(+-1) = W(2) = 0)
        full = (nh == m) & (nw == m)
        one = torch.ones((), dtype=torch.float32)
        wh = scale_weights(ih, m, torch.where(full, one, m / (nh + PLAIN_OFFSET)))
        ww = scale_weights(iw, m, torch.where(full, one, m / (nw + PLAIN_OFFSET)))
    rows = (wh @ src.reshape(m, m * dim)).reshape(-1, m, dim)  # [gh, M, D]
    out = ww.unsqueeze(0) @ rows  # [gh, gw, D]
    return out.reshape(1, -1, dim).to(patch_pos.dtype)
