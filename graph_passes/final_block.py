"""The final transformer block of a ViT graph, found by structure: every node at or after the
LayerNormalization that feeds the final attention's qkv projection and depends on it (attention,
ITAE, projection, residual adds, MLP, final norm). The CPU fast paths keep it in fp32.

    block input x ──> LayerNormalization ──> qkv MatMul ──> ... final attention (+ ITAE) ...
       └──────────────────────────────────────────> Add (residual) ──> LayerNorm ──> MLP ──> Add ──> ...
"""

from __future__ import annotations

import onnx

from .errors import MatchError
from .graph import GraphIndex
from .match import match_final_attention

WEIGHT_OPS = ("MatMul", "Gemm")  # ops whose weights a quantizer would touch


def final_layernorm(model: onnx.ModelProto, ix: GraphIndex) -> onnx.NodeProto:
    """The LayerNormalization that feeds the final attention's qkv projection (found from the
    graph's structure, not from weight names)."""
    m = match_final_attention(model, ix)  # matches through the ITAE nodes of a patched graph too
    proj = next((n for n in model.graph.node if (n.name or n.output[0]) == m.projections["q"]), None)
    if proj is None:
        raise MatchError("final-block", f"the qkv projection {m.projections['q']} is not a node of the graph")
    starts, what = list(proj.output[:1]), f"the qkv projection {m.projections['q']}"
    ln = _nearest_upstream(ix, starts, "LayerNormalization")
    if ln is None or not any(c.op_type in ("MatMul", "Gemm") for c in ix.consumers.get(ln.output[0], [])):
        raise MatchError(
            "final-block",
            f"no LayerNormalization op feeding a projection found above {what}",
            "the fast path needs a fused LayerNormalization (opset >= 17, as itae-export writes); "
            "run without --fast-path for this graph",
        )
    return ln


def _nearest_upstream(ix: GraphIndex, starts: list[str], op_type: str, max_depth: int = 24) -> onnx.NodeProto | None:
    """Breadth-first walk up the data inputs from `starts` to the closest node of `op_type`."""
    frontier, seen = list(starts), set(starts)
    for _ in range(max_depth):
        nxt = []
        for t in frontier:
            node = ix.producer.get(t)
            if node is None:
                continue
            if node.op_type == op_type:
                return node
            for i in node.input:
                if i and i not in seen and not ix.is_data_independent(i):
                    seen.add(i)
                    nxt.append(i)
        frontier = nxt
    return None


def final_block_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the nodes of the final transformer block, the ITAE nodes in it included.

    The final block starts at the LayerNormalization feeding the final attention's qkv projection;
    it is every node at or after it in graph (topological) order that depends on that norm's
    output or on the residual tensor it reads (the block input): attention, ITAE, projection,
    residual adds, MLP, and the final norm / CLS selection after the block.
    """
    ix = GraphIndex(model)
    ln = final_layernorm(model, ix)
    nodes = list(model.graph.node)
    # protobuf wrappers are not identical objects across accesses: compare by output name
    start = next(i for i, n in enumerate(nodes) if n.output[0] == ln.output[0])
    live = {ln.input[0]}
    block: list[onnx.NodeProto] = []
    for n in nodes[start:]:
        if any(i in live for i in n.input if i):
            block.append(n)
            live.update(o for o in n.output if o)
    unnamed = [n.output[0] for n in block if not n.name and n.op_type in WEIGHT_OPS]
    if unnamed:
        raise MatchError("final-block", f"final-block {unnamed[0]} node has no name, so it cannot be excluded "
                         "from quantization", "name the graph's nodes (every torch exporter does)")
    return {n.name for n in block if n.name}
