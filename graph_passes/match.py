"""Structural match of the final attention block of a ViT ONNX graph.

The final block is found structurally (anchor.py): the last attention Softmax in graph
(topological) order, never a node name. A classifier Softmax after the blocks is not attention and
is skipped (reported as a rejected candidate); when the final attention Softmax itself does not
match, the match fails with a MatchError naming the step. It never falls back to an earlier block.

    q_proj/qkv ... q --[Mul/Div scale]--+
                                         MatMul(QK) --[Mul/Div scale][+ mask]--> Softmax --> MatMul(PV) --> ...
    qkv ... k --Transpose--[Mul/Div]-----+                                                   ^
    qkv ... v -------------------------------------------------------------------------------+

The norm sources are read where their layout is fixed by MatMul semantics, with scales stripped:
q = A operand of the QK MatMul [B,H,T,Dh], k^T = its B operand [B,H,Dh,T], v = B operand of
the PV MatMul [B,H,T,Dh]. That makes the match independent of how the exporter split qkv
(Split, Slice or Gather) or spelled the transpose of k (Transpose, or Reshape/Transpose/Reshape).

A Softmax that ITAE already rewired (detect.py) is matched through the ITAE nodes, so that
inspection of a patched graph still reports its final block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .anchor import attention_layout, consumer_matmul, node_label
from .decompose import decompose_final_attention, final_fused_attention
from .detect import ItaeSite, PatchInfo, already_patched, find_itae_site  # noqa: F401 - re-exported
from .errors import AlreadyPatchedError, MatchError, PassError  # noqa: F401 - re-exported
from .graph import GraphIndex
from .metadata import ITAE_SETTINGS, metadata_field

SCALE_OPS = ("Mul", "Div")
PASSTHROUGH_OPS = ("Cast", "Identity", "Dropout")
LAYOUT_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Split", "Slice", "Gather", "Identity", "Cast")
PROJECTION_OPS = ("MatMul", "Gemm", "Add")
META_SETTINGS_KEY = ITAE_SETTINGS  # compatibility: the key lives in metadata.py
INSERTED_PREFIX = "itae/"  # names of the nodes apply_itae inserts (for readers; detection is structural)
FINAL_ONLY_HINT = ("ITAE patches only the final attention block and never an earlier one; "
                   "itae-inspect prints every candidate")


@dataclass
class AttentionMatch:
    softmax: onnx.NodeProto
    qk_matmul: onnx.NodeProto
    pv_matmul: onnx.NodeProto
    logits: str  # Softmax input (scaled logits), before ITAE when the block is patched
    q: str  # [B,H,T,Dh], before scaling
    k_t: str  # [B,H,Dh,T], before scaling
    v: str  # [B,H,T,Dh]
    scale_on: list[str]  # where the exporter put 1/sqrt(Dh): subset of q, k, logits
    projections: dict[str, str]  # q/k/v -> name of the projection node (same node: fused qkv)
    num_softmax: int  # attention blocks in the graph
    rejected: list[tuple[str, str]] = field(default_factory=list)
    decomposed: str | None = None  # fused Attention op rewritten into this explicit form (decompose.py)
    block_index: int | None = None  # 0-based index of this block among the attention blocks
    itae: ItaeSite | None = None  # the ITAE subgraph already at this Softmax, if any

    @property
    def fused_qkv(self) -> bool:
        return len(set(self.projections.values())) == 1

    def describe(self) -> dict:
        out = {
            "softmax": node_label(self.softmax),
            "qk_matmul": node_label(self.qk_matmul),
            "pv_matmul": node_label(self.pv_matmul),
            "q": self.q,
            "k_transposed": self.k_t,
            "v": self.v,
            "scale_on": self.scale_on or ["none"],
            "qkv_projection": "fused" if self.fused_qkv else "separate",
            "projections": self.projections,
            "attention_blocks": self.num_softmax,
            "final_block_index": self.block_index,
            "rejected_candidates": [f"{n}: {r}" for n, r in self.rejected],
        }
        if self.decomposed:
            out["decomposed_attention"] = self.decomposed
        if self.itae is not None:
            out["itae_site"] = self.itae.describe()
        return out


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


def _match_qk(ix: GraphIndex, logits: str) -> tuple[onnx.NodeProto, str, str, list[str]]:
    """Step qk-matmul: logits = [scale](Q*K^T) [+ data-independent mask]; (MatMul, q, k^T, scale_on)."""
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
    scale_on = [s for s, on in (("q", q_scaled), ("k", k_scaled), ("logits", logit_scaled)) if on]
    return qk, q, k_t, scale_on


def _match_pv(ix: GraphIndex, probs: str) -> onnx.NodeProto:
    """Step pv-matmul: the probabilities (through casts / the SDPA NaN guard) feed MatMul(p, V)."""
    mm = consumer_matmul(ix, probs, lambda c, t: c.op_type in PASSTHROUGH_OPS or _is_nan_guard(ix, c, t))
    if mm is None:
        raise MatchError("pv-matmul", "the Softmax output does not feed a MatMul with V (attention probabilities @ V)")
    return mm


def _match_projections(ix: GraphIndex, q: str, k_t: str, v: str) -> dict[str, str]:
    """Step qkv-projection: q, k^T and v come from linear projections through layout ops."""
    projections = {}
    for label, t in (("q", q), ("k", k_t), ("v", v)):
        proj = _find_projection(ix, t)
        if proj is None:
            raise MatchError("qkv-projection", f"{label} does not come from a linear projection through reshapes/splits")
        projections[label] = proj
    return projections


def match_attention_at(ix: GraphIndex, softmax: onnx.NodeProto, num_blocks: int) -> AttentionMatch:
    """Match the attention block around `softmax` (steps softmax, qk-matmul, pv-matmul,
    qkv-projection); raises MatchError naming the step that failed. An ITAE subgraph already at this
    Softmax is seen through (AttentionMatch.itae)."""
    axis = ix.attr(softmax, "axis", -1)
    if axis not in (-1, 3):
        raise MatchError("softmax", f"Softmax {node_label(softmax)} normalises axis {axis}, not the key axis (-1)")
    site = find_itae_site(ix, softmax)
    logits = site.logits if site is not None else softmax.input[0]
    qk, q, k_t, scale_on = _match_qk(ix, logits)
    pv = _match_pv(ix, site.probs if site is not None else softmax.output[0])
    v = pv.input[1]
    projections = _match_projections(ix, q, k_t, v)
    return AttentionMatch(softmax, qk, pv, logits, q, k_t, v, scale_on, projections, num_blocks, itae=site)


def _match_decomposed(model: onnx.ModelProto) -> AttentionMatch:
    """opset >= 23 fused Attention with no attention Softmax after it: match its exact decomposition
    in a copy (apply_itae decomposes its own copy first, so it never gets here)."""
    explicit = onnx.ModelProto()
    explicit.CopyFrom(model)
    name = decompose_final_attention(explicit)
    m = match_final_attention(explicit)
    m.decomposed = name
    return m


def match_final_attention(model: onnx.ModelProto, ix: GraphIndex | None = None, *,
                          inferred: onnx.ModelProto | None = None) -> AttentionMatch:
    """Match the final attention block: the last attention Softmax (anchor.py). Non-attention
    Softmax nodes after it (a classifier head) are skipped and reported in `rejected`; when the
    final attention does not match, MatchError names the failed step (never an earlier block)."""
    if final_fused_attention(model) is not None:
        return _match_decomposed(model)
    ix = ix or GraphIndex(model)
    layout = attention_layout(model, ix, inferred=inferred)
    if not layout.verdicts:
        raise MatchError("softmax", "the graph has no Softmax node, so no attention block; is this a ViT graph?")
    rejected = [(node_label(v.node), f"not an attention block: {v.reason}") for v in layout.after_final()]
    final = layout.final
    if final is None:
        last = layout.verdicts[-1]
        others = len(layout.verdicts) - 1
        raise MatchError(
            last.step,
            "no Softmax is attention (4-D logits from a Q*K^T MatMul, feeding a MatMul with V); the last, "
            f"{node_label(last.node)}: {last.reason}" + (f" (and {others} other Softmax)" if others else ""),
            "itae-inspect prints every rejected candidate",
        )
    idx = layout.block_index(final)
    try:
        m = match_attention_at(ix, final, layout.num_blocks)
    except MatchError as e:
        raise MatchError(
            e.step,
            f"the final attention block (block {idx} of {layout.num_blocks}, Softmax {node_label(final)}) does "
            f"not match: {e.reason}",
            FINAL_ONLY_HINT,
        ) from e
    m.rejected = rejected
    m.block_index = idx
    return m


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
    """CLS + registers, from our own metadata (metadata.NUM_PREFIX_TOKENS, legacy spelling
    accepted), else from the token Concat."""
    recorded = metadata_field(model, "num_prefix_tokens")
    if recorded is not None:
        return recorded
    return _prefix_from_concat(ix or GraphIndex(model))
