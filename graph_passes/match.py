"""Structural match of the final attention block of a ViT ONNX graph.

Anchored on the last Softmax (graph order is topological), never on node names:

    q_proj/qkv ... q --[Mul/Div scale]--+
                                         MatMul(QK) --[Mul/Div scale]--> Softmax --> MatMul(PV) --> ...
    qkv ... k --Transpose--[Mul/Div]-----+                                            ^
    qkv ... v ------------------------------------------------------------------------+

The norm sources are read where their layout is fixed by MatMul semantics, with scales stripped:
q = A operand of the QK MatMul [B,H,T,Dh], k^T = its B operand [B,H,Dh,T], v = B operand of
the PV MatMul [B,H,T,Dh]. That makes the match independent of how the exporter split qkv
(Split, Slice or Gather) or spelled the transpose of k (Transpose, or Reshape/Transpose/Reshape).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .errors import AlreadyPatchedError, MatchError, PassError  # noqa: F401 - re-exported
from .graph import GraphIndex

SCALE_OPS = ("Mul", "Div")
PASSTHROUGH_OPS = ("Cast", "Identity", "Dropout")
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Identity", "Cast")
PROJECTION_OPS = ("MatMul", "Gemm", "Add")
META_SETTINGS_KEY = "itae.settings"
INSERTED_PREFIX = "itae/"


@dataclass
class AttentionMatch:
    softmax: onnx.NodeProto
    qk_matmul: onnx.NodeProto
    pv_matmul: onnx.NodeProto
    logits: str  # Softmax input (scaled logits)
    q: str  # [B,H,T,Dh], before scaling
    k_t: str  # [B,H,Dh,T], before scaling
    v: str  # [B,H,T,Dh]
    scale_on: list[str]  # where the exporter put 1/sqrt(Dh): subset of q, k, logits
    projections: dict[str, str]  # q/k/v -> name of the projection node (same node: fused qkv)
    num_softmax: int
    rejected: list[tuple[str, str]] = field(default_factory=list)
    decomposed: str | None = None  # fused Attention op rewritten into this explicit form (decompose.py)

    @property
    def fused_qkv(self) -> bool:
        return len(set(self.projections.values())) == 1

    def describe(self) -> dict:
        return {
            "softmax": self.softmax.name or self.softmax.output[0],
            "qk_matmul": self.qk_matmul.name or self.qk_matmul.output[0],
            "pv_matmul": self.pv_matmul.name or self.pv_matmul.output[0],
            "q": self.q,
            "k_transposed": self.k_t,
            "v": self.v,
            "scale_on": self.scale_on or ["none"],
            "qkv_projection": "fused" if self.fused_qkv else "separate",
            "projections": self.projections,
            "attention_blocks": self.num_softmax,
            "rejected_candidates": [f"{n}: {r}" for n, r in self.rejected],
        } | ({"decomposed_attention": self.decomposed} if self.decomposed else {})


def already_patched(model: onnx.ModelProto) -> str | None:
    """Why the model counts as patched, or None."""
    for p in model.metadata_props:
        if p.key == META_SETTINGS_KEY:
            return f"its metadata already holds {META_SETTINGS_KEY}={p.value}"
    for n in model.graph.node:
        if n.name.startswith(INSERTED_PREFIX):
            return f"it already contains ITAE nodes (e.g. {n.name})"
    return None


def _strip_scales(ix: GraphIndex, name: str) -> tuple[str, bool]:
    """Walk up through Mul/Div by a data-independent scalar; return (source tensor, scaled?)."""
    scaled = False
    for _ in range(8):
        node = ix.producer.get(name)
        if node is None:
            break
        if node.op_type in SCALE_OPS and len(node.input) == 2:
            a, b = node.input
            if ix.is_scalar_const(b):
                name, scaled = a, True
                continue
            if node.op_type == "Mul" and ix.is_scalar_const(a):
                name, scaled = b, True
                continue
        if node.op_type in PASSTHROUGH_OPS and node.op_type != "Dropout":
            name = node.input[0]
            continue
        break
    return name, scaled


def _find_projection(ix: GraphIndex, name: str) -> str | None:
    """Walk up layout ops to the linear projection that produced `name`."""
    for _ in range(16):
        node = ix.producer.get(name)
        if node is None:
            return None
        if node.op_type in PROJECTION_OPS:
            if node.op_type == "Add":
                # a linear with bias: Add(MatMul(x, W), b); anything else is not a projection
                srcs = [ix.producer.get(i) for i in node.input]
                if not any(s is not None and s.op_type in ("MatMul", "Gemm") for s in srcs):
                    return None
            return node.name or node.output[0]
        if node.op_type not in LAYOUT_OPS:
            return None
        name = node.input[0]
    return None


def _is_nan_guard(ix: GraphIndex, node: onnx.NodeProto, t: str) -> bool:
    """Where(IsNaN(t), const, t): torch's SDPA export zeroes fully-masked rows this way."""
    if node.op_type != "Where" or len(node.input) != 3 or node.input[2] != t:
        return False
    cond = ix.producer.get(node.input[0])
    return cond is not None and cond.op_type == "IsNaN" and cond.input[0] == t and ix.is_data_independent(node.input[1])


def _match_at(ix: GraphIndex, softmax: onnx.NodeProto, num_softmax: int) -> AttentionMatch:
    axis = ix.attr(softmax, "axis", -1)
    if axis not in (-1, 3):
        raise MatchError("softmax", f"Softmax {softmax.name or softmax.output[0]} normalises axis {axis}, not the key axis (-1)")
    logits = softmax.input[0]
    qk_src, logit_scaled = _strip_scales(ix, logits)
    qk = ix.producer.get(qk_src)
    if qk is not None and qk.op_type == "Add" and len(qk.input) == 2:
        # a data-independent additive mask (Hugging Face adds an all-visible 0/-inf bias even
        # without padding): ITAE then acts on the biased logits, which is what Softmax sees
        for x, bias in ((qk.input[0], qk.input[1]), (qk.input[1], qk.input[0])):
            if ix.is_data_independent(bias) and not ix.is_data_independent(x):
                qk_src, scaled = _strip_scales(ix, x)
                logit_scaled = logit_scaled or scaled
                qk = ix.producer.get(qk_src)
                break
    if qk is None or qk.op_type != "MatMul":
        found = qk.op_type if qk is not None else "a graph input"
        raise MatchError("qk-matmul", f"the Softmax input comes from {found}, not from a Q*K^T MatMul (through a scale)")
    q, q_scaled = _strip_scales(ix, qk.input[0])
    k_t, k_scaled = _strip_scales(ix, qk.input[1])
    if ix.is_data_independent(q) or ix.is_data_independent(k_t):
        raise MatchError("qk-matmul", "an operand of the Q*K^T MatMul is a constant (a classifier, not attention)")
    pv = None
    frontier = [softmax.output[0]]
    for _ in range(4):
        nxt = []
        for t in frontier:
            for c in ix.consumers.get(t, []):
                if c.op_type == "MatMul" and c.input[0] == t:
                    pv = c
                elif c.op_type in PASSTHROUGH_OPS or _is_nan_guard(ix, c, t):
                    nxt.append(c.output[0])
        if pv is not None:
            break
        frontier = nxt
    if pv is None:
        raise MatchError("pv-matmul", "the Softmax output does not feed a MatMul with V (attention probabilities @ V)")
    v = pv.input[1]
    projections = {}
    for label, t in (("q", q), ("k", k_t), ("v", v)):
        proj = _find_projection(ix, t)
        if proj is None:
            raise MatchError("qkv-projection", f"{label} does not come from a linear projection through reshapes/splits")
        projections[label] = proj
    scale_on = [s for s, on in (("q", q_scaled), ("k", k_scaled), ("logits", logit_scaled)) if on]
    return AttentionMatch(softmax, qk, pv, logits, q, k_t, v, scale_on, projections, num_softmax)


def match_final_attention(model: onnx.ModelProto, ix: GraphIndex | None = None) -> AttentionMatch:
    """Match the final attention block; try Softmax nodes from the last one backwards so that a
    classifier Softmax after the blocks is skipped (and reported as a rejected candidate)."""
    from .decompose import decompose_final_attention, final_fused_attention

    if final_fused_attention(model) is not None:
        # opset >= 23 fused Attention with no Softmax after it: match its exact decomposition in a
        # copy (apply_itae decomposes its own copy first, so it never gets here)
        explicit = onnx.ModelProto()
        explicit.CopyFrom(model)
        name = decompose_final_attention(explicit)
        m = match_final_attention(explicit)
        m.decomposed = name
        return m
    ix = ix or GraphIndex(model)
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    if not softmaxes:
        raise MatchError("softmax", "the graph has no Softmax node, so no attention block; is this a ViT graph?")
    # blocks still fused (opset >= 23 Attention before the decomposed final one) count too
    num_blocks = len(softmaxes) + sum(n.op_type in ("Attention", "MultiHeadAttention") for n in model.graph.node)
    rejected: list[tuple[str, str]] = []
    for sm in reversed(softmaxes):
        try:
            m = _match_at(ix, sm, num_blocks)
            m.rejected = rejected
            return m
        except MatchError as e:
            rejected.append((sm.name or sm.output[0], str(e)))
            last_error = e
    raise MatchError(
        last_error.step,
        f"no Softmax matched an attention block; last candidate: {last_error.reason}"
        + (f" (also rejected {len(rejected) - 1} other Softmax)" if len(rejected) > 1 else ""),
        "itae-inspect prints every rejected candidate",
    )


TOKEN_AXIS = (1, -2)
# ops whose inputs after the first are shapes, indices or sizes: a token tensor flows through input 0 only
PARAM_INPUT_OPS = ("Expand", "Reshape", "Slice", "Tile", "Resize", "Pad", "Unsqueeze", "Squeeze", "Gather",
                   "Split", "Transpose", "Flatten", "Upsample")
# per-token ops between the token Concat and the blocks (position-embedding Add, dtype casts, norms)
TOKENWISE_OPS = ("Add", "Sub", "Mul", "Div", "Cast", "Identity", "Dropout", "LayerNormalization")
_UNBOUNDED = 2**30


def _prefix_from_concat(ix: GraphIndex) -> int | None:
    """Count the CLS/register tokens at the input of the first attention block.

    The token sequence is built by Concat(s) on axis 1 before the first Softmax/Attention; exactly
    one input of each carries the patch embeddings (it reaches the patch-embedding Conv through
    data inputs), the others are learned [1, k, D] token tensors (maybe expanded). Some exporters
    build it in two steps: Hugging Face's registers model concatenates [CLS, patches], adds the
    position embeddings, then splices the registers in with Concat(x[:, :1], registers, x[:, 1:]);
    `_stream_prefix` follows the prefix through such Slices. The last patch-carrying token Concat
    before the blocks wins.
    """
    convs = [n for n in ix.graph.node if n.op_type == "Conv"]
    if not convs:
        return None
    conv_out = convs[0].output[0]
    found = None
    for node in ix.graph.node:
        if node.op_type in ("Softmax", "Attention", "MultiHeadAttention"):
            break
        if node.op_type == "Concat" and ix.attr(node, "axis") in TOKEN_AXIS and len(node.input) >= 2:
            p = _stream_prefix(ix, node.output[0], conv_out)
            if p is not None and p > 0:
                found = p
    return found


def _stream_prefix(ix: GraphIndex, name: str, conv_out: str, depth: int = 0) -> int | None:
    """Prefix tokens ahead of the patches in token tensor `name` (0 for the bare patch tokens);
    None when `name` does not carry the patches or the layout cannot be read."""
    if depth > 40 or not _reaches(ix, name, conv_out):
        return None
    if name == conv_out:
        return 0
    node = ix.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Concat":
        if ix.attr(node, "axis") not in TOKEN_AXIS:
            return None
        total, prefix = 0, None
        for t in node.input:
            if _reaches(ix, t, conv_out):
                sl = _prefix_slice(ix, t, conv_out, depth)
                if sl is not None:  # a slice of the prefix (CLS re-inserted ahead of the registers)
                    total += sl
                    continue
                if prefix is not None:
                    return None  # two patch-carrying inputs: not a token Concat we understand
                inner = _stream_prefix(ix, t, conv_out, depth + 1)
                if inner is None:
                    return None
                prefix = total + inner
                continue
            if prefix is None:
                k = _token_count(ix, t)
                if k is None:
                    return None
                total += k
            # tokens after the patches are not prefix tokens
        return prefix
    if node.op_type == "Slice":
        bounds = _slice_bounds(ix, node)
        if bounds is None:
            return None
        start, end = bounds
        inner = _stream_prefix(ix, node.input[0], conv_out, depth + 1)
        if inner is None or end < _UNBOUNDED or start > inner:
            return None
        return inner - start
    if node.op_type in TOKENWISE_OPS:
        carriers = [i for i in node.input if i and _reaches(ix, i, conv_out)]
        return _stream_prefix(ix, carriers[0], conv_out, depth + 1) if len(carriers) == 1 else None
    if node.op_type in ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"):
        # Conv [B,D,h,w] -> [B,D,N] -> [B,N,D]: the bare patch tokens
        return _stream_prefix(ix, node.input[0], conv_out, depth + 1)
    return None


def _slice_bounds(ix: GraphIndex, node: onnx.NodeProto) -> tuple[int, int] | None:
    """(start, end) of a unit-step Slice on the token axis; end >= _UNBOUNDED when open-ended."""
    if len(node.input) >= 3:
        vals = [ix.const_value(i) if i else None for i in list(node.input[1:5]) + [""] * (5 - len(node.input))]
        starts, ends, axes, steps = vals
    else:  # opset < 10: attributes
        starts, ends, axes, steps = (ix.attr(node, a) for a in ("starts", "ends", "axes", "steps"))
    if starts is None or ends is None or np.size(starts) != 1:
        return None
    axis = int(np.ravel(axes)[0]) if axes is not None else 0
    if axis not in TOKEN_AXIS or (steps is not None and int(np.ravel(steps)[0]) != 1):
        return None
    start, end = int(np.ravel(starts)[0]), int(np.ravel(ends)[0])
    if start < 0 or end < 0:
        return None  # counted from the end: depends on the number of patches
    return start, end


def _prefix_slice(ix: GraphIndex, name: str, conv_out: str, depth: int) -> int | None:
    """Token count of `name` when it is a bounded Slice lying inside the prefix of a token tensor."""
    node = ix.producer.get(name)
    if node is None or node.op_type != "Slice":
        return None
    bounds = _slice_bounds(ix, node)
    if bounds is None or bounds[1] >= _UNBOUNDED:
        return None
    inner = _stream_prefix(ix, node.input[0], conv_out, depth + 1)
    if inner is None or bounds[1] > inner:
        return None
    return bounds[1] - bounds[0]


def _reaches(ix: GraphIndex, name: str, target: str, depth: int = 40) -> bool:
    """Does `name` depend on `target` through data inputs? Shapes, indices and sizes do not count:
    Expand(cls_token, Shape(patches)) is still a learned token, not the patches."""
    stack, seen = [(name, 0)], set()
    while stack:
        t, d = stack.pop()
        if t == target:
            return True
        if t in seen or d > depth:
            continue
        seen.add(t)
        node = ix.producer.get(t)
        if node is None or node.op_type in ("Shape", "Size", "ConstantOfShape"):
            continue
        inputs = node.input[:1] if node.op_type in PARAM_INPUT_OPS else node.input
        stack.extend((i, d + 1) for i in inputs if i)
    return False


def _token_count(ix: GraphIndex, name: str) -> int | None:
    for _ in range(10):
        dims = ix.const_dims(name)
        if dims is not None:
            return dims[1] if len(dims) == 3 else None
        node = ix.producer.get(name)
        if node is None or node.op_type not in ("Expand", "Tile", "Identity", "Cast", "Add", "Concat"):
            return None
        if node.op_type == "Concat":
            counts = [_token_count(ix, i) for i in node.input]
            return None if any(c is None for c in counts) else sum(counts)  # type: ignore[misc]
        if node.op_type == "Add":
            # cls_token + its position embedding: both [1, 1, D]
            name = next((i for i in node.input if ix.const_dims(i) is not None), node.input[0])
            continue
        name = node.input[0]
    return None


def infer_num_prefix_tokens(model: onnx.ModelProto, ix: GraphIndex | None = None) -> int | None:
    """CLS + registers, from our own metadata, else from the token Concat."""
    for p in model.metadata_props:
        if p.key == "itae_export.num_prefix_tokens":
            return int(p.value)
    return _prefix_from_concat(ix or GraphIndex(model))
