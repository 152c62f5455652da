"""One transpose for k: the non-final attention blocks get K^T as a single 4-D Transpose of k,
with the attention scale on q alone. Pure onnx + numpy.

The dynamo exporter writes torch's attention with k^T built through a 3-D detour and the scale
split as sqrt(scale) on each side:

    q [B,H,N,Dh] ──Mul(sqrt s)──────────────────────────────────────────────┐
    k [B,H,N,Dh] ──Reshape [B*H,N,Dh]──Transpose(0,2,1)──Reshape [B,H,Dh,N]──Mul(sqrt s)──> MatMul(QK) ──> Softmax ...

rewritten as

    q ──Mul(s)──────────────────┐
    k ──Transpose(0,1,3,2)──────> MatMul(QK) ──> Softmax ...                 (the same attention)

Runtimes fold a transpose of the last two axes into the matrix multiply (OpenVINO's MatMul
transpose_b, its fused attention), so k^T is no longer copied, and one scale multiply goes away.
ONNX Runtime fp32 and OpenVINO with the bf16 hint alone ran ViT-L/14 4 to 6% faster with it; the
bf16 IR with f32 islands did not gain (docs/performance.md).
q*sqrt(s) times k*sqrt(s) equals q*s times k up to float rounding (measured max abs 2e-6 on ViT-L).

Match and check: the layout of each attention block is proven by fuse_attention's planning
(plan_attention_blocks: q, k and v chunks of one qkv projection, the scales evaluated, the final
block and any block ITAE reads left out, float32 only). Refused with a reason: a block whose k^T
is already one Transpose feeding the MatMul with no scale on k (nothing to gain). Rewrite: one Mul
and one Transpose per block, the MatMul rewired to them, the dead detour removed (graph.remove_dead).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx

from .anchor import node_label
from .fuse_attention import plan_attention_blocks
from .graph import Builder, GraphIndex, remove_dead
from .metadata import K_TRANSPOSE, set_metadata_props

PREFIX = "k_transpose"


@dataclass
class KTransposeResult:
    rewritten: list[dict] = field(default_factory=list)  # one entry per block: Softmax, scale
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (Softmax, reason)
    kept_final: str | None = None  # the final block's Softmax, left as it is
    inserted: list[str] = field(default_factory=list)

    @property
    def num_rewritten(self) -> int:
        return len(self.rewritten)

    def summary(self) -> str:
        lines = [f"k^T as one Transpose of k, the attention scale on q, in {self.num_rewritten} attention block(s)"]
        if self.kept_final:
            lines.append(f"  kept the final block's attention as it is (Softmax {self.kept_final})")
        lines += [f"  left {name}: {why}" for name, why in self.rejected]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"rewritten": self.num_rewritten, "blocks": self.rewritten, "kept_final": self.kept_final,
                "rejected": [f"{n}: {r}" for n, r in self.rejected]}


def _is_single_transpose(ix: GraphIndex, k_t: str, k: str) -> bool:
    node = ix.producer.get(k_t)
    return (node is not None and node.op_type == "Transpose" and node.input[0] == k
            and list(ix.attr(node, "perm") or []) == [0, 1, 3, 2])


def canonical_k_transpose(model: onnx.ModelProto) -> tuple[onnx.ModelProto, KTransposeResult]:
    """A copy of `model` with every provable non-final attention block's k^T rewritten (match, check,
    rewrite); what was rewritten or left (and why). Weights are never read: `model` may be loaded
    with load_external_data=False."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ix = GraphIndex(out)
    plans, rejected, kept_final = plan_attention_blocks(out, ix)
    res = KTransposeResult(rejected=rejected, kept_final=kept_final)
    todo = []
    for p in plans:
        if _is_single_transpose(ix, p.qk_matmul.input[1], p.k):
            res.rejected.append((node_label(p.softmax), "k^T is already one Transpose of k"))
            continue
        todo.append(p)
    if not todo:
        return out, res
    b = Builder(ix, PREFIX)
    for i, p in enumerate(todo):
        tag = f"block{i}"
        scale = b.const(f"{tag}/scale", np.array(p.s_qk, np.float32))
        q = b.op("Mul", [p.q, scale], f"{tag}/q_scaled")
        k_t = b.op("Transpose", [p.k], f"{tag}/k_t", perm=[0, 1, 3, 2])
        p.qk_matmul.input[0], p.qk_matmul.input[1] = q, k_t  # the plan's MatMul is a node of `out` itself
        res.rewritten.append({"softmax": node_label(p.softmax), "scale": float(np.float32(p.s_qk)),
                              "num_heads": p.num_heads, "head_dim": p.head_dim})
    res.inserted = [n.name for n in b.nodes]
    b.insert_into(out)
    remove_dead(out)  # the detour is still in the graph here, so its initializers count as read before
    set_metadata_props(out, {K_TRANSPOSE: json.dumps(res.to_dict(), sort_keys=True)})
    return out, res
