"""Validation of every export option before any work starts: types (a bool is not a number), ranges,
opsets per exporter, and an upper bound on the image size with the memory it would need.

Each check raises UsageError naming the flag (and the API argument it maps to) and what to do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UsageError

PATCH_SIZE = 14
MIN_IMG_SIZE = 14
MAX_IMG_SIZE = 1792  # 128 patches a side: 16k tokens, already ~17 GB of attention logits per ViT-L image
MAX_VALIDATE_BATCH = 256
# opsets each torch exporter really emits for DINOv2 that our pass and ONNX Runtime handle
# (TorchScript needs 14 for scaled_dot_product_attention; dynamo's own translation starts at 18;
# opset 23 makes dynamo emit one ONNX Attention op per block, which the pass decomposes)
OPSETS = {"torchscript": (14, 20), "dynamo": (18, 23)}
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
EXPORTERS = tuple(OPSETS)


def check_int(value: object, flag: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """An int (not a bool, not a float) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{flag} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise UsageError(f"{flag} must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"{flag} must be <= {hi}, got {value}")
    return value


def check_choice(value: object, flag: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise UsageError(f"{flag} {value!r} is not valid; choose one of {', '.join(choices)}")
    return value


def check_exporter_opset(exporter: str, opset: int | None) -> int:
    """The opset to export with; refuses opsets the exporter does not emit for DINOv2."""
    check_choice(exporter, "--exporter", EXPORTERS)
    if opset is None:
        return DEFAULT_OPSET[exporter]
    lo, hi = OPSETS[exporter]
    check_int(opset, "--opset", lo=1)
    if not lo <= opset <= hi:
        other = next(e for e in EXPORTERS if e != exporter)
        olo, ohi = OPSETS[other]
        hint = f" (--exporter {other} covers {olo}-{ohi})" if olo <= opset <= ohi else ""
        raise UsageError(f"--opset {opset}: the {exporter} exporter supports opsets {lo}-{hi} for DINOv2{hint}")
    return opset


def attention_bytes(img_size: int, heads: int, batch: int) -> int:
    """Bytes of one block's float32 attention logits and weights at this size (the peak term)."""
    tokens = (img_size // PATCH_SIZE) ** 2 + 5
    return 2 * batch * heads * tokens * tokens * 4


def available_memory() -> int | None:
    """Physical memory in bytes, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_img_size(img_size: object, *, heads: int, batch: int, flag: str = "--img-size") -> int:
    """A multiple of 14 within [14, MAX_IMG_SIZE] whose attention fits in this machine's memory."""
    size = check_int(img_size, flag, lo=MIN_IMG_SIZE)
    if size % PATCH_SIZE:
        lo, hi = size // PATCH_SIZE * PATCH_SIZE, math.ceil(size / PATCH_SIZE) * PATCH_SIZE
        raise UsageError(f"{flag} {size} is not a multiple of the patch size 14; use {max(lo, 14)} or {hi}")
    need = attention_bytes(size, heads, batch)
    if size > MAX_IMG_SIZE:
        raise UsageError(f"{flag} {size} is above the supported maximum {MAX_IMG_SIZE} (validating it would need "
                         f"~{need / 2**30:.0f} GiB for one block's attention); use a smaller size")
    mem = available_memory()
    if mem is not None and need > mem // 2:
        raise UsageError(f"{flag} {size} needs ~{need / 2**30:.1f} GiB for one block's attention at "
                         f"--validate-batch {batch}, more than half of this machine's {mem / 2**30:.0f} GiB; "
                         "use a smaller size or --validate-batch")
    return size


def check_file(path: object, flag: str) -> Path:
    """An existing regular file."""
    if not isinstance(path, str | os.PathLike):
        raise UsageError(f"{flag} must be a path, got {path!r}")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p} does not exist")
    if not p.is_file():
        raise UsageError(f"{flag} {p} is not a file")
    return p
