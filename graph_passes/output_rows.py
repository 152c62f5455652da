"""Output-row pruning: the token-wise tail of a ViT graph computes only the token row its output
reads. A DINOv2 embedding is the final norm's CLS row, but the exported graph runs the final
block's projection, residual adds, MLP and final norm on every token and then keeps one row; this
pass moves the row selection up to where rows start to mix (the attention), so that tail runs on
one row. The result is the same function (row-wise ops commute with taking a row); on ViT-L/14 at
224 px it removes three quarters of the final block's matrix-multiply work (proj, fc1, fc2 on 1
token instead of 257).

    attention --Reshape--> a [B,N,C] ─┐                                        (cut: rows mix above)
    block input x [B,N,C] ────────────┤   (cut: also read by the attention's LayerNorm)
                                      ▼
        row-wise region: MatMul(const W) Add Mul Div Erf Gelu LayerNorm(axis -1) ...
                                      ▼
        final LayerNorm [B,N,C] ──Gather(axis 1, index r)──> embedding [B,C]     (anchor)
  becomes
    a ──Slice(axis 1, r:r+1)──> [B,1,C] ─┐
    x ──Slice(axis 1, r:r+1)──> [B,1,C] ─┴─> the same region on one row ──Gather(axis 1, 0)──> embedding

Match: the anchor is a graph output produced by Gather(axis=1, constant scalar index). Check: the
region grows upward from the Gather's data input and takes a node only when it is row-wise (its
op acts on each token row alone, with constant operands that broadcast along the last axis only)
and every consumer of its outputs is already in the region; the inputs the region reads from
outside are the cuts. Candidates are refused with a reason (an output that is not a row
selection, a region without a matrix multiply, a constant that is not row-broadcast). Rewrite:
one Slice per cut, the region's inputs rewired to the slices, the Gather's index set to 0, stale
shape annotations of the region's tensors dropped, then a toposort; the result is recorded in
the model's metadata (itae_export.output_rows). A graph already pruned (every cut is such a Slice)
is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import PassError
from .graph import Builder, GraphIndex, infer_weight_free, op_counts
from .metadata import OUTPUT_ROWS, set_metadata_props

PREFIX = "output_rows"
# ops that act on each token row by itself (with constant operands broadcast along the last axis)
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Erf", "Gelu", "Tanh", "Sigmoid", "Relu", "Sqrt", "Pow", "Neg",
               "Cast", "Identity", "Exp", "Abs"}
ROW_OPS = ELEMENTWISE | {"MatMul", "LayerNormalization"}


class OutputRowsError(PassError):
    """The graph's output is not a row selection of a row-wise tail, or is pruned already."""


@dataclass
class OutputRowsResult:
    output: str
    row: int
    region_ops: dict[str, int]
    cuts: list[str]  # the tensors now sliced to one row
    rejected: list[str] = field(default_factory=list)

    @property
    def matmuls(self) -> int:
        return self.region_ops.get("MatMul", 0)

    def summary(self) -> str:
        ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(self.region_ops.items()))
        text = (f"output {self.output!r} reads token row {self.row}: the tail ({ops}) now runs on that row "
                f"only, sliced at {', '.join(self.cuts)}")
        if self.rejected:
            text += "; left out: " + "; ".join(self.rejected)
        return text

    def to_dict(self) -> dict:
        return {"output": self.output, "row": self.row, "region_ops": self.region_ops, "cuts": self.cuts}


def _row_selection(ix: GraphIndex, name: str) -> tuple[onnx.NodeProto, int] | str:
    """(the Gather, its row index) when graph output `name` is Gather(axis 1, constant scalar), else why not."""
    node = ix.producer.get(name)
    if node is None or node.op_type != "Gather":
        return f"output {name!r} is not produced by a Gather (it is {node.op_type if node else 'a graph input'})"
    if ix.attr(node, "axis", 0) != 1:
        return f"output {name!r}: the Gather takes axis {ix.attr(node, 'axis', 0)}, not the token axis 1"
    index = ix.const_value(node.input[1])
    if index is None or index.ndim != 0 or index.dtype.kind not in "iu" or int(index) < 0:
        return f"output {name!r}: the Gather's index is not a constant non-negative scalar"
    return node, int(index)


def _row_wise(ix: GraphIndex, node: onnx.NodeProto, region_outputs: set[str]) -> str | None:
    """None when `node` acts on each token row alone, else the reason it does not."""
    if node.op_type not in ROW_OPS:
        return f"{node.op_type} {node.name!r} mixes or reshapes rows"
    if node.op_type == "LayerNormalization":
        axis = ix.attr(node, "axis", -1)
        if axis != -1:
            return f"LayerNormalization {node.name!r} normalises over axis {axis}, not the last axis only"
        consts = node.input[1:]
    elif node.op_type == "MatMul":
        dims = ix.const_dims(node.input[1])
        if dims is None or len(dims) != 2 or node.input[0] in ix.initializers:
            return f"MatMul {node.name!r} is not token rows times a constant 2-D weight"
        consts = []
    else:
        consts = [i for i in node.input if i and i not in region_outputs]
    for c in consts:
        if not c:
            continue
        dims = ix.const_dims(c)
        if dims is None and not ix.is_scalar_const(c):
            if node.op_type in ELEMENTWISE and not ix.is_data_independent(c):
                continue  # a second data operand: sliced as a cut (checked by the caller)
            return f"{node.op_type} {node.name!r} reads {c!r}, which is neither constant nor a token tensor"
        if dims is not None and any(d != 1 for d in dims[:-1]):
            return f"{node.op_type} {node.name!r}: constant {c!r} of shape {dims} does not broadcast along the last axis only"
    return None


def _region(ix: GraphIndex, gather: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[str], list[str]]:
    """The row-wise nodes that feed the Gather only (in graph order), the cut tensors they read from
    outside, and why the nodes met at the border were left out. Grown to a fixpoint: a node joins
    once every reader of its outputs has joined."""
    order = {id(n): k for k, n in enumerate(ix.graph.node)}
    outputs = {g.name for g in ix.graph.output}
    region: dict[int, onnx.NodeProto] = {}
    inside = {gather.input[0]}
    rejected: dict[int, str] = {}
    grown = True
    while grown:
        grown = False
        wanted = [gather.input[0]] + [i for n in region.values() for i in n.input if i]
        for t in dict.fromkeys(wanted):
            node = ix.producer.get(t)
            if node is None or id(node) in region or id(node) in rejected or ix.is_data_independent(t):
                continue
            outs = [o for o in node.output if o]
            readers = [c for o in outs for c in ix.consumers.get(o, [])]
            if any(c is not gather and id(c) not in region for c in readers) or any(o in outputs for o in outs):
                continue  # read outside the region too: a cut, unless its readers all join later
            why = _row_wise(ix, node, inside)
            if why is not None:
                rejected[id(node)] = why
                continue
            region[id(node)] = node
            inside.update(outs)
            grown = True
    nodes = sorted(region.values(), key=lambda n: order[id(n)])
    produced = {o for n in nodes for o in n.output}
    cuts = list(dict.fromkeys(i for n in nodes for i in n.input
                              if i and i not in produced and not ix.is_data_independent(i)))
    return nodes, cuts, list(rejected.values())


def _check_cuts(model: onnx.ModelProto, gather: onnx.NodeProto, row: int, cuts: list[str]) -> str | None:
    """None when the Gather's data and every cut are [B, N, C] token tensors (shape inference) with at
    least row + 1 tokens where N is known, else why not: a Slice of another shape would change the function."""
    inferred = infer_weight_free(model)
    shapes = {v.name: v.type.tensor_type.shape for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
              if v.type.tensor_type.HasField("shape")}
    for t in [gather.input[0], *cuts]:
        shape = shapes.get(t)
        if shape is None or len(shape.dim) != 3:
            return f"tensor {t!r} is not known to be a [batch, tokens, channels] tensor (rank {len(shape.dim) if shape else '?'})"
        n = shape.dim[1]
        if n.HasField("dim_value") and n.dim_value <= row:
            return f"tensor {t!r} has {n.dim_value} tokens; row {row} does not exist"
    return None


def is_pruned(model: onnx.ModelProto) -> bool:
    """True when the graph's row-selected output is already computed on one row: every cut of its
    region is a Slice of length one on axis 1 (the form prune_output_rows writes)."""
    ix = GraphIndex(model)
    for out in model.graph.output:
        sel = _row_selection(ix, out.name)
        if isinstance(sel, str):
            continue
        _, cuts, _ = _region(ix, sel[0])
        if _cut_to_one_row(ix, cuts):
            return True
    return False


def _cut_to_one_row(ix: GraphIndex, cuts: list[str]) -> bool:
    """Every cut is already a one-row Slice of the token axis: the region was pruned before."""
    return bool(cuts) and all(_is_row_slice(ix, c) for c in cuts)


def _is_row_slice(ix: GraphIndex, name: str) -> bool:
    node = ix.producer.get(name)
    if node is None or node.op_type != "Slice" or len(node.input) < 4:
        return False
    starts, ends, axes = (ix.const_value(i) for i in node.input[1:4])
    return (starts is not None and ends is not None and axes is not None and axes.tolist() == [1]
            and (ends - starts).tolist() == [1])


def prune_output_rows(model: onnx.ModelProto) -> tuple[onnx.ModelProto, OutputRowsResult]:
    """A copy of `model` whose row-selected output's tail runs on that row only (match, check, rewrite)."""
    ix = GraphIndex(model)
    if ix.opset < 13:
        raise OutputRowsError(f"opset {ix.opset} is too old for the output-row pruning (need >= 13)")
    reasons: list[str] = []
    for out in model.graph.output:
        sel = _row_selection(ix, out.name)
        if isinstance(sel, str):
            reasons.append(sel)
            continue
        gather, row = sel
        nodes, cuts, rejected = _region(ix, gather)
        if not any(n.op_type == "MatMul" for n in nodes):
            reasons.append(f"output {out.name!r}: the row-wise tail above its Gather has no matrix multiply to save"
                           + (f" ({'; '.join(rejected)})" if rejected else ""))
            continue
        if _cut_to_one_row(ix, cuts):
            raise OutputRowsError(f"output {out.name!r} is computed on one row already; the graph was pruned before")
        why = _check_cuts(model, gather, row, cuts)
        if why is not None:
            reasons.append(f"output {out.name!r}: {why}")
            continue
        return _rewrite(model, gather, row, nodes, cuts, rejected, out.name)
    raise OutputRowsError("no output of the graph is a row selection of a row-wise tail: " + "; ".join(reasons))


def _rewrite(model, gather, row, nodes, cuts, rejected, output) -> tuple[onnx.ModelProto, OutputRowsResult]:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    b = Builder(GraphIndex(out), PREFIX)
    i64 = np.int64
    starts, ends = b.const("row_start", np.array([row], i64)), b.const("row_end", np.array([row + 1], i64))
    axes = b.const("token_axis", np.array([1], i64))
    sliced = {c: b.op("Slice", [c, starts, ends, axes], "one_row") for c in cuts}
    names = {n.name or n.output[0] for n in nodes} | {gather.name or gather.output[0]}
    produced = {o for n in nodes for o in n.output}
    for node in out.graph.node:
        if (node.name or node.output[0]) not in names:
            continue
        if node.op_type == "Gather" and node.output[0] == output:
            if row != 0:  # the slice holds one row: take its row 0 (the old index is dropped if unused)
                old, node.input[1] = node.input[1], b.const("row_in_slice", np.array(0, i64))
                if not any(old in n.input for n in out.graph.node):
                    keep_init = [t for t in out.graph.initializer if t.name != old]
                    del out.graph.initializer[:]
                    out.graph.initializer.extend(keep_init)
            continue
        for k, name in enumerate(node.input):
            if name in sliced:
                node.input[k] = sliced[name]
    keep = [v for v in out.graph.value_info if v.name not in produced]  # their token dim is now 1
    del out.graph.value_info[:]
    out.graph.value_info.extend(keep)
    b.insert_into(out)
    res = OutputRowsResult(output, row, op_counts(nodes), cuts, rejected)
    set_metadata_props(out, {OUTPUT_ROWS: json.dumps(res.to_dict(), sort_keys=True)})
    return out, res


