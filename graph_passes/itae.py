"""The ITAE graph pass: norm-based detection and attenuation of artifact tokens in the final
attention block of a DINOv2 ONNX graph (method: docs/method.md).

Matched (see match.py), then rewritten as below. Only ops TensorRT's ONNX parser supports are
used (Cast, ReduceSumSquare, Sqrt, Transpose, Slice, ReduceMean, TopK, Mul, Greater/Less, Shape,
Gather, Range, Not, And, Unsqueeze, ReduceMin, Where, ReduceSum, Div); norms are computed in
float32 whatever the graph's precision; every inserted node is named "itae/...".

    src (q | k^T | v, before scaling)
      |  Cast(float32) -> ReduceSumSquare(Dh [, H]) -> Sqrt -> n           [B,1|H,1,T] key layout
      |  threshold: theta | gamma * mean/median(n[..., P:])
      |  Greater|Less(n, threshold) And is_patch (token index >= P) -> flagged
      |  And row mask (rows=cls: query row 0 only)                   -> cond [B,1|H,T,T]
    logits --[min-logit: Where(cond, min_j>=P logits[..., j], logits)]--> Softmax
             [mask:      Where(cond, lowest, logits)                 ]
    Softmax --[scale: p' = Where(cond, alpha*p, p); p' / sum(p')     ]--> MatMul(PV)

Only the final attention block is ever patched: when it does not match, the pass refuses
(MatchError naming the step). A graph that already holds this subgraph, whatever its names and
metadata, is refused with AlreadyPatchedError (detect.py recognises it from its structure).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from .config import ITAEConfig, check_num_prefix_tokens
from .decompose import decompose_final_attention
from .graph import Builder, GraphIndex, infer_weight_free
from .match import (  # noqa: F401 - errors re-exported
    INSERTED_PREFIX,
    AlreadyPatchedError,
    AttentionMatch,
    MatchError,
    PassError,
    already_patched,
    infer_num_prefix_tokens,
    match_final_attention,
)
from .metadata import ITAE_PASS_VERSION, ITAE_SETTINGS, NUM_PREFIX_TOKENS, set_metadata_props

PASS_VERSION = "1"
_LOWEST = {TensorProto.FLOAT: np.finfo(np.float32).min, TensorProto.FLOAT16: np.finfo(np.float16).min,
           TensorProto.DOUBLE: np.finfo(np.float64).min, TensorProto.BFLOAT16: -3.38e38}
_NP_TYPE = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


@dataclass
class PassResult:
    matched: dict
    num_prefix_tokens: int
    inserted: list[str] = field(default_factory=list)  # node names
    inserted_ops: dict[str, int] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    def summary(self) -> str:
        ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(self.inserted_ops.items()))
        m = self.matched
        lines = [
            f"matched final attention: Softmax {m['softmax']} <- QK MatMul {m['qk_matmul']}, "
            f"PV MatMul {m['pv_matmul']} ({m['attention_blocks']} attention blocks in the graph)",
            f"  q/k/v from a {m['qkv_projection']} projection; scale applied on: {', '.join(m['scale_on'])}",
            f"  prefix tokens (CLS + registers): {self.num_prefix_tokens}",
            f"inserted {len(self.inserted)} nodes: {ops}",
        ]
        if self.rejected:
            lines.append("rejected candidates: " + "; ".join(self.rejected))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "matched": self.matched,
            "num_prefix_tokens": self.num_prefix_tokens,
            "inserted_nodes": len(self.inserted),
            "inserted_ops": self.inserted_ops,
            "rejected": self.rejected,
            "settings": self.settings,
        }


def check_patchable(model: onnx.ModelProto, inferred: onnx.ModelProto | None = None) -> None:
    """Refuse a graph that already carries ITAE (found by structure, detect.py) or is too old."""
    ix = GraphIndex(model)
    why = already_patched(model, ix, inferred=inferred)
    if why:
        raise AlreadyPatchedError(f"graph is already patched: {why}; patch the original (unpatched) export instead")
    if ix.opset < 13:
        raise MatchError("opset", f"opset {ix.opset} is too old (need >= 13)", "re-export with opset 17 or newer")


def apply_itae(
    model: onnx.ModelProto,
    cfg: ITAEConfig,
    *,
    num_prefix_tokens: int | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[onnx.ModelProto, PassResult]:
    """Return a patched copy of `model` (which may be loaded without its external weights:
    only the graph structure is read and no weight is touched) and what was done.

    Steps: check (not patched yet, opset) -> match the final attention block (never an earlier one)
    -> check the prefix-token count -> emit the ITAE nodes -> rewire the Softmax -> metadata."""
    # one weight-free shape inference serves the checks, the match and the logits' type and size
    inferred = infer_weight_free(model)
    check_patchable(model, inferred)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    decomposed = decompose_final_attention(out)  # opset >= 23 fused Attention -> MatMul/Softmax/MatMul
    if decomposed:  # new tensors: infer again
        inferred = infer_weight_free(out)
    ix = GraphIndex(out)
    m = match_final_attention(out, ix, inferred=inferred)
    m.decomposed = decomposed
    logit_type, num_tokens = _logit_info(out, m.logits, inferred)
    prefix = _prefix_tokens(out, ix, num_prefix_tokens, num_tokens)
    if any(o.name == m.softmax.output[0] for o in out.graph.output):
        raise PassError("the Softmax output is a graph output; cannot attenuate after it")
    b = Builder(ix, INSERTED_PREFIX.rstrip("/"))
    new_logits, new_probs = _emit(b, m, cfg, prefix, logit_type)
    _rewire(out, m, b, new_logits, new_probs)
    settings = cfg.to_dict()
    _record(out, settings, prefix, metadata)
    ops: dict[str, int] = {}
    for n in b.nodes:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    result = PassResult(
        matched=m.describe(),
        num_prefix_tokens=prefix,
        inserted=[n.name for n in b.nodes],
        inserted_ops=ops,
        rejected=[f"{n}: {r}" for n, r in m.rejected],
        settings=settings,
    )
    return out, result


def _logit_info(model: onnx.ModelProto, logits: str, inferred: onnx.ModelProto) -> tuple[int, int | None]:
    """(element type, static token count or None) of the attention logits [B,H,T,T] (square: either of
    the last two dims gives T). Only when plain inference knows neither does data propagation (which
    costs about twice the memory) carry the Reshape targets to them."""
    elem, tokens = _logit_dims(inferred, logits)
    if tokens is None:
        elem, tokens = _logit_dims(infer_weight_free(model, keep_small=64, data_prop=True), logits)
    for t in model.graph.initializer:
        if t.name == logits:
            elem = t.data_type
    return elem, tokens


def _logit_dims(inferred: onnx.ModelProto, logits: str) -> tuple[int, int | None]:
    elem, tokens = TensorProto.FLOAT, None
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.name != logits:
            continue
        tt = v.type.tensor_type
        elem = tt.elem_type or elem
        dims = list(tt.shape.dim) if tt.HasField("shape") else []
        known = [d.dim_value for d in dims[-2:] if d.HasField("dim_value") and d.dim_value]
        tokens = known[-1] if known else None
    return elem, tokens


def _prefix_tokens(model: onnx.ModelProto, ix: GraphIndex, given: int | None, num_tokens: int | None) -> int:
    """--num-prefix-tokens, else the recorded / inferred count; checked against the token count."""
    prefix = given if given is not None else infer_num_prefix_tokens(model, ix)
    if prefix is None:
        raise MatchError(
            "prefix-tokens",
            "could not count the CLS/register tokens (no token Concat on axis 1 next to the patch Conv)",
            "pass --num-prefix-tokens (1 for DINOv2, 5 for DINOv2 with 4 registers)",
        )
    return check_num_prefix_tokens(prefix, num_tokens)


def _rewire(out: onnx.ModelProto, m: AttentionMatch, b: Builder, new_logits: str | None,
            new_probs: str | None) -> None:
    """Mutate once: feed the Softmax the new logits (logit methods) or its consumers the new
    probabilities (scale); add the inserted nodes and re-sort the graph."""
    if new_logits is not None:
        m.softmax.input[0] = new_logits
    if new_probs is not None:
        src = m.softmax.output[0]
        for node in out.graph.node:  # the graph's nodes only: the inserted ones still read the Softmax
            for i, name in enumerate(node.input):
                if name == src:
                    node.input[i] = new_probs
    b.insert_into(out)


def _record(out: onnx.ModelProto, settings: dict, prefix: int, metadata: dict[str, str] | None) -> None:
    """The caller's metadata, then ours (settings, prefix count, pass version: they describe what
    this pass did), canonical keys (metadata.py), replacing existing entries."""
    set_metadata_props(out, {k: str(v) for k, v in (metadata or {}).items()})
    set_metadata_props(out, {
        ITAE_SETTINGS: json.dumps(settings, sort_keys=True),
        NUM_PREFIX_TOKENS: str(prefix),
        ITAE_PASS_VERSION: PASS_VERSION,
    })


def _emit(b: Builder, m: AttentionMatch, cfg: ITAEConfig, prefix: int, logit_type: int) -> tuple[str | None, str | None]:
    """Build the detection + attenuation nodes; return (new Softmax input | None, new probs | None)."""
    # 1. norms in key layout [B, 1|H, 1, T]
    src, feat_axis = {"q": (m.q, 3), "k": (m.k_t, 2), "v": (m.v, 3)}[cfg.norm_source]
    s32 = b.op("Cast", [src], "src_f32", to=TensorProto.FLOAT)
    axes = [1, feat_axis] if cfg.norm_scope == "token" else [feat_axis]
    sq = b.reduce("ReduceSumSquare", s32, axes, hint="sumsq")
    if feat_axis == 3:
        sq = b.op("Transpose", [sq], "to_key_layout", perm=[0, 1, 3, 2])
    norms = b.op("Sqrt", [sq], "norms")

    # 2. threshold
    if cfg.threshold is not None:
        thr = b.const("theta", np.array(cfg.threshold, dtype=np.float32))
    else:
        patch_norms = b.slice_last(norms, prefix, hint="patch_norms")
        if cfg.relative_stat == "mean":
            stat = b.reduce("ReduceMean", patch_norms, [3], hint="mean_norm")
        else:
            stat = _median_last(b, patch_norms)
        thr = b.op("Mul", [stat, b.const("gamma", np.array(cfg.gamma, dtype=np.float32))], "threshold")
    cmp = b.op("Greater" if cfg.direction == "high" else "Less", [norms, thr], "anomalous")

    # 3. only patch tokens (index >= P), only the chosen query rows
    shape = b.op("Shape", [m.logits], "logits_shape")
    t = b.op("Gather", [shape, b.const("last_axis", np.array(3, dtype=np.int64))], "num_tokens", axis=0)
    idx = b.op("Range", [b.const("zero", np.array(0, dtype=np.int64)), t, b.const("one", np.array(1, dtype=np.int64))], "token_index")
    is_prefix = b.op("Less", [idx, b.const("num_prefix", np.array(prefix, dtype=np.int64))], "is_prefix")
    is_patch = b.op("Not", [is_prefix], "is_patch")
    flagged = b.op("And", [cmp, is_patch], "flagged")
    if cfg.rows == "cls":
        is_cls = b.op("Equal", [idx, b.const("cls_index", np.array(0, dtype=np.int64))], "is_cls")
        row = _unsqueeze(b, is_cls, 1, "cls_row")  # [T, 1]
        cond = b.op("And", [flagged, row], "cond")
    else:
        cond = flagged

    # 4. attenuation
    if cfg.attenuation == "min-logit":
        rows_src = m.logits
        if cfg.rows == "cls":
            # only the CLS row is attenuated: reduce over [B,H,1,T], not the whole [B,H,T,T]
            rows_src = b.op("Slice", [m.logits, b.const("row0_start", np.array([0], dtype=np.int64)),
                                      b.const("row0_end", np.array([1], dtype=np.int64)),
                                      b.const("row_axis", np.array([2], dtype=np.int64))], "cls_logits")
        patch_logits = b.slice_last(rows_src, prefix, hint="patch_logits")
        row_min = b.reduce("ReduceMin", patch_logits, [3], hint="row_min_logit")
        return b.op("Where", [cond, row_min, m.logits], "attenuated_logits"), None
    if cfg.attenuation == "mask":
        lowest = np.array(_LOWEST.get(logit_type, np.finfo(np.float32).min), dtype=_NP_TYPE.get(logit_type, np.float32))
        return b.op("Where", [cond, b.const("lowest", lowest), m.logits], "masked_logits"), None
    probs = m.softmax.output[0]
    alpha = np.array(cfg.alpha, dtype=_NP_TYPE.get(logit_type, np.float32))
    scaled = b.op("Mul", [probs, b.const("alpha", alpha)], "scaled_probs")
    chosen = b.op("Where", [cond, scaled, probs], "attenuated_probs")
    total = b.reduce("ReduceSum", chosen, [3], hint="row_sum")
    return None, b.op("Div", [chosen, total], "renormalised_probs")


def _unsqueeze(b: Builder, x: str, axis: int, hint: str) -> str:
    if b.ix.opset >= 13:
        return b.op("Unsqueeze", [x, b.const("axes", np.array([axis], dtype=np.int64))], hint)
    return b.op("Unsqueeze", [x], hint, axes=[axis])


def _median_last(b: Builder, x: str) -> str:
    """Median over the last axis (mean of the middle two for an even count), via TopK."""
    shape = b.op("Shape", [x], "patch_shape")
    n = b.op("Gather", [shape, b.const("last_axis", np.array([3], dtype=np.int64))], "num_patches", axis=0)
    two = b.const("two", np.array(2, dtype=np.int64))
    k = b.op("Add", [b.op("Div", [n, two], "half"), b.const("one", np.array(1, dtype=np.int64))], "k")
    top = b.name("topk")
    b.nodes.append(helper.make_node("TopK", [x, k], [top, top + "_idx"], name=top, axis=-1, largest=1, sorted=1))
    last = b.slice_last(top, -1, hint="kth")
    prev = b.slice_last(top, -2, -1, hint="kth_minus_1")
    even = b.op("Equal", [b.op("Mod", [n, two], "parity"), b.const("zero", np.array(0, dtype=np.int64))], "even")
    half = b.const("half_f", np.array(0.5, dtype=np.float32))
    mid = b.op("Mul", [b.op("Add", [last, prev], "mid_sum"), half], "mid_mean")
    return b.op("Where", [even, mid, last], "median_norm")
