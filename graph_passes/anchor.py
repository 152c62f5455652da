"""Which Softmax nodes are attention, and which attention block is the final one (structure only,
never node names). Shared by match.py, detect.py, decompose.py and fuse_attention.py.

A Softmax is an attention Softmax when its input is 4-D (or of unknown rank) and it sits between
the two attention MatMuls, i.e. at least one of

    MatMul(a, b) --[Mul/Div/Add/Where/Cast/Reshape ...]--> Softmax          (Q*K^T: a and b computed)
    Softmax --[Cast/Identity/Where/Mul/Div ...]--> MatMul(probs, v)         (v computed)

holds. A classifier Softmax after the blocks (logits from MatMul(x, W) with a constant W, or on a
[B, classes] tensor) is not one. Requiring only one side keeps a broken final attention (its PV
MatMul replaced, a data-dependent mask Add before it) a candidate, so that the pass refuses it
instead of falling back to an earlier block.

The attention blocks, in graph (topological) order, are the attention Softmax nodes plus fused
attention nodes (ONNX `Attention`, onnxruntime contrib attention ops); the final block is the last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import onnx

from .graph import GraphIndex, infer_weight_free

CONTRIB_DOMAIN = "com.microsoft"
CONTRIB_ATTENTION_OPS = (
    "Attention",
    "MultiHeadAttention",
    "PackedAttention",
    "PackedMultiHeadAttention",
    "GroupQueryAttention",
    "DecoderMaskedMultiHeadAttention",
    "DecoderMaskedSelfAttention",
    "SparseAttention",
)
SCORE_OPS = ("MatMul", "Gemm", "Einsum")
# ops the logits may pass through between Q*K^T and Softmax (scales, masks, softcap, casts, layout)
LOGIT_PATH_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity", "Dropout", "Clip", "Tanh", "Neg",
                  "Max", "Min", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Expand")
# ops the probabilities may pass through between Softmax and the PV MatMul
PROB_PATH_OPS = ("Cast", "Identity", "Dropout", "Where", "Mul", "Div", "Reshape", "Squeeze", "Unsqueeze")
_WALK_DEPTH = 8


def is_onnx_attention(node: onnx.NodeProto) -> bool:
    return node.op_type == "Attention" and node.domain in ("", "ai.onnx")


def is_contrib_attention(node: onnx.NodeProto) -> bool:
    return node.domain == CONTRIB_DOMAIN and node.op_type in CONTRIB_ATTENTION_OPS


def is_fused_attention(node: onnx.NodeProto) -> bool:
    return is_onnx_attention(node) or is_contrib_attention(node)


def node_label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


@dataclass(frozen=True)
class SoftmaxVerdict:
    """Is this Softmax attention? When not, `step` and `reason` say which requirement failed."""

    node: onnx.NodeProto
    attention: bool
    step: str = ""
    reason: str = ""


@dataclass
class AttentionLayout:
    """Every Softmax with its verdict, and the attention blocks in graph order."""

    verdicts: list[SoftmaxVerdict]
    units: list[onnx.NodeProto]  # one node per attention block: its Softmax or its fused attention op
    nodes: tuple[onnx.NodeProto, ...] = ()  # the graph's nodes, in order

    @property
    def num_blocks(self) -> int:
        return len(self.units)

    @property
    def final(self) -> onnx.NodeProto | None:
        return self.units[-1] if self.units else None

    @property
    def attention_softmaxes(self) -> list[onnx.NodeProto]:
        return [v.node for v in self.verdicts if v.attention]

    def block_index(self, node: onnx.NodeProto) -> int | None:
        """0-based index (from the input) of the block whose unit is `node` (compared by output)."""
        key = node.output[0]
        return next((i for i, u in enumerate(self.units) if u.output[0] == key), None)

    def verdict(self, node: onnx.NodeProto) -> SoftmaxVerdict | None:
        key = node.output[0]
        return next((v for v in self.verdicts if v.node.output[0] == key), None)

    def after_final(self) -> list[SoftmaxVerdict]:
        """The non-attention Softmax nodes after the final block (classifier heads), last first."""
        order = {n.output[0]: i for i, n in enumerate(self.nodes) if n.output}
        last = order.get(self.final.output[0], -1) if self.final is not None else -1
        return [v for v in reversed(self.verdicts) if not v.attention and order.get(v.node.output[0], 0) > last]


def score_matmul(ix: GraphIndex, logits: str) -> tuple[onnx.NodeProto | None, str]:
    """The Q*K^T MatMul (two computed operands) above `logits`, or (None, why not)."""
    frontier, seen = [logits], {logits}
    const_mm: onnx.NodeProto | None = None
    first = ix.producer.get(logits)
    for _ in range(_WALK_DEPTH):
        nxt = []
        for t in frontier:
            node = ix.producer.get(t)
            if node is None:
                continue
            if node.op_type in SCORE_OPS:
                data = [i for i in node.input[:2] if i and not ix.is_data_independent(i)]
                if len(data) == 2:
                    return node, ""
                const_mm = const_mm or node
                continue
            if node.op_type in LOGIT_PATH_OPS:
                for i in node.input:
                    if i and i not in seen and not ix.is_data_independent(i):
                        seen.add(i)
                        nxt.append(i)
        frontier = nxt
    if const_mm is not None:
        return None, (f"its input comes from {const_mm.op_type} {node_label(const_mm)} with a constant operand "
                      "(a classifier head, not attention)")
    if first is None:
        return None, "its input is a graph input or constant, not Q*K^T scores"
    return None, f"no Q*K^T MatMul (two computed operands) above it (its input comes from {first.op_type})"


def _value_matmul(ix: GraphIndex, probs: str) -> onnx.NodeProto | None:
    """The MatMul(probabilities, v) below `probs` (v computed), or None."""
    frontier, seen = [probs], {probs}
    for _ in range(_WALK_DEPTH):
        nxt = []
        for t in frontier:
            for c in ix.consumers.get(t, []):
                if c.op_type in SCORE_OPS and t in c.input[:1] and len(c.input) > 1 \
                        and not ix.is_data_independent(c.input[1]):
                    return c
                if c.op_type in PROB_PATH_OPS:
                    for o in c.output:
                        if o and o not in seen:
                            seen.add(o)
                            nxt.append(o)
        frontier = nxt
    return None


def classify_softmax(ix: GraphIndex, sm: onnx.NodeProto, rank: int | None) -> SoftmaxVerdict:
    score, why = score_matmul(ix, sm.input[0])
    value = _value_matmul(ix, sm.output[0])
    if score is None and value is None:
        return SoftmaxVerdict(sm, False, "qk-matmul", why + "; and its output feeds no MatMul with V")
    if rank is not None and rank != 4:
        why_rank = f"it normalises a rank-{rank} tensor, not 4-D [B,H,T,T] attention logits"
        if score is None:  # name the first structural step that fails
            return SoftmaxVerdict(sm, False, "qk-matmul", f"{why}; {why_rank}")
        return SoftmaxVerdict(sm, False, "softmax", why_rank)
    return SoftmaxVerdict(sm, True)


def tensor_ranks(model: onnx.ModelProto, names: list[str], inferred: onnx.ModelProto | None = None) -> dict[str, int]:
    """Ranks of `names` from the graph's value_info, else from weight-free shape inference (best
    effort: a name whose rank stays unknown is left out). `inferred`: an inference already made for
    this graph (infer_weight_free), reused instead of inferring again."""
    g = model.graph
    ranks: dict[str, int] = {}
    for v in list(g.value_info) + list(g.input) + list(g.output):
        tt = v.type.tensor_type
        if v.name in names and tt.HasField("shape"):
            ranks[v.name] = len(tt.shape.dim)
    missing = [n for n in names if n not in ranks]
    if missing:
        inferred = inferred if inferred is not None else infer_weight_free(model)
        for v in list(inferred.graph.value_info) + list(inferred.graph.output):
            tt = v.type.tensor_type
            if v.name in missing and tt.HasField("shape"):
                ranks[v.name] = len(tt.shape.dim)
    return ranks


def attention_layout(model: onnx.ModelProto, ix: GraphIndex | None = None, *,
                     inferred: onnx.ModelProto | None = None) -> AttentionLayout:
    """Classify every Softmax and list the attention blocks of `model` in graph order."""
    ix = ix or GraphIndex(model)
    nodes = tuple(model.graph.node)
    softmaxes = [n for n in nodes if n.op_type == "Softmax"]
    ranks = tensor_ranks(model, [sm.input[0] for sm in softmaxes], inferred) if softmaxes else {}
    verdicts = [classify_softmax(ix, sm, ranks.get(sm.input[0])) for sm in softmaxes]
    attention = {v.node.output[0] for v in verdicts if v.attention}
    units = [n for n in nodes if (n.op_type == "Softmax" and n.output[0] in attention) or is_fused_attention(n)]
    return AttentionLayout(verdicts, units, nodes)


def consumer_matmul(ix: GraphIndex, t: str, passes: Callable[[onnx.NodeProto, str], bool],
                    depth: int = 4) -> onnx.NodeProto | None:
    """The MatMul that reads `t` (the attention probabilities) as its first operand, following
    consumers through the nodes `passes(node, tensor)` accepts (casts, the SDPA NaN guard), or None."""
    frontier = [t]
    for _ in range(depth):
        nxt = []
        for name in frontier:
            for c in ix.consumers.get(name, []):
                if c.op_type == "MatMul" and c.input[0] == name:
                    return c
                if passes(c, name):
                    nxt.append(c.output[0])
        frontier = nxt
    return None
