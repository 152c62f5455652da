"""Deployment graph passes: raw-pixel input and L2-normalised output.

Pure ONNX (no torch, no itae_export): each pass matches the graph's single image input / embedding
output, checks that it can apply, rewrites, and records what it did in ``metadata_props`` (existing
metadata is kept). The passes never touch existing initializers, so they work on models loaded with
``onnx.load(path, load_external_data=False)``; save such a model with :func:`save_model`, which keeps
the external-data references valid.

(a) :func:`add_uint8_nhwc_input`: the graph takes uint8 [B, H, W, 3] and does
    Cast -> Transpose(0,3,1,2) -> Mul -> Add itself (``/255`` and ``(x - mean) / std`` folded into one
    Mul + Add whose constants are computed in float64), so a client sends raw pixels.
(b) :func:`add_l2_normalize`: ``y = x / max(||x||_2, eps)`` on the embedding (ReduceL2, Max, Div: all
    supported by TensorRT's ONNX parser), for cosine / inner-product search.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import PreprocessPassError, UnsafeLocationError
from .graph import external_locations, resolve_external_location
from .metadata import L2_NORMALIZE, UINT8_NHWC_INPUT, metadata_field, set_metadata_props

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# metadata_props keys (defined in metadata.py); their presence marks a pass as applied
# (re-application is refused).
UINT8_INPUT_KEY = UINT8_NHWC_INPUT
L2_NORMALIZE_KEY = L2_NORMALIZE

_FLOAT_TYPES = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16"}


@dataclass(frozen=True)
class Uint8InputResult:
    input_name: str  # the new uint8 graph input
    source_input: str  # the float input it replaces (now an internal tensor)
    batch: int | str  # static size or the symbolic name of the batch dim
    height: int | str  # static size, or the symbolic name of a dynamic-size graph's dim
    width: int | str
    graph_dtype: str  # float32 | float16 (the dtype the rest of the graph receives)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    nodes: tuple[str, ...]  # op types added, in order

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class L2NormalizeResult:
    output_name: str
    dim: int | str
    eps: float
    graph_dtype: str
    compute_dtype: str
    nodes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------- helpers


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise PreprocessPassError("the model imports no default ONNX opset; it is not a usable ONNX graph")


class UnsafeDataLocation(PreprocessPassError, UnsafeLocationError):
    """An external-data location outside the model's folder: both a PreprocessPassError (what this
    module's callers catch) and an UnsafeLocationError (graph.resolve_external_location's rule)."""


def _safe_location(base: str | Path, loc: str) -> Path:
    try:
        return resolve_external_location(base, loc)
    except UnsafeLocationError as e:
        raise UnsafeDataLocation(str(e)) from e


def _set_metadata(model: onnx.ModelProto, key: str, value: dict) -> None:
    set_metadata_props(model, {key: json.dumps(value, sort_keys=True)})


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for g in _subgraphs(graph):
        names.update(v.name for v in (*g.input, *g.output, *g.value_info))
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
    return names


class _Namer:
    def __init__(self, graph: onnx.GraphProto, prefix: str) -> None:
        self.taken = _all_names(graph)
        self.prefix = prefix

    def __call__(self, base: str) -> str:
        name, i = f"{self.prefix}/{base}", 1
        while name in self.taken:
            i += 1
            name = f"{self.prefix}/{base}_{i}"
        self.taken.add(name)
        return name


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Point every consumer of `old` (subgraphs included, which may capture outer names) at `new`."""
    for g in _subgraphs(graph):
        for node in g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        for out in g.output:
            if out.name == old:
                out.name = new


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    # IR < 4 models list initializers as inputs too; those are not fed by a client.
    inits = {t.name for t in graph.initializer}
    return [v for v in graph.input if v.name not in inits]


def _dims(vi: onnx.ValueInfoProto) -> list[int | str | None]:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return []
    out: list[int | str | None] = []
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(d.dim_value)
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _has_shape(vi: onnx.ValueInfoProto) -> bool:
    return vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")


def _const(name: str, values: np.ndarray, dtype: int) -> onnx.TensorProto:
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    return numpy_helper.from_array(np.asarray(values, dtype=np.float64).astype(np_dtype), name)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


# ------------------------------------------------------------------------------------ (a) uint8 NHWC
#
#   uint8 [B,H,W,3] --Cast(float32)--> Transpose(0,3,1,2) --Mul(1/(255 std))--> Add(-mean/std)
#       [--Cast(float16)] --> the old float input [B,3,H,W] (now an internal tensor) --> rest of graph


def add_uint8_nhwc_input(
    model: onnx.ModelProto,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    *,
    input_name: str | None = None,
) -> tuple[onnx.ModelProto, Uint8InputResult]:
    """Return a copy of `model` whose image input is uint8 [B, H, W, 3] (RGB, 0..255).

    The model must have one float32/float16 input [B, 3, H, W]; B, H and W may be dynamic (named
    dims are kept as they are). `input_name` names the new input; by default it keeps the old input's name
    (the float tensor inside is renamed). Steps: match the input -> check it and the constants ->
    rewrite (prepend the nodes, swap the graph input) -> record in metadata.
    """
    src, elem, dims = _match_image_input(model)
    mean_a, std_a = _check_mean_std(mean, std)
    new_name = input_name or src.name
    if new_name != src.name and new_name in _all_names(model.graph):
        raise PreprocessPassError(f"input name {new_name!r} is already used in the graph; choose another")

    out = _copy(model)
    nodes = _rewrite_uint8_input(out.graph, src.name, new_name, elem, dims, mean_a, std_a)
    result = Uint8InputResult(
        input_name=new_name,
        source_input=src.name,
        batch=dims[0] if dims[0] is not None else "?",
        height=dims[2],  # type: ignore[arg-type]
        width=dims[3],  # type: ignore[arg-type]
        graph_dtype=_FLOAT_TYPES[elem],
        mean=tuple(float(v) for v in mean_a),
        std=tuple(float(v) for v in std_a),
        nodes=tuple(n.op_type for n in nodes),
    )
    _set_metadata(out, UINT8_INPUT_KEY, {**result.to_dict(), "layout": "NHWC", "dtype": "uint8"})
    return out, result


def _match_image_input(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, int, list]:
    """The one float [B, 3, H, W] graph input, H and W static or named: (its value info, elem type, dims)."""
    if metadata_field(model, "uint8_nhwc_input") is not None:
        raise PreprocessPassError(
            f"the uint8 NHWC input was already added to this model (metadata key {UINT8_INPUT_KEY!r}); "
            "apply it to the float model instead"
        )
    inputs = _graph_inputs(model.graph)
    if len(inputs) != 1:
        raise PreprocessPassError(
            f"expected exactly one graph input (the image), found {len(inputs)}: {[v.name for v in inputs]}"
        )
    src = inputs[0]
    elem = src.type.tensor_type.elem_type if src.type.HasField("tensor_type") else 0
    if elem not in _FLOAT_TYPES:
        name = TensorProto.DataType.Name(elem) if elem else "non-tensor"
        raise PreprocessPassError(
            f"input {src.name!r} is {name}; the uint8 input pass needs a float32/float16 [B,3,H,W] input"
        )
    dims = _dims(src)
    if len(dims) != 4 or dims[1] != 3:
        raise PreprocessPassError(f"input {src.name!r} has shape {dims}; expected [B, 3, H, W] (NCHW RGB)")
    h, w = dims[2], dims[3]
    if not all((isinstance(d, int) and d > 0) or (isinstance(d, str) and d) for d in (h, w)):
        raise PreprocessPassError(
            f"input {src.name!r} has shape {dims}; H and W must be sizes or named dims (a dynamic-size export "
            "names them height and width)"
        )
    return src, elem, dims


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    mean_a = np.asarray(mean, dtype=np.float64)
    std_a = np.asarray(std, dtype=np.float64)
    if (
        mean_a.shape != (3,)
        or std_a.shape != (3,)
        or not np.all(std_a > 0)
        or not np.all(np.isfinite(mean_a))
    ):
        raise PreprocessPassError(f"mean and std must be 3 finite values with std > 0; got {mean} / {std}")
    return mean_a, std_a


def _rewrite_uint8_input(g: onnx.GraphProto, src_name: str, new_name: str, elem: int, dims: list,
                         mean_a: np.ndarray, std_a: np.ndarray) -> list[onnx.NodeProto]:
    """Prepend the Cast/Transpose/Mul/Add nodes and swap the graph input (in place); the nodes."""
    src_out = next(v for v in g.input if v.name == src_name)
    namer = _Namer(g, "uint8_input")
    internal = namer(f"{src_name}_normalized")
    _rename_uses(g, src_name, internal)

    # One Mul + Add: ((x / 255) - mean) / std == x * (1 / (255 std)) + (-mean / std), folded in float64.
    scale = (1.0 / (255.0 * std_a)).reshape(1, 3, 1, 1)
    bias = (-mean_a / std_a).reshape(1, 3, 1, 1)
    # float16 graphs: normalise in float32 and cast the result, so the constants keep full precision.
    compute = TensorProto.FLOAT
    scale_t = _const(namer("scale"), scale, compute)
    bias_t = _const(namer("bias"), bias, compute)
    t_cast, t_nchw, t_mul = namer("cast_out"), namer("nchw"), namer("scaled")
    nodes = [
        helper.make_node("Cast", [new_name], [t_cast], name=namer("Cast"), to=compute),
        helper.make_node("Transpose", [t_cast], [t_nchw], name=namer("Transpose"), perm=[0, 3, 1, 2]),
        helper.make_node("Mul", [t_nchw, scale_t.name], [t_mul], name=namer("Mul")),
    ]
    if elem == compute:
        nodes.append(helper.make_node("Add", [t_mul, bias_t.name], [internal], name=namer("Add")))
    else:
        t_add = namer("shifted")
        nodes.append(helper.make_node("Add", [t_mul, bias_t.name], [t_add], name=namer("Add")))
        nodes.append(helper.make_node("Cast", [t_add], [internal], name=namer("Cast"), to=elem))

    new_input = helper.make_tensor_value_info(new_name, TensorProto.UINT8, [dims[0], dims[2], dims[3], 3])
    if isinstance(dims[0], str) or dims[0] is None:
        # keep the original batch dim exactly (symbolic name or unknown)
        new_input.type.tensor_type.shape.dim[0].CopyFrom(src_out.type.tensor_type.shape.dim[0])
    idx = list(g.input).index(src_out)
    g.input.remove(src_out)
    g.input.insert(idx, new_input)
    g.initializer.extend([scale_t, bias_t])
    # prepend: the nodes must stay topologically sorted
    old_nodes = list(g.node)
    del g.node[:]
    g.node.extend(nodes + old_nodes)
    return nodes


# ------------------------------------------------------------------------------- (b) L2 normalisation
#
#   producer --> x [B,D] (renamed x_unnormalized) [--Cast(float32)]
#       --> ReduceL2(axis -1, keepdims) --> Max(eps) --> Div(x, .) [--Cast(float16)] --> output (same name)


def add_l2_normalize(
    model: onnx.ModelProto, output_name: str | None = None, *, eps: float = 1e-12
) -> tuple[onnx.ModelProto, L2NormalizeResult]:
    """Return a copy of `model` whose embedding output [B, D] has unit L2 length per row.

    `output_name` picks the output when the graph has several; the output keeps its name.
    Computed in float32 even in float16 graphs (a sum of D squares overflows float16's 65504,
    and eps underflows it), then cast back, so the output dtype is unchanged. Steps: match the
    output -> check it -> rewrite (append the nodes, rename the producer's output) -> metadata.
    """
    target, elem, dims = _match_embedding_output(model, output_name)
    if not (eps > 0 and np.isfinite(eps)):
        raise PreprocessPassError(f"eps must be a small positive number, got {eps}")

    out = _copy(model)
    nodes = _rewrite_l2_output(out, target.name, elem, eps)
    result = L2NormalizeResult(
        output_name=target.name,
        dim=dims[1] if len(dims) == 2 and dims[1] is not None else "?",
        eps=float(eps),
        graph_dtype=_FLOAT_TYPES[elem],
        compute_dtype="float32",
        nodes=tuple(n.op_type for n in nodes),
    )
    _set_metadata(out, L2_NORMALIZE_KEY, result.to_dict())
    return out, result


def _match_embedding_output(model: onnx.ModelProto, output_name: str | None) -> tuple[onnx.ValueInfoProto, int, list]:
    """The float [B, D] output computed by a node: (its value info, elem type, dims)."""
    if metadata_field(model, "l2_normalize") is not None:
        raise PreprocessPassError(
            f"the output is already L2-normalised (metadata key {L2_NORMALIZE_KEY!r}); do not apply twice"
        )
    graph = model.graph
    outputs = list(graph.output)
    if output_name is None:
        if len(outputs) != 1:
            raise PreprocessPassError(
                f"the graph has {len(outputs)} outputs {[o.name for o in outputs]}; name the one to normalise"
            )
        target = outputs[0]
    else:
        found = [o for o in outputs if o.name == output_name]
        if not found:
            raise PreprocessPassError(
                f"no graph output named {output_name!r}; outputs are {[o.name for o in outputs]}"
            )
        target = found[0]
    elem = target.type.tensor_type.elem_type if target.type.HasField("tensor_type") else 0
    if elem not in _FLOAT_TYPES:
        name = TensorProto.DataType.Name(elem) if elem else "non-tensor"
        raise PreprocessPassError(f"output {target.name!r} is {name}; L2 normalisation needs float32/float16")
    dims = _dims(target)
    if _has_shape(target) and len(dims) != 2:
        raise PreprocessPassError(
            f"output {target.name!r} has shape {dims}; expected an embedding [B, D] (rank 2)"
        )
    if not any(target.name in n.output for n in graph.node):
        raise PreprocessPassError(
            f"output {target.name!r} is not computed by a node (it is an input or constant)"
        )
    return target, elem, dims


def _rewrite_l2_output(out: onnx.ModelProto, target: str, elem: int, eps: float) -> list[onnx.NodeProto]:
    """Rename the producer's output, append the normalisation nodes (in place); the nodes."""
    g = out.graph
    namer = _Namer(g, "l2_normalize")
    raw = namer(f"{target}_unnormalized")
    # the producer (and any other consumer) now uses `raw`; the graph output name stays
    for node in g.node:
        for i, n in enumerate(node.output):
            if n == target:
                node.output[i] = raw
        for i, n in enumerate(node.input):
            if n == target:
                node.input[i] = raw
    for vi in g.value_info:
        if vi.name == target:
            vi.name = raw

    compute = TensorProto.FLOAT
    nodes: list[onnx.NodeProto] = []
    x = raw
    if elem != compute:
        x = namer("x_float")
        nodes.append(helper.make_node("Cast", [raw], [x], name=namer("Cast"), to=compute))
    norm, denom = namer("norm"), namer("norm_clamped")
    inits = [_const(namer("eps"), np.full((1, 1), eps), compute)]  # rank 2 like the norm: TRT-friendly
    if _opset(out) >= 18:  # opset 18 moved Reduce* axes from an attribute to an input
        axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), namer("axes"))
        inits.append(axes)
        nodes.append(helper.make_node("ReduceL2", [x, axes.name], [norm], name=namer("ReduceL2"), keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceL2", [x], [norm], name=namer("ReduceL2"), axes=[-1], keepdims=1))
    nodes.append(helper.make_node("Max", [norm, inits[0].name], [denom], name=namer("Max")))
    if elem == compute:
        nodes.append(helper.make_node("Div", [x, denom], [target], name=namer("Div")))
    else:
        y = namer("y_float")
        nodes.append(helper.make_node("Div", [x, denom], [y], name=namer("Div")))
        nodes.append(helper.make_node("Cast", [y], [target], name=namer("Cast"), to=elem))
    g.initializer.extend(inits)
    g.node.extend(nodes)
    return nodes


def applied_passes(model: onnx.ModelProto) -> dict[str, dict]:
    """The deployment passes recorded in `model`'s metadata: {key: recorded settings}."""
    recorded = {UINT8_INPUT_KEY: metadata_field(model, "uint8_nhwc_input"),
                L2_NORMALIZE_KEY: metadata_field(model, "l2_normalize")}
    return {k: v for k, v in recorded.items() if v is not None}


# ----------------------------------------------------------------------------------- external data


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """Relative paths of the external data files `model` refers to (sorted, unique). A location that
    is not a plain relative path (absolute, '..') raises UnsafeDataLocation; where the files are
    opened (copy_external_data), graph.resolve_external_location also checks symlinks."""
    locs = external_locations(model)
    for loc in locs:
        p = Path(loc)
        if p.is_absolute() or ".." in p.parts:
            raise UnsafeDataLocation(
                f"external data location {loc!r} is not a plain relative path; re-save the model with "
                "its data beside it"
            )
    return locs


def copy_external_data(model: onnx.ModelProto, source_dir: str | Path, dest_dir: str | Path) -> list[Path]:
    """Copy the external data files of `model` from `source_dir` to `dest_dir` (same relative paths).

    A file already at the destination is kept if it is the same file or has identical content;
    a different file there is an error (it would silently change the weights).

    The caller stages: the files are copied in place (big files: no temporary copy; a failed copy is
    removed) and get the default mode; itae_export copies into an output transaction's staging
    folder, whose commit makes them appear at once and sets their modes.
    """
    copied = []
    src_dir, dst_dir = Path(source_dir), Path(dest_dir)
    for loc in external_data_locations(model):
        # both ends through the location rule: no '..', and no symlink out of either folder
        src, dst = _safe_location(src_dir, loc), _safe_location(dst_dir, loc)
        if not src.is_file():
            raise FileNotFoundError(f"external data file {src} (referenced by the model) is missing")
        if dst.exists():
            if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
                continue
            raise FileExistsError(
                f"{dst} exists with different content; it would not match the model's weights"
            )
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, dst)  # the caller stages (see the docstring)
        except BaseException:
            with contextlib.suppress(OSError):
                dst.unlink()  # no partial copy left behind
            raise
        copied.append(dst)
    return copied


def save_model(
    model: onnx.ModelProto, out_path: str | Path, *, source_path: str | Path | None = None
) -> Path:
    """Save a model whose weights may be external references (loaded with load_external_data=False).

    The references are relative to the model file, so when `out_path` is in another directory than
    `source_path` the data files are copied beside it (in place: see copy_external_data). The .onnx
    file is written to a temporary name beside `out_path` and renamed over it; its mode is the
    default one. The caller stages: itae_export writes into an output transaction's staging folder.
    """
    out_p = Path(out_path)
    out_p.parent.mkdir(parents=True, exist_ok=True)
    if source_path is not None:
        copy_external_data(model, Path(source_path).parent, out_p.parent)
    elif external_data_locations(model):
        missing = [loc for loc in external_data_locations(model) if not _safe_location(out_p.parent, loc).is_file()]
        if missing:
            raise FileNotFoundError(
                f"the model refers to external data {missing} not present beside {out_p}; pass source_path"
            )
    tmp = out_p.parent / f".{out_p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        # only the proto is written: tensors with external references and no loaded bytes are left alone
        onnx.save(model, str(tmp))
        os.replace(tmp, out_p)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return out_p
