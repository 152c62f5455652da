"""Weight-streaming dynamic int8 quantization of MatMul weights, pure onnx + numpy.

Emits the op pattern of onnxruntime.quantization.quantize_dynamic (IntegerOps mode, opset >= 11)
for a MatMul whose second input is a 2-D float32 initializer W [K, N]:

    DynamicQuantizeLinear(A) -> (A_q uint8, A_scale, A_zp)      one per activation tensor, shared
    MatMulInteger(A_q, W_q, A_zp, W_zp) -> Cast(to=FLOAT) -> Mul(., Mul(A_scale, W_scale)) -> Y

with the same tensor/node names, so ORT's graph optimizer fuses it the same way
(MatMulIntegerToFloat / DynamicQuantizeMatMul). Weights use ORT's formula (quant_utils.quantize_data
with reduce_range=False, quantize_dynamic's default):

- "qint8" (symmetric): m = max(|min(W, 0)|, |max(W, 0)|) per output column (per_channel) or over W;
  scale = float32((2m in float64) / 254), zero point 0; scale 1.0 when it would be below float32 tiny.
- "quint8" (asymmetric): scale = float32((max(W,0) - min(W,0) in float64) / 255),
  zero point = round(-min(W,0) / scale64) as uint8.
- q = clip(round_half_even(W / scale in float32) + zp, type range).

The result is bit-identical to ORT's weights, scales and zero points (tests/test_int8.py).

Unlike quantize_dynamic, which loads every weight (plus shape inference copies) into memory, the
graph is loaded without its external data and each weight is read from the `.data` file, quantized
and appended to the output `.data` file one at a time; other external tensors are copied in chunks.
Peak memory is about the graph plus the largest weight.

Differences from quantize_dynamic (deliberate): only MatMul (ORT's IntegerOps registry also has
Conv/Attention/LSTM; Gemm is not quantized by either); weights of rank != 2 are skipped (ORT would
quantize them per last axis); unused initializers other than the replaced weights are kept; the
opset is not upgraded (opset < 11 is refused); producer_name and metadata are left as they were.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import Int8Error  # noqa: F401 - re-exported
from .graph import all_tensors, check_external_data, resolve_external_location

__all__ = ["Int8Error", "Int8Result", "quantize_dynamic_int8", "quantize_weight"]

_QUANT_SUFFIX = "_quantized"  # ORT's TENSOR_NAME_QUANT_SUFFIX
_EXTERNAL_MIN_BYTES = 1024  # tensors at least this big go to the .data file (onnx/ORT default threshold)
_ALIGN_MIN_BYTES = 1 << 20  # big tensors start on a page boundary, as onnx.save does (mmap-friendly)
_ALIGN = 4096
_COPY_CHUNK = 16 << 20
_ROW_CHUNK_ELEMS = 4 << 20  # rows quantized at a time: bounds the float32 temporaries


@dataclass
class Int8Result:
    output: Path
    quantized: list[str] = field(default_factory=list)  # names of the MatMul nodes replaced
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (MatMul node name, reason)
    quantized_weights: list[str] = field(default_factory=list)
    external_data: bool = False
    bytes_in: int = 0  # .onnx + its external data files
    bytes_out: int = 0


# ------------------------------------------------------------------------------------ weights
def _scale_zero_point(rmin: np.ndarray, rmax: np.ndarray, weight_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point for float32 minima/maxima, as ORT's compute_scale_zp."""
    rmin = np.minimum(rmin, np.float32(0))
    rmax = np.maximum(rmax, np.float32(0))
    tiny = np.finfo(np.float32).tiny
    if weight_type == "qint8":
        absmax = np.maximum(np.abs(rmin), np.abs(rmax))
        scale64 = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / 254.0  # qmax - qmin = 127 - -127
        small = scale64 < tiny
        zp = np.zeros(scale64.shape, np.int8)
    else:
        scale64 = (rmax.astype(np.float64) - rmin.astype(np.float64)) / 255.0
        small = scale64 < tiny
        with np.errstate(divide="ignore", invalid="ignore"):
            zp64 = np.round(0.0 - rmin.astype(np.float64) / np.where(small, 1.0, scale64))
        zp = np.where(small, 0.0, zp64).astype(np.uint8)
    scale = np.where(small, 1.0, scale64).astype(np.float32)
    return scale, zp


def quantize_weight(w: np.ndarray, *, per_channel: bool = True,
                    weight_type: str = "qint8") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, scale, zero_point) of a 2-D float32 weight [K, N], as ORT's quantize_dynamic computes them:
    per output column (scale/zp shape [N]) when per_channel, else per tensor (shape [])."""
    _check_weight_type(weight_type)
    if w.ndim != 2 or w.dtype != np.float32:
        raise Int8Error(f"expected a 2-D float32 weight, got {w.dtype} {list(w.shape)}")
    if per_channel:
        rmin, rmax = w.min(axis=0), w.max(axis=0)
    else:
        rmin, rmax = np.asarray(w.min(), np.float32), np.asarray(w.max(), np.float32)
    scale, zp = _scale_zero_point(rmin, rmax, weight_type)
    qtype, lo, hi = (np.int8, -128, 127) if weight_type == "qint8" else (np.uint8, 0, 255)
    q = np.empty(w.shape, qtype)
    zpf = zp.astype(np.float32)
    rows = max(1, _ROW_CHUNK_ELEMS // max(1, w.shape[1]))
    for r in range(0, w.shape[0], rows):
        # float32 division then round-half-even, as quantize_nparray
        part = np.round(w[r:r + rows] / scale) + zpf
        np.clip(part, lo, hi, out=part)
        q[r:r + rows] = part.astype(qtype)
    return q, scale, zp


def _check_weight_type(weight_type: str) -> None:
    if weight_type not in ("qint8", "quint8"):
        raise Int8Error(f"weight_type {weight_type!r}: choose 'qint8' (signed, symmetric) or 'quint8'")


# ------------------------------------------------------------------------------- external data
def _ext_info(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def _nbytes(t: TensorProto) -> int:
    n = int(np.prod(list(t.dims), dtype=np.int64)) if len(t.dims) else 1
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def _ext_span(t: TensorProto, base: Path) -> tuple[Path, int, int]:
    info = _ext_info(t)
    if "location" not in info:
        raise Int8Error(f"tensor {t.name!r} is marked external but names no location")
    path = resolve_external_location(base, info["location"])  # refuses absolute, '..', symlinks out
    offset = int(info.get("offset", 0))
    length = int(info["length"]) if "length" in info else _nbytes(t)
    return path, offset, length


def _read_external_array(t: TensorProto, base: Path) -> np.ndarray:
    path, offset, length = _ext_span(t, base)
    shape = tuple(t.dims)
    need = _nbytes(t)
    if length != need:
        raise Int8Error(f"external tensor {t.name!r} in {path}: length {length} does not match its shape "
                        f"{list(shape)} ({need} bytes)")
    out = np.empty(shape, np.float32)
    with open(path, "rb") as f:
        f.seek(offset)
        got = f.readinto(memoryview(out.reshape(-1)).cast("B"))
    if got != need:
        raise Int8Error(f"{path} is truncated: tensor {t.name!r} needs {need} bytes at offset {offset}, read {got}")
    return out


def _used_names(graph: onnx.GraphProto) -> set[str]:
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for a in node.attribute:
            for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                used |= _used_names(g)
    return used


class _DataWriter:
    """Appends tensors to one external data file and points the TensorProtos at it."""

    def __init__(self, path: Path, location: str):
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.location = location
        self.offset = 0

    def _place(self, t: TensorProto, length: int) -> None:
        if length >= _ALIGN_MIN_BYTES and self.offset % _ALIGN:
            pad = _ALIGN - self.offset % _ALIGN
            self.f.write(b"\0" * pad)
            self.offset += pad
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        t.ClearField("raw_data")
        for k, v in (("location", self.location), ("offset", str(self.offset)), ("length", str(length))):
            e = t.external_data.add()
            e.key, e.value = k, v

    def write_array(self, t: TensorProto, arr: np.ndarray) -> None:
        data = np.ascontiguousarray(arr)
        self._place(t, data.nbytes)
        self.f.write(memoryview(data.reshape(-1)).cast("B"))
        self.offset += data.nbytes

    def copy_span(self, t: TensorProto, src: Path, offset: int, length: int) -> None:
        self._place(t, length)
        with open(src, "rb") as f:
            f.seek(offset)
            left = length
            while left:
                chunk = f.read(min(left, _COPY_CHUNK))
                if not chunk:
                    raise Int8Error(f"{src} is truncated: tensor {t.name!r} needs {length} bytes at {offset}")
                self.f.write(chunk)
                left -= len(chunk)
        self.offset += length

    def close(self) -> None:
        self.f.close()


# ---------------------------------------------------------------------------------- the pass
def quantize_dynamic_int8(onnx_in: str | Path, onnx_out: str | Path, *, exclude: set[str],
                          per_channel: bool = True, weight_type: str = "qint8") -> Int8Result:
    """Quantize the MatMul weights of `onnx_in` (except nodes named in `exclude`) to int8 and write
    `onnx_out` (the caller stages: written in place, removed again on failure); the input is never modified.
    The output keeps its weights in `<onnx_out name>.data` when the input had external data, else inline.
    Raises Int8Error (a ValueError) for unusable paths/models, UnsafeLocationError for an external-data
    location outside the model's folder, FileNotFoundError for a missing input.

    Steps: check the paths and the model -> rewrite the MatMul nodes (match each, check its weight,
    emit the integer pattern) -> swap the weights for placeholders -> stream the weights and save."""
    _check_weight_type(weight_type)
    src, out = Path(onnx_in), Path(onnx_out)
    model, in_files = _load_checked(src, out)
    external = len(in_files) > 1
    result = Int8Result(output=out, external_data=external)
    wq = _rewrite_matmuls(model.graph, exclude, result)
    pending = _swap_weights(model.graph, wq)
    out_data = out.parent / (out.name + ".data")
    _stream_and_save(model, pending, wq, src.parent, out, external, per_channel, weight_type)
    result.bytes_in = sum(f.stat().st_size for f in in_files)
    result.bytes_out = sum(f.stat().st_size for f in ([out, out_data] if external else [out]))
    return result


def _load_checked(src: Path, out: Path) -> tuple[onnx.ModelProto, list[Path]]:
    """The graph (no weights) and its files [src, external data...], after every path check."""
    if not src.is_file():
        raise FileNotFoundError(f"ONNX model {src} not found; pass an existing .onnx file")
    if src.resolve() == out.resolve():
        raise Int8Error(f"output {out} is the input model; choose another output path")
    model = onnx.load(str(src), load_external_data=False)
    in_files = [src] + check_external_data(model, src.parent, model_file=src)
    external = len(in_files) > 1
    out_data = out.parent / (out.name + ".data")
    for f in in_files:
        if f.resolve() == out.resolve() or (external and f.resolve() == out_data.resolve()):
            raise Int8Error(f"writing {out} would overwrite {f}, which the input model {src} uses; "
                            "choose another output path")
        if not f.is_file():
            raise FileNotFoundError(f"external data file {f} of {src} is missing")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 11:
        raise Int8Error(f"{src} uses opset {opset}; DynamicQuantizeLinear needs opset 11 or later "
                        "(convert the model with onnx.version_converter first)")
    return model, in_files


def _skip_reason(node: onnx.NodeProto, inits: dict[str, TensorProto], exclude: set[str]) -> str | None:
    """Why this MatMul keeps its float weight (None: quantize it)."""
    w = inits.get(node.input[1])
    if node.name in exclude:
        return "excluded"
    if w is None:
        return "weight is not an initializer"
    if w.data_type != TensorProto.FLOAT:
        return f"weight is {TensorProto.DataType.Name(w.data_type)}, not FLOAT"
    if len(w.dims) != 2:
        return f"weight is {len(w.dims)}-D, not 2-D"
    if node.input[0] in inits:
        return "activation input is an initializer"
    return None


def _integer_matmul(node: onnx.NodeProto, a: tuple[str, str, str], w: tuple[str, str, str]) -> list[onnx.NodeProto]:
    """MatMulInteger -> Cast -> Mul(scales) for one MatMul, with ORT's node/tensor names."""
    a_q, a_scale, a_zp = a
    w_q, w_scale, w_zp = w
    y = node.output[0]
    mi_name = node.name + "_quant" if node.name else ""
    mi_out = y + "_output_quantized"
    cast_out = mi_out + "_cast_output"
    scales_name = mi_name + "_scales_mul" if mi_name else a_scale + "_" + w_scale + "_mul"
    return [
        helper.make_node("MatMulInteger", [a_q, w_q, a_zp, w_zp], [mi_out], mi_name),
        helper.make_node("Cast", [mi_out], [cast_out], mi_out + "_cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", [a_scale, w_scale], [scales_name + ":0"], scales_name),
        helper.make_node("Mul", [cast_out, scales_name + ":0"], [y], mi_name + "_output_scale_mul" if mi_name else ""),
    ]


def _rewrite_matmuls(graph: onnx.GraphProto, exclude: set[str], result: Int8Result) -> dict[str, tuple[str, str, str]]:
    """Replace every quantizable MatMul by the integer pattern (one DynamicQuantizeLinear per
    activation); returns weight name -> (q, scale, zero point) names."""
    inits = {t.name: t for t in graph.initializer}
    dql: dict[str, tuple[str, str, str]] = {}  # activation -> (q, scale, zp)
    wq: dict[str, tuple[str, str, str]] = {}  # weight -> (q, scale, zp)
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            new_nodes.append(node)
            continue
        reason = _skip_reason(node, inits, exclude)
        if reason:
            result.skipped.append((node.name, reason))
            new_nodes.append(node)
            continue
        a, w = node.input[0], node.input[1]
        if a not in dql:
            dql[a] = (a + _QUANT_SUFFIX, a + "_scale", a + "_zero_point")
            new_nodes.append(helper.make_node("DynamicQuantizeLinear", [a], list(dql[a]), a + "_QuantizeLinear"))
        if w not in wq:
            wq[w] = (w + _QUANT_SUFFIX, w + "_scale", w + "_zero_point")
            result.quantized_weights.append(w)
        new_nodes += _integer_matmul(node, dql[a], wq[w])
        result.quantized.append(node.name)
    graph.ClearField("node")
    graph.node.extend(new_nodes)
    return wq


def _swap_weights(graph: onnx.GraphProto, wq: dict[str, tuple[str, str, str]]) -> dict[str, TensorProto]:
    """Replace each quantized weight in place by empty (q, scale, zp) placeholders, keeping the float
    weight too if something still reads it; returns q name -> source float tensor."""
    used = _used_names(graph)
    new_inits: list[TensorProto] = []
    pending: dict[str, TensorProto] = {}
    for t in list(graph.initializer):
        if t.name in wq:
            if t.name in used:
                new_inits.append(t)
            pending[wq[t.name][0]] = t
            new_inits += [TensorProto(name=n) for n in wq[t.name]]  # filled while writing
        else:
            new_inits.append(t)
    graph.ClearField("initializer")
    graph.initializer.extend(new_inits)
    return pending


def _stream_and_save(model: onnx.ModelProto, pending: dict[str, TensorProto], wq: dict[str, tuple[str, str, str]],
                     base: Path, out: Path, external: bool, per_channel: bool, weight_type: str) -> None:
    """Quantize/copy the weights into `<out name>.data` and write the graph to `out`, then check it.

    The caller stages: `out` is written in place (no temporary files, no rename; itae_export passes a
    path inside its output transaction's staging folder, whose commit makes the result appear at
    once and sets the modes). What this call wrote is removed again when it fails."""
    out_data = out.parent / (out.name + ".data")
    out.parent.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []  # files this call has started to write
    try:
        writer = None
        if external:
            made.append(out_data)
            writer = _DataWriter(out_data, out_data.name)
        try:
            _fill_and_stream(model.graph, pending, wq, base, writer, per_channel, weight_type)
        finally:
            if writer is not None:
                writer.close()
        made.append(out)
        onnx.save_model(model, str(out))
        onnx.checker.check_model(str(out))
    except BaseException:
        for f in made:
            with contextlib.suppress(OSError):
                f.unlink()
        raise


def _fill_and_stream(graph: onnx.GraphProto, pending: dict[str, TensorProto], wq: dict[str, tuple[str, str, str]],
                     base: Path, writer: _DataWriter | None, per_channel: bool, weight_type: str) -> None:
    """Quantize pending weights into their placeholder initializers and move every external tensor
    into the writer's file, one tensor in memory at a time."""
    by_name = {t.name: t for t in graph.initializer}
    filled: set[str] = set()
    for t in list(all_tensors(graph)):
        if t.name in filled:  # scale/zero point written together with their weight
            continue
        src = pending.get(t.name)
        if src is not None:
            w = _read_external_array(src, base) if _is_external(src) else numpy_helper.to_array(src)
            q, scale, zp = quantize_weight(w, per_channel=per_channel, weight_type=weight_type)
            del w
            _, s_name, z_name = wq[src.name]
            for proto, arr in ((t, q), (by_name[s_name], scale), (by_name[z_name], zp)):
                arr = np.asarray(arr)
                # dims/type only: bytes put into the proto stay in its protobuf arena even after
                # ClearField, so an external tensor's data must never pass through it
                proto.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
                proto.dims.extend(arr.shape)
                filled.add(proto.name)
                if writer is not None and arr.nbytes >= _EXTERNAL_MIN_BYTES:
                    writer.write_array(proto, arr)
                else:
                    proto.raw_data = np.ascontiguousarray(arr).tobytes()
            del q
        elif _is_external(t):
            if writer is None:  # unreachable: an external tensor makes the output external
                raise Int8Error(f"tensor {t.name!r} is external but no output data file is open")
            path, offset, length = _ext_span(t, base)
            if length < _EXTERNAL_MIN_BYTES:
                # shapes/axes saved externally (size_threshold=0): ONNX Runtime's shape inference
                # cannot read them from a file, so small tensors go back inline
                with open(path, "rb") as f:
                    f.seek(offset)
                    raw = f.read(length)
                if len(raw) != length:
                    raise Int8Error(f"{path} is truncated: tensor {t.name!r} needs {length} bytes at {offset}")
                del t.external_data[:]
                t.data_location = TensorProto.DEFAULT
                t.raw_data = raw
            else:
                writer.copy_span(t, path, offset, length)
