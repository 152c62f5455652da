"""The in-graph input-size check of a dynamic-size DINOv2 graph: heights and widths must be
multiples of the patch size within the exported bounds, as the official PatchEmbed asserts.

ONNX has no Assert op, so the check fails the way a runtime can report: a Gather from a one-element
constant whose index is 0 for a valid size and 1 otherwise. ONNX Runtime refuses the out-of-range
index and names the node, and the node's name is the sentence the user needs:

    pixel_values [B,C,H,W] --Shape--> Slice(2:4) -> hw [2]
      hw % multiple == 0  And  hw >= min  And  hw <= max  -> ok [2]
      Cast(float) -> ReduceMin -> Sub(1, .) -> Cast(int64) -> index (0 | 1)
      Gather([1], index)  name "size_check/height_and_width_must_be_multiples_of_<m>_from_<min>_to_<max>"
      Mul(., Where(ok, 1, NaN)) -> gate (1, or NaN for a runtime that does not check the index)
    pixel_values --Mul(gate)--> every former consumer of pixel_values

Matched by structure from the anchor (the graph's one image input of rank 4 with a symbolic H or W);
a graph that already has the gate (an input consumer Mul fed by a Gather of a one-element constant
indexed through Sub/ReduceMin) is refused. TensorRT does not check Gather indices: there the
optimization profile bounds the size, and a size inside it that is not a multiple of the patch size
makes every output NaN (the Where gate) instead of a silently cropped result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from .errors import PassError
from .graph import Builder, GraphIndex, op_counts

PREFIX = "size_check"
_FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


class SizeCheckError(PassError):
    """The graph cannot take (or already has) the input-size check."""


@dataclass
class SizeCheckResult:
    input: str
    bounds: dict
    gate: str  # the name of the Gather that fails on a bad size
    inserted_ops: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        b = self.bounds
        return (f"input-size check on {self.input!r}: H and W multiples of {b['multiple']} in "
                f"[{b['min']}, {b['max']}] (gate node {self.gate})")


def gate_name(lo: int, hi: int, multiple: int) -> str:
    return f"{PREFIX}/height_and_width_must_be_multiples_of_{multiple}_from_{lo}_to_{hi}"


_GATE = re.compile(PREFIX + r"/height_and_width_must_be_multiples_of_(\d+)_from_(\d+)_to_(\d+)")


def parse_gate_name(text: str) -> tuple[int, int, int] | None:
    """(min, max, multiple) of the gate_name found in `text` (e.g. a runtime's error), or None."""
    m = _GATE.search(text)
    if m is None:
        return None
    multiple, lo, hi = (int(g) for g in m.groups())
    return lo, hi, multiple


def _image_input(model: onnx.ModelProto, ix: GraphIndex) -> onnx.ValueInfoProto:
    inputs = [i for i in model.graph.input if i.name in ix.graph_inputs]
    if len(inputs) != 1:
        raise SizeCheckError(f"the graph has {len(inputs)} inputs; the size check needs one image input [B,C,H,W]")
    vi = inputs[0]
    dims = vi.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise SizeCheckError(f"input {vi.name!r} has rank {len(dims)}, not [B,C,H,W]")
    if all(d.HasField("dim_value") for d in dims[2:]):
        raise SizeCheckError(f"input {vi.name!r} has a fixed H and W; the size check is for dynamic-size graphs")
    if vi.type.tensor_type.elem_type not in _FLOAT_TYPES:
        raise SizeCheckError(f"input {vi.name!r} is not a float tensor")
    return vi


def has_size_check(model: onnx.ModelProto, ix: GraphIndex | None = None) -> bool:
    """True when a consumer Mul of the image input takes (through a Mul) a Gather of a one-element
    constant whose index comes from Cast(Sub(.., ReduceMin(..))): the gate this pass inserts,
    whatever it is named."""
    ix = ix or GraphIndex(model)
    for name in ix.graph_inputs:
        for node in ix.consumers.get(name, []):
            if node.op_type != "Mul":
                continue
            feeds = [i for i in node.input if i != name]
            feeds += [j for i in feeds if (p := ix.producer.get(i)) is not None and p.op_type == "Mul" for j in p.input]
            for other in feeds:
                g = ix.producer.get(other)
                if g is None or g.op_type != "Gather" or len(g.input) < 2:
                    continue
                data, index = ix.const_value(g.input[0]), ix.producer.get(g.input[1])
                if index is not None and index.op_type == "Cast":
                    index = ix.producer.get(index.input[0])
                if data is not None and data.size == 1 and index is not None and index.op_type == "Sub":
                    if any((p := ix.producer.get(i)) is not None and p.op_type == "ReduceMin" for i in index.input):
                        return True
    return False


def add_size_check(model: onnx.ModelProto, *, lo: int, hi: int, multiple: int) -> tuple[onnx.ModelProto, SizeCheckResult]:
    """A copy of `model` with the size gate on its image input (match -> check -> rewrite)."""
    if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(multiple, int)) or not 0 < lo <= hi \
            or multiple < 1 or lo % multiple or hi % multiple:
        raise SizeCheckError(f"size bounds must be multiples of {multiple} with 0 < min <= max, got {lo}..{hi}")
    ix = GraphIndex(model)
    vi = _image_input(model, ix)
    if has_size_check(model, ix):
        raise SizeCheckError(f"input {vi.name!r} already has a size check; export the model again instead")
    if ix.opset < 13:
        raise SizeCheckError(f"opset {ix.opset} is too old for the size check (need >= 13)")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    b = Builder(GraphIndex(out), PREFIX)
    i64 = np.int64
    hw = b.op("Slice", [b.op("Shape", [vi.name], "input_shape"), b.const("starts", np.array([2], i64)),
                        b.const("ends", np.array([4], i64))], "height_width")
    mult = b.op("Equal", [b.op("Mod", [hw, b.const("multiple", np.array(multiple, i64))], "remainder"),
                          b.const("zero", np.array(0, i64))], "is_multiple")
    low = b.op("Not", [b.op("Less", [hw, b.const("min", np.array(lo, i64))], "below_min")], "at_least_min")
    high = b.op("Not", [b.op("Greater", [hw, b.const("max", np.array(hi, i64))], "above_max")], "at_most_max")
    ok = b.op("And", [b.op("And", [mult, low], "multiple_and_min"), high], "size_ok")
    # the reduction in float32: TensorRT reduces no integer tensors
    all_ok = b.reduce("ReduceMin", b.op("Cast", [ok], "size_ok_float", to=TensorProto.FLOAT), [0], keepdims=0,
                      hint="all_ok")
    bad = b.op("Sub", [b.const("one", np.array(1, np.float32)), all_ok], "size_bad")
    index = b.op("Cast", [bad], "gate_index", to=TensorProto.INT64)
    gate = gate_name(lo, hi, multiple)
    b._taken.add(gate)
    ftype = _FLOAT_TYPES[vi.type.tensor_type.elem_type]
    b.nodes.append(onnx.helper.make_node("Gather", [b.const("gate_value", np.array([1], ftype)), index], [gate],
                                         name=gate, axis=0))
    # runtimes that do not check Gather indices (TensorRT) get NaN embeddings for a bad size instead
    nan_gate = b.op("Where", [b.op("Cast", [all_ok], "all_ok_bool", to=TensorProto.BOOL),
                              b.const("one_f", np.array(1, ftype)), b.const("nan", np.array(np.nan, ftype))],
                    "nan_unless_ok")
    both = b.op("Mul", [gate, nan_gate], "gate")
    checked = b.op("Mul", [vi.name, both], "checked_input")
    consumers = [n for n in out.graph.node]  # rewire the existing consumers only, then insert the gate
    for node in consumers:
        for k, name in enumerate(node.input):
            if name == vi.name:
                node.input[k] = checked
    for o in out.graph.output:
        if o.name == vi.name:
            raise SizeCheckError(f"input {vi.name!r} is also a graph output; cannot gate it")
    b.insert_into(out)
    return out, SizeCheckResult(vi.name, {"min": lo, "max": hi, "multiple": multiple}, gate, op_counts(b.nodes))
