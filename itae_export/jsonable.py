"""One conversion of result values to JSON-able data (paths, numpy scalars, result objects);
numpy arrays are left out (reference batches never go into a sidecar or report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

_DROP = object()


def _convert(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return _DROP
    if isinstance(v, dict):
        out = {str(k): _convert(x) for k, x in v.items()}
        return {k: x for k, x in out.items() if x is not _DROP}
    if isinstance(v, list | tuple):
        return [x for x in (_convert(i) for i in v) if x is not _DROP]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, np.generic):
        return v.item()
    if hasattr(v, "to_dict"):
        return _convert(v.to_dict())
    if isinstance(v, str | int | float | bool) or v is None:
        return v
    return str(v)


def jsonable(v: Any) -> Any:
    """`v` with Paths as strings, numpy scalars as Python numbers, objects with to_dict() expanded,
    numpy arrays dropped, anything else as str()."""
    out = _convert(v)
    return None if out is _DROP else out
