"""Reading files that may be hostile: ONNX graphs (external-data locations), pickles, checkpoints,
images. Every refusal is an ItaeError naming the file and what to do."""

from __future__ import annotations

from pathlib import Path

from graph_passes.errors import UnsafeLocationError
from graph_passes.graph import check_external_data

from .errors import UsageError


def load_onnx_checked(path: str | Path, flag: str = "input"):
    """Load an ONNX graph without its external weights, with clear errors for bad files, and check
    that every external-data location stays inside the model's folder."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p} does not exist; give the path of an .onnx file")
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give the path of an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage
        raise UsageError(f"{flag} {p} is not an ONNX model ({type(e).__name__}); give an .onnx file") from e
    if not model.graph.node:
        raise UsageError(f"{flag} {p} is not an ONNX model (no graph nodes); give an .onnx file")
    try:
        check_external_data(model, p.parent)
    except UnsafeLocationError as e:
        raise UsageError(f"{flag} {p}: {e}") from e
    return model
