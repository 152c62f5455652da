"""Fuse the plain attention of the non-final ViT blocks into ONNX Runtime's contrib op
`com.microsoft.MultiHeadAttention` (CPU fast path). Pure onnx + numpy.

Matched subgraph (timm Attention as our exporters write it; names are never read):

    P = qkv projection output [B,N,3D]           (MatMul [+ Add bias]; the Add is kept)
      |
    Reshape [B,N,3,H,Dh] -> Transpose(2,0,3,1,4) -> [3,B,H,N,Dh]
      |  Split/Slice(axis 0)+Squeeze | Gather(axis 0): index 0, 1, 2
      +-- q [B,H,N,Dh] --[Mul/Div s_q]---------------------------+
      +-- k [B,H,N,Dh] --[Mul/Div s_k]--Transpose(0,1,3,2)-------+--> MatMul(QK) --[Mul/Div s_l]--> Softmax(-1)
      |                    (or Reshape/Transpose(0,2,1)/Reshape)                                       |
      +-- v [B,H,N,Dh] ----------------------------------------------------------------> MatMul(PV) <--+
                                                                                            |
                                                  Transpose(0,2,1,3) -> Reshape [B,N,D] = context

rewritten as

    P --Split(axis -1, [D,D,D])--> q3, k3, v3 [B,N,D] --> MultiHeadAttention(num_heads=H,
                                                          scale=s_q*s_k*s_l) --> context [B,N,D]

Why this is exact: timm's qkv weight rows are ordered (3, H, Dh), so chunk i of P's last axis is
q/k/v with heads laid out (H, Dh), which is MHA's [B,N,H*Dh] input layout, and MHA returns the
context already in the [B,N,H*Dh] layout that the Transpose+Reshape produced.

Every piece is verified (perms, split indices, reshape targets via onnx shape inference with data
propagation, the scale values, including those computed from Shape(q) chains, evaluated with
onnx's reference evaluator at two different batch/token sizes). A candidate that differs in any
way (a mask/bias Add before Softmax, ops between Softmax and PV, a scale on v, separate q/k/v
projections, an unprovable layout, a non-float32 block) is left alone and its reason recorded.

The final block's attention (the last attention Softmax, anchor.py, as match_final_attention takes
it) and any attention that ITAE rewired (recognised by structure, detect.py) stay untouched, so the
pass runs before or after apply_itae. A graph that
already holds fused attention is not touched at all (a second run fuses 0). The qkv bias Add is left
in place (MHA's `bias` input is not used): the Add is one cheap op and keeping it leaves the qkv
projection as the MatMul + Add pair that int8 quantization handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from .anchor import attention_layout, node_label
from .detect import find_itae_site
from .graph import GraphIndex, infer_weight_free, remove_dead
from .match import MatchError, match_attention_at

PREFIX = "fuse_attention"
MS_DOMAIN = "com.microsoft"
FUSED_OPS = ("MultiHeadAttention", "Attention", "PackedMultiHeadAttention", "GroupQueryAttention")
_SMALL = 64  # elements: shapes, axes, scales; anything bigger is a weight and is never read
_Dim = int | str | None


class FuseReject(Exception):
    """A candidate that must stay unfused; the message is the recorded reason."""


@dataclass
class FusionResult:
    fused: list[dict] = field(default_factory=list)  # one entry per fused block
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (Softmax, reason)
    kept_final: str | None = None  # the final block's Softmax, left untouched
    inserted: list[str] = field(default_factory=list)  # names of the inserted nodes
    note: str = ""  # why nothing was attempted (already fused, no Softmax)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    def summary(self) -> str:
        lines = [f"fused {self.num_fused} attention block(s) into {MS_DOMAIN}.MultiHeadAttention"]
        if self.kept_final:
            lines.append(f"  kept the final block's attention unfused (Softmax {self.kept_final})")
        if self.note:
            lines.append(f"  {self.note}")
        lines += [f"  rejected {name}: {why}" for name, why in self.rejected]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"fused": self.fused, "num_fused": self.num_fused, "kept_final": self.kept_final,
                "rejected": [f"{n}: {r}" for n, r in self.rejected], "note": self.note}


@dataclass
class _Plan:
    softmax: onnx.NodeProto
    qkv: str  # projection output P [B,N,3D]
    context: onnx.NodeProto  # the Reshape to [B,N,D] whose output MHA takes over
    num_heads: int
    head_dim: int
    scale: float
    scale_on: list[str]
    dtype: int
    qk_matmul: onnx.NodeProto  # the Q*K^T MatMul
    q: str  # q [B,H,N,Dh] before its scale
    k: str  # k [B,H,N,Dh] before its transpose and scale
    s_qk: float  # the scale on q and k together (s_q * s_k); the logits' own scale is not in it


# ----------------------------------------------------------------------------- shapes and values
class _Shapes:
    """Static/symbolic dims of every tensor from onnx shape inference (data propagation on) over a
    weight-free copy: small constants (shape targets, scales) stay initializers so that Reshape
    targets propagate, weights become typed inputs and are neither copied nor read."""

    def __init__(self, model: onnx.ModelProto):
        g = model.graph
        # the exporter's value_info is not trusted: layouts are proven from inference alone
        inferred = infer_weight_free(model, keep_small=_SMALL, data_prop=True, keep_value_info=False)
        self.dims: dict[str, list[_Dim]] = {}
        self.types: dict[str, int] = {t.name: t.data_type for t in g.initializer}
        for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            tt = v.type.tensor_type
            if tt.elem_type:
                self.types[v.name] = tt.elem_type
            if tt.HasField("shape"):
                self.dims[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                     for d in tt.shape.dim]

    def of(self, name: str, rank: int, what: str) -> list[_Dim]:
        d = self.dims.get(name)
        if d is None or len(d) != rank:
            found = "unknown" if d is None else f"rank {len(d)}"
            raise FuseReject(f"layout not provable: shape of {what} ({name}) is {found}, expected rank {rank}")
        return d


def _is_small_inline(t: onnx.TensorProto) -> bool:
    return t.data_location != TensorProto.EXTERNAL and int(np.prod(t.dims)) <= _SMALL


def _same(a: _Dim, b: _Dim) -> bool:
    """Provably equal dims: the same static value, or the same symbol."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b and a > 0
    return isinstance(a, str) and a == b


def _static(d: _Dim) -> int | None:
    return d if isinstance(d, int) and d > 0 else None


def _ints(ix: GraphIndex, name: str) -> list[int] | None:
    v = ix.const_value(name) if name else None
    if v is None or v.size > _SMALL:
        return None
    return [int(x) for x in np.ravel(v)]


def _eval_const(ix: GraphIndex, shapes: _Shapes, name: str) -> np.ndarray:
    """Value of a small data-independent tensor: a constant, or computed from Shape/Size of graph
    tensors (torchscript's sqrt(1/sqrt(Dh)) chains). The cone is run with onnx's reference evaluator
    on zero tensors of the inferred shapes, at two sizes for every unknown dim; the value must agree."""
    v = ix.const_value(name)
    if v is not None:
        if v.size > _SMALL:
            raise FuseReject(f"scale {name} is not a scalar")
        return v
    nodes: list[onnx.NodeProto] = []
    inits: dict[str, onnx.TensorProto] = {}
    feeds: dict[str, list[_Dim]] = {}
    stack, seen = [name], set()
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in ix.initializers:
            if not _is_small_inline(ix.initializers[t]):
                raise FuseReject(f"scale {name} depends on a weight ({t})")
            inits[t] = ix.initializers[t]
            continue
        node = ix.producer.get(t)
        if node is None:
            raise FuseReject(f"scale {name} depends on graph input {t}")
        if len(nodes) >= 64:
            raise FuseReject(f"scale {name} is computed by more than 64 nodes")
        if any(n.output[0] == node.output[0] for n in nodes):
            continue
        nodes.append(node)
        if node.op_type in ("Shape", "Size"):
            d = shapes.dims.get(node.input[0])
            if d is None:
                raise FuseReject(f"scale {name} reads the shape of {node.input[0]}, whose shape is unknown")
            feeds[node.input[0]] = d
        else:
            stack.extend(node.input)
    pos = {n.output[0]: i for i, n in enumerate(ix.graph.node) if n.output}
    nodes.sort(key=lambda n: pos.get(n.output[0], 0))
    inputs = [helper.make_tensor_value_info(f, shapes.types.get(f, TensorProto.FLOAT), None) for f in feeds]
    g = helper.make_graph(nodes, "scale", inputs, [helper.make_tensor_value_info(name, 0, None)],
                          initializer=list(inits.values()))
    m = helper.make_model(g, opset_imports=[o for o in ix.model.opset_import if o.domain in ("", "ai.onnx")],
                          ir_version=ix.model.ir_version)
    from onnx.reference import ReferenceEvaluator

    results = []
    for trial in (0, 1):
        symbols: dict = {}
        arrays = {}
        for f, dims in feeds.items():
            shape = []
            for i, d in enumerate(dims):
                if _static(d) is not None:
                    shape.append(d)
                else:
                    key = d if d is not None else (f, i)
                    symbols.setdefault(key, 2 + len(symbols) + 3 * trial)
                    shape.append(symbols[key])
            dt = helper.tensor_dtype_to_np_dtype(shapes.types.get(f, TensorProto.FLOAT))
            arrays[f] = np.zeros(shape, dtype=dt)
        try:
            (out,) = ReferenceEvaluator(m).run(None, arrays)
        except Exception as e:  # noqa: BLE001 - any failure means the value is not provable
            raise FuseReject(f"scale {name} could not be evaluated ({type(e).__name__}: {e})") from e
        results.append(np.asarray(out))
    if results[0].shape != results[1].shape or not np.array_equal(results[0], results[1]):
        raise FuseReject(f"scale {name} depends on the batch or token count ({results[0]} vs {results[1]})")
    return results[0]


# ----------------------------------------------------------------------------- structure
def _scale_factor(ix: GraphIndex, shapes: _Shapes, node: onnx.NodeProto, x: str) -> tuple[str, float] | None:
    """(input, factor) when `node` multiplies/divides `x`'s producer chain by a scalar constant."""
    if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
        return None
    a, b = node.input
    for src, c in ((a, b), (b, a)) if node.op_type == "Mul" else ((a, b),):
        if ix.is_data_independent(c) and not ix.is_data_independent(src):
            val = _eval_const(ix, shapes, c)
            if val.size != 1:
                raise FuseReject(f"{node.op_type} {node.name or node.output[0]} scales by a non-scalar {list(val.shape)}")
            f = float(np.ravel(val)[0])
            if not np.isfinite(f) or f == 0.0:
                raise FuseReject(f"scale {c} is {f}")
            return src, (f if node.op_type == "Mul" else 1.0 / f)
    return None


def _walk_scales(ix: GraphIndex, shapes: _Shapes, name: str, stop: str | None = None) -> tuple[str, float]:
    """Walk up from `name` through scalar Mul/Div and Identity; (tensor reached, product of factors)."""
    factor = 1.0
    for _ in range(8):
        if name == stop:
            break
        node = ix.producer.get(name)
        if node is None:
            break
        if node.op_type == "Identity":
            name = node.input[0]
            continue
        sf = _scale_factor(ix, shapes, node, name)
        if sf is None:
            break
        name, f = sf
        factor *= f
    return name, factor


def _split_source(ix: GraphIndex, t: str) -> tuple[str, int]:
    """t = chunk i of axis 0 of a [3,B,H,N,Dh] tensor: (that tensor, i)."""
    node = ix.producer.get(t)
    what = f"{t}"
    if node is None:
        raise FuseReject(f"layout not provable: {what} is a graph input")
    if node.op_type == "Gather":
        idx = _ints(ix, node.input[1])
        if ix.attr(node, "axis", 0) != 0 or idx is None or len(idx) != 1 or ix.const_dims(node.input[1]) not in ([], None):
            raise FuseReject(f"layout not provable: Gather {node.name} is not a scalar pick on axis 0")
        return node.input[0], idx[0] % 3
    if node.op_type != "Squeeze":
        raise FuseReject(f"layout not provable: {what} comes from {node.op_type}, not Squeeze/Gather of the qkv split")
    axes = _ints(ix, node.input[1]) if len(node.input) > 1 else ix.attr(node, "axes")
    if list(axes or []) != [0]:
        raise FuseReject(f"layout not provable: Squeeze {node.name} axes {axes}, expected [0]")
    src = node.input[0]
    sp = ix.producer.get(src)
    if sp is None:
        raise FuseReject("layout not provable: the squeezed chunk is a graph input")
    if sp.op_type == "Split":
        sizes = _ints(ix, sp.input[1]) if len(sp.input) > 1 and sp.input[1] else ix.attr(sp, "split")
        if ix.attr(sp, "axis", 0) != 0 or len(sp.output) != 3 or (sizes is not None and list(sizes) != [1, 1, 1]):
            raise FuseReject(f"layout not provable: Split {sp.name} is not three unit chunks of axis 0")
        return sp.input[0], list(sp.output).index(src)
    if sp.op_type == "Slice":
        ins = list(sp.input) + [""] * (5 - len(sp.input))
        starts, ends, axes_s, steps = (_ints(ix, i) if i else None for i in ins[1:5])
        if starts is None or ends is None or len(starts) != 1 or (axes_s or [0]) != [0] or (steps or [1]) != [1]:
            raise FuseReject(f"layout not provable: Slice {sp.name} is not a unit-step slice of axis 0")
        i = starts[0]
        if i not in (0, 1, 2) or not (ends[0] == i + 1 or (i == 2 and ends[0] >= 3)):
            raise FuseReject(f"layout not provable: Slice {sp.name} takes [{starts[0]}:{ends[0]}] of axis 0")
        return sp.input[0], i
    raise FuseReject(f"layout not provable: the squeezed chunk comes from {sp.op_type}, not Split/Slice")


def _qkv_projection(ix: GraphIndex, shapes: _Shapes, stacked: str) -> tuple[str, int, int]:
    """stacked = Transpose(2,0,3,1,4)(Reshape(P, [B,N,3,H,Dh])): (P, H, Dh)."""
    tr = ix.producer.get(stacked)
    if tr is None or tr.op_type != "Transpose" or list(ix.attr(tr, "perm") or []) != [2, 0, 3, 1, 4]:
        found = "missing" if tr is None else f"{tr.op_type} perm={ix.attr(tr, 'perm')}"
        raise FuseReject(f"layout not provable: q/k/v are not split from Transpose(2,0,3,1,4) (found {found})")
    rs = ix.producer.get(tr.input[0])
    if rs is None or rs.op_type != "Reshape":
        raise FuseReject("layout not provable: the qkv Transpose does not read a Reshape")
    p = rs.input[0]
    pd = shapes.of(p, 3, "the qkv projection output")
    rd = shapes.of(rs.output[0], 5, "the qkv Reshape")
    three, h, dh = (_static(d) for d in rd[2:])
    if three != 3 or h is None or dh is None:
        raise FuseReject(f"layout not provable: qkv Reshape target {rd}, expected [B,N,3,H,Dh]")
    if _static(pd[2]) != 3 * h * dh or not _same(rd[1], pd[1]):
        # dims 1..4 fixed and the element count preserved => dim 0 is B
        raise FuseReject(f"layout not provable: qkv Reshape {pd} -> {rd} does not keep the token axis")
    return p, h, dh


def _k_source(ix: GraphIndex, shapes: _Shapes, k_t: str) -> tuple[str, float]:
    """k_t = [scale] transpose_last_two([scale] k): (k, factor)."""
    name, factor = _walk_scales(ix, shapes, k_t)
    node = ix.producer.get(name)
    if node is not None and node.op_type == "Transpose":
        if list(ix.attr(node, "perm") or []) != [0, 1, 3, 2]:
            raise FuseReject(f"layout not provable: k Transpose perm {ix.attr(node, 'perm')}, expected [0,1,3,2]")
        name = node.input[0]
    elif node is not None and node.op_type == "Reshape":
        # dynamo: Reshape [B*H,N,Dh] -> Transpose(0,2,1) -> Reshape [B,H,Dh,N]
        tr = ix.producer.get(node.input[0])
        r1 = ix.producer.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
        if r1 is None or r1.op_type != "Reshape" or list(ix.attr(tr, "perm") or []) != [0, 2, 1]:
            raise FuseReject("layout not provable: k^T is a Reshape that is not Reshape/Transpose(0,2,1)/Reshape")
        k = r1.input[0]
        kd = shapes.of(k, 4, "k")
        d1 = shapes.of(r1.output[0], 3, "k merged")
        d2 = shapes.of(node.output[0], 4, "k^T")
        if not (_same(d1[1], kd[2]) and _same(d1[2], kd[3]) and _same(d2[1], kd[1])
                and _same(d2[2], kd[3]) and _same(d2[3], kd[2])):
            raise FuseReject(f"layout not provable: k {kd} -> {d1} -> transpose -> {d2} is not k^T")
        name = k
    else:
        found = "a graph input" if node is None else node.op_type
        raise FuseReject(f"layout not provable: k^T comes from {found}, not a transpose of k")
    name, f2 = _walk_scales(ix, shapes, name)
    return name, factor * f2


def _plan(ix: GraphIndex, shapes: _Shapes, sm: onnx.NodeProto, n_sm: int) -> _Plan:
    try:
        m = match_attention_at(ix, sm, n_sm)
    except MatchError as e:
        raise FuseReject(str(e)) from e
    if ix.attr(sm, "axis", -1 if ix.opset >= 13 else 1) not in (-1, 3):
        # before opset 13 the default axis is 1 and Softmax normalises the flattened trailing axes
        raise FuseReject("Softmax is not over the key axis (-1) alone")
    src, s_logits = _walk_scales(ix, shapes, sm.input[0], stop=m.qk_matmul.output[0])
    if src != m.qk_matmul.output[0]:
        op = ix.producer[src].op_type if src in ix.producer else "a graph input"
        raise FuseReject(f"{op} between Q*K^T and Softmax (an attention mask/bias?); MultiHeadAttention "
                         "here would change the result")
    if m.pv_matmul.input[0] != sm.output[0]:
        raise FuseReject("ops between Softmax and the PV MatMul")
    if [c.output[0] for c in ix.consumers.get(sm.output[0], [])] != [m.pv_matmul.output[0]]:
        raise FuseReject("the attention probabilities are read by more than the PV MatMul")
    t = m.qk_matmul.output[0]
    while True:  # every logit tensor from Q*K^T to the Softmax has that single reader
        readers = ix.consumers.get(t, [])
        if len(readers) != 1 or any(o.name == t for o in ix.graph.output):
            raise FuseReject("the attention logits are read by more than the Softmax")
        if t == sm.input[0]:
            break
        t = readers[0].output[0]
    q, s_q = _walk_scales(ix, shapes, m.qk_matmul.input[0])
    k, s_k = _k_source(ix, shapes, m.qk_matmul.input[1])
    v, s_v = _walk_scales(ix, shapes, m.pv_matmul.input[1])
    if s_v != 1.0:
        raise FuseReject("v is scaled; MultiHeadAttention has no scale for v")
    picks = {}
    for label, t in (("q", q), ("k", k), ("v", v)):
        stacked, i = _split_source(ix, t)
        picks[label] = (stacked, i)
    if len({s for s, _ in picks.values()}) != 1:
        raise FuseReject("q, k, v are not chunks of one fused qkv projection")
    if [i for _, i in picks.values()] != [0, 1, 2]:
        raise FuseReject(f"q, k, v are chunks {[i for _, i in picks.values()]} of the qkv tensor, expected 0, 1, 2")
    p, h, dh = _qkv_projection(ix, shapes, picks["q"][0])
    dtype = shapes.types.get(p, 0)
    if dtype != TensorProto.FLOAT:
        raise FuseReject(f"element type {helper.tensor_dtype_to_string(dtype) if dtype else 'unknown'}; "
                         "only float32 is fused (ONNX Runtime's CPU MultiHeadAttention kernel)")
    # context: PV [B,H,N,Dh] -> Transpose(0,2,1,3) -> Reshape [B,N,D]
    cons = ix.consumers.get(m.pv_matmul.output[0], [])
    tr = cons[0] if len(cons) == 1 else None
    if tr is None or tr.op_type != "Transpose" or list(ix.attr(tr, "perm") or []) != [0, 2, 1, 3]:
        raise FuseReject("layout not provable: the PV MatMul output does not go only to Transpose(0,2,1,3)")
    cons = ix.consumers.get(tr.output[0], [])
    rs = cons[0] if len(cons) == 1 else None
    if rs is None or rs.op_type != "Reshape":
        raise FuseReject("layout not provable: the context Transpose does not go only to a Reshape")
    cd = shapes.of(rs.output[0], 3, "the context Reshape")
    pd = shapes.of(p, 3, "the qkv projection output")
    if not (_same(cd[1], pd[1]) and _static(cd[2]) == h * dh):
        raise FuseReject(f"layout not provable: context Reshape output {cd}, expected [B, N, {h * dh}]")
    scale_on = [s for s, f in (("q", s_q), ("k", s_k), ("logits", s_logits)) if f != 1.0]
    scale = s_q * s_k * s_logits
    if not np.isfinite(scale) or scale <= 0:
        raise FuseReject(f"combined scale {scale} is not a positive number")
    return _Plan(sm, p, rs, h, dh, float(np.float32(scale)), scale_on, dtype, m.qk_matmul, q, k, s_q * s_k)


def _touches_itae(ix: GraphIndex, sm: onnx.NodeProto) -> bool:
    """Does ITAE read or rewrite this attention (its logits, probabilities, q/k/v)? Found from the
    structure ITAE inserts (detect.py), whatever the nodes are called."""
    return find_itae_site(ix, sm) is not None


# ----------------------------------------------------------------------------- the pass
def fuse_attention(model: onnx.ModelProto, *, skip_final: bool = True) -> tuple[onnx.ModelProto, FusionResult]:
    """Return a copy of `model` with every provable non-final attention block replaced by
    com.microsoft.MultiHeadAttention, and what was fused or refused (and why).

    `model` may be loaded with load_external_data=False: only shapes and small constants are read.
    skip_final=False also fuses the final block, unless ITAE edited it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    res = FusionResult()
    fused_nodes = [n for n in out.graph.node if n.op_type in FUSED_OPS]
    if fused_nodes:
        res.note = (f"nothing fused: the graph already holds {len(fused_nodes)} fused attention node(s) "
                    f"({fused_nodes[0].op_type} {fused_nodes[0].name}); run the pass once, on the unfused export")
        return out, res
    softmaxes = [n for n in out.graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        res.note = "nothing fused: the graph has no Softmax"
        return out, res
    ix = GraphIndex(out)
    plans, res.rejected, res.kept_final = plan_attention_blocks(out, ix, skip_final=skip_final)
    if plans:
        _rewrite(out, ix, plans, res)
    return out, res


def plan_attention_blocks(model: onnx.ModelProto, ix: GraphIndex, *, skip_final: bool = True
                          ) -> tuple[list[_Plan], list[tuple[str, str]], str | None]:
    """The proven layout of every plain attention block, in graph order: (plans, rejected
    (Softmax, reason), the final block's Softmax when skip_final left it out). Blocks that ITAE reads
    or rewrites are rejected. Shared with graph_passes.k_transpose."""
    shapes = _Shapes(model)
    layout = attention_layout(model, ix)
    final = layout.final  # the block match_final_attention / ITAE take, found the same way
    plans: list[_Plan] = []
    rejected: list[tuple[str, str]] = []
    kept_final = None
    for v in reversed(layout.verdicts):  # graph order is topological: the final block comes first here
        sm, name = v.node, node_label(v.node)
        if not v.attention:
            rejected.append((name, f"not an attention block: {v.reason}"))
            continue
        if skip_final and final is not None and sm.output[0] == final.output[0]:
            kept_final = name
            continue
        if _touches_itae(ix, sm):
            rejected.append((name, "ITAE nodes read or rewrite this attention; it stays as ITAE left it"))
            continue
        try:
            plans.append(_plan(ix, shapes, sm, layout.num_blocks))
        except FuseReject as e:
            rejected.append((name, str(e)))
    plans.reverse()
    rejected.reverse()
    return plans, rejected, kept_final


def _rewrite(out: onnx.ModelProto, ix: GraphIndex, plans: list[_Plan], res: FusionResult) -> None:
    g = out.graph
    taken = set(ix.producer) | set(ix.initializers) | {i.name for i in g.input}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    drop = set()

    def fresh(hint: str) -> str:
        n, i = f"{PREFIX}/{hint}", 0
        while n in taken:
            i += 1
            n = f"{PREFIX}/{hint}_{i}"
        taken.add(n)
        return n

    before = {i for n in g.node for i in n.input}
    for k, p in enumerate(plans):
        d = p.num_heads * p.head_dim
        tag = f"block{k}"
        split_out = [fresh(f"{tag}/{x}") for x in ("q", "k", "v")]
        if ix.opset >= 13:
            sizes = fresh(f"{tag}/split_sizes")
            new_inits.append(onnx.numpy_helper.from_array(np.array([d, d, d], np.int64), sizes))
            split = helper.make_node("Split", [p.qkv, sizes], split_out, name=fresh(f"{tag}/Split"), axis=-1)
        else:
            split = helper.make_node("Split", [p.qkv], split_out, name=fresh(f"{tag}/Split"), axis=-1, split=[d, d, d])
        mha = helper.make_node("MultiHeadAttention", split_out, [p.context.output[0]], name=fresh(f"{tag}/MultiHeadAttention"),
                               domain=MS_DOMAIN, num_heads=p.num_heads, scale=p.scale)
        new_nodes += [split, mha]
        drop.add(p.context.output[0])
        res.inserted += [split.name, mha.name]
        res.fused.append({"softmax": node_label(p.softmax), "num_heads": p.num_heads,
                          "head_dim": p.head_dim, "scale": p.scale, "scale_on": p.scale_on or ["none"],
                          "node": mha.name})

    kept = [n for n in g.node if not (n.op_type == "Reshape" and n.output[0] in drop)]
    del g.node[:]
    g.node.extend(kept + new_nodes)
    g.initializer.extend(new_inits)
    remove_dead(out, read_before=before)
    if not any(o.domain == MS_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
