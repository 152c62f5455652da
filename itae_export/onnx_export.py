"""torch -> ONNX. Input `pixel_values` [B,3,H,W] float32 with a dynamic batch axis (and, for a
dynamic-size export, dynamic H and W named "height" and "width", checked in the graph by
graph_passes.size_check), output `embedding` [B,D]. The dynamo exporter is the default: it peaks at about a third of the
TorchScript exporter's memory on ViT-L (measured: docs/performance.md)."""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from graph_passes.errors import PassError
from graph_passes.graph import external_locations
from graph_passes.size_check import add_size_check

from .dynamic_size import SizeBounds
from .errors import ExportError, graph_error
from .outputs import OutputTransaction
from .settings import check_exporter_opset

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embedding"
# Above this many bytes of weights, write them to an external `.data` file: it keeps ViT-L's
# export peak under 2 GB, and ViT-g (4.5 GB) cannot be one protobuf at all (2 GiB limit).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def weight_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers()
    )


def data_file_name(onnx_path: str | Path) -> str:
    return Path(onnx_path).name + ".data"


@contextlib.contextmanager
def _quiet():
    """The exporters print pages of progress and warnings; keep the CLI's output readable."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        warnings.simplefilter("ignore")
        level = logging.getLogger("torch").level
        logging.getLogger("torch").setLevel(logging.ERROR)
        try:
            yield buf
        finally:
            logging.getLogger("torch").setLevel(level)


def _release_rewriter_matches() -> None:
    """onnxscript's module-level rewrite rules keep the last graph and node they matched, and through
    them every torch weight of the exported model; reset them so the weights can be freed before ONNX
    Runtime loads its own copy (otherwise the validation peak holds ViT-L twice: 3.6 GB).
    Best effort: a private onnxscript API, skipped when it is not there."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    for obj in gc.get_objects():
        if isinstance(obj, SimplePatternMatcher):
            # each is set afresh when a match starts (SimplePatternMatcher.match/_init_match)
            for attr in ("_current_node", "_graph", "_tracer", "_match"):
                if hasattr(obj, attr):
                    setattr(obj, attr, None)
    gc.collect()


def export_onnx(
    model: nn.Module,
    out_path: str | Path,
    *,
    img_size: int,
    exporter: str = "dynamo",
    opset: int | None = None,
    external_data: bool | None = None,
    dynamic_size: SizeBounds | None = None,
) -> Path:
    """Export `model` (forward(pixel_values) -> [B, D]) to `out_path`, through an output transaction
    (staged beside it, committed with its `.data` file only when the export succeeded; an existing
    `out_path` is replaced). external_data=None decides by weight size (EXTERNAL_DATA_THRESHOLD).
    dynamic_size: H and W become dynamic within these bounds; the model must be a DinoV2Embedder,
    traced with its position embedding computed in the graph (pos_mode "graph").
    """
    check_exporter_opset(exporter, opset)
    out = Path(out_path)
    if external_data is None:
        external_data = weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    with OutputTransaction(out, force=True) as txn:
        work = txn.staging / "export"
        work.mkdir()
        tmp = work / out.name
        with _pos_mode(model, "graph" if dynamic_size is not None else None):
            _run_exporter(model.eval(), tmp, img_size=img_size, exporter=exporter, opset=opset,
                          external_data=external_data, dynamic_size=dynamic_size)
        _normalise_external_data(tmp, external_data)
        if dynamic_size is not None:
            _finish_dynamic(tmp, dynamic_size)
        for f in work.iterdir():
            os.replace(f, txn.staging / f.name)
        txn.add(txn.stage_path(out), out)
        txn.commit()
    return out


@contextlib.contextmanager
def _pos_mode(model: nn.Module, mode: str | None):
    """Trace a DinoV2Embedder with the given position-embedding mode; restored afterwards."""
    if mode is None:
        yield
        return
    if not hasattr(model, "pos_mode"):
        raise ExportError(f"a dynamic-size export needs a DINOv2 embedder, not {type(model).__name__}")
    before = model.pos_mode
    model.pos_mode = mode
    try:
        yield
    finally:
        model.pos_mode = before


def _dynamic_axes(dynamic_size: SizeBounds | None) -> tuple[dict, dict]:
    """(dynamo dynamic_shapes entry, TorchScript dynamic_axes entry) of the input."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    if dynamic_size is None:
        return {0: batch}, {0: "batch"}
    p = dynamic_size.multiple
    h = torch.export.Dim("height", min=dynamic_size.min_size // p, max=dynamic_size.max_size // p)
    w = torch.export.Dim("width", min=dynamic_size.min_size // p, max=dynamic_size.max_size // p)
    return {0: batch, 2: p * h, 3: p * w}, {0: "batch", 2: "height", 3: "width"}


def _run_exporter(model: nn.Module, tmp: Path, *, img_size: int, exporter: str, opset: int | None,
                  external_data: bool, dynamic_size: SizeBounds | None = None) -> None:
    dummy = torch.zeros(2, 3, img_size, img_size)
    dyn_shapes, dyn_axes = _dynamic_axes(dynamic_size)
    with torch.no_grad(), _quiet() as log:
        try:
            if exporter == "dynamo":
                prog = torch.onnx.export(
                    model, (dummy,), dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_shapes={"pixel_values": dyn_shapes}, opset_version=opset or 18, optimize=True,
                    verbose=False)
                prog.save(str(tmp), external_data=external_data)
                del prog
                _release_rewriter_matches()
            else:
                torch.onnx.export(
                    model, (dummy,), str(tmp), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: dyn_axes, OUTPUT_NAME: {0: "batch"}}, opset_version=opset or 17,
                    do_constant_folding=True)
        except OSError:
            raise  # disk full, read-only...: the output transaction names the path (exit 5)
        except Exception as e:  # noqa: BLE001 - exporter failures are many types
            tail = log.getvalue().strip().splitlines()[-5:]
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise ExportError(
                f"{exporter} export of {type(model).__name__} failed: {type(e).__name__}: {e}"
                + (f" (exporter log: {' | '.join(tail)})" if tail else "") + f"; try --exporter {other}"
            ) from e


def _finish_dynamic(path: Path, bounds: SizeBounds) -> None:
    """Name the input's dims batch/height/width (dynamo writes "14*height") and add the in-graph
    size check; only the graph is rewritten, the weights stay where they are."""
    m = onnx.load(str(path), load_external_data=False)
    dims = [i for i in m.graph.input if i.name == INPUT_NAME][0].type.tensor_type.shape.dim
    for d, name in zip(dims, ("batch", None, "height", "width"), strict=True):
        if name is not None and not d.HasField("dim_value"):
            d.dim_param = name
    try:
        m, _ = add_size_check(m, lo=bounds.min_size, hi=bounds.max_size, multiple=bounds.multiple)
    except PassError as e:
        raise graph_error(e) from e
    onnx.save_model(m, str(path))


def _normalise_external_data(path: Path, external: bool) -> None:
    """One `<name>.data` file for all weights (TorchScript writes one file per tensor), or none."""
    files = [f for f in path.parent.iterdir() if f != path]
    want = data_file_name(path)
    if not external:
        if files:
            m = onnx.load(str(path), load_external_data=True)
            onnx.save_model(m, str(path))
            for f in files:
                f.unlink()
        return
    if [f.name for f in files] == [want]:
        return
    m = onnx.load(str(path), load_external_data=True)
    for f in files:
        f.unlink()
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=want, size_threshold=1024)


def onnx_files(onnx_path: str | Path) -> list[Path]:
    """The ONNX file and the external data files it references."""
    p = Path(onnx_path)
    m = onnx.load(str(p), load_external_data=False)
    return [p] + [p.parent / loc for loc in external_locations(m)]
