"""Exact decomposition of a fused ONNX `Attention` op (opset >= 23) into the MatMul/Softmax/MatMul
form that match.py anchors on.

The dynamo exporter at opset >= 23 turns every `scaled_dot_product_attention` into one `Attention`
node, so the graph has no Softmax for the ITAE pass to hook. Only the final block needs the
explicit form; the other blocks stay fused. The rewrite is exact for what a ViT emits:

    Q [B,H,T,Dh] | 3-D [B,T,H*Dh] -> (Reshape [0,0,H,-1] -> Transpose 0,2,1,3)
    MatMul(Q, Transpose(K, 0,1,3,2)) -> Mul(scale) -> [Cast softmax_precision] -> Softmax(-1)
      -> [Cast back] -> MatMul(., V) -> Y [B,H,T,Dv] | 3-D (Transpose 0,2,1,3 -> Reshape [0,0,-1])

Anything that changes the logits beyond a scale (attn_mask, causal or sliding-window masks,
softcap, KV cache inputs, grouped KV heads) is refused rather than approximated: the matcher
could not place ITAE on such logits exactly. onnxruntime contrib attention ops (com.microsoft)
are refused too; their semantics (packed weights, bias, masks) belong to onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from .anchor import (  # noqa: F401 - CONTRIB_* re-exported
    CONTRIB_ATTENTION_OPS,
    CONTRIB_DOMAIN,
    attention_layout,
    is_contrib_attention,
    is_onnx_attention,
)
from .errors import MatchError
from .graph import Builder, GraphIndex, infer_elem_types, infer_weight_free

CONTRIB_HINT = "patch the graph before running the onnxruntime transformer optimizer (or re-export it)"
REEXPORT_HINT = "re-export with opset <= 22 (itae-export --opset 18) so that attention is MatMul/Softmax/MatMul"
# Attention attributes with the value that keeps the logits a pure scaled Q*K^T
_NEUTRAL = {"is_causal": 0, "softcap": 0.0, "left_window_size": -1, "right_window_size": -1}
_HANDLED = {"scale", "q_num_heads", "kv_num_heads", "softmax_precision", "qk_matmul_output_mode", *_NEUTRAL}
_EXTRA_INPUTS = ("attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
_EXTRA_OUTPUTS = ("present_key", "present_value", "qk_matmul_output")
_NP_TYPE = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


class DecomposeError(MatchError):
    """A fused attention op that cannot be rewritten exactly into MatMul/Softmax/MatMul."""

    def __init__(self, reason: str, hint: str = REEXPORT_HINT):
        super().__init__("decompose-attention", reason, hint)


def final_fused_attention(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The ONNX `Attention` node to decompose: the final attention block (anchor.py) when it is a
    fused op, i.e. no attention Softmax follows it (a classifier Softmax after it does not count).
    None when the final attention is already explicit. Raises DecomposeError when that last fused op
    is an onnxruntime contrib op."""
    if not any(is_onnx_attention(n) or is_contrib_attention(n) for n in model.graph.node):
        return None  # nothing fused: no need to classify the Softmax nodes
    node = attention_layout(model).final
    if node is None or not (is_onnx_attention(node) or is_contrib_attention(node)):
        return None
    if is_contrib_attention(node):
        raise DecomposeError(
            f"the final attention is {CONTRIB_DOMAIN}.{node.op_type} ({node.name or node.output[0]}), "
            "a fused onnxruntime contrib op",
            CONTRIB_HINT,
        )
    return node


def _known_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Static dims (None where symbolic) from shape inference on a weight-free copy."""
    inferred = infer_weight_free(model)
    out: dict[str, list[int | None]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = v.type.tensor_type
        if tt.HasField("shape"):
            out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    return out


def _check_supported(model: onnx.ModelProto, node: onnx.NodeProto, ix: GraphIndex) -> dict:
    name = node.name or node.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    unknown = sorted(set(attrs) - _HANDLED)
    if unknown:
        raise DecomposeError(f"Attention {name} has attribute(s) {', '.join(unknown)} that the decomposition does not know")
    for key, neutral in _NEUTRAL.items():
        if key in attrs and attrs[key] != neutral:
            raise DecomposeError(f"Attention {name} has {key}={attrs[key]}; only {key}={neutral} decomposes into plain scaled Q*K^T logits")
    for label, t in zip(_EXTRA_INPUTS, node.input[3:], strict=False):
        if t:
            raise DecomposeError(f"Attention {name} has a {label} input; exact ITAE needs unmasked, cache-free attention")
    graph_outputs = {o.name for o in model.graph.output}
    for label, t in zip(_EXTRA_OUTPUTS, node.output[1:], strict=False):
        if t and (t in graph_outputs or ix.consumers.get(t)):
            raise DecomposeError(f"Attention {name} output {label} is used; only the attention output Y can be rebuilt")
    return attrs


def decompose_attention(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    """Replace `node` (an ONNX Attention op in `model.graph`) in place by the explicit form; return
    the name of the replaced node."""
    ix = GraphIndex(model)
    attrs = _check_supported(model, node, ix)
    name = node.name or node.output[0]
    q_in, k_in, v_in = node.input[:3]
    shapes = _known_shapes(model)
    types = infer_elem_types(model)
    dtype = types.get(q_in, TensorProto.FLOAT)
    q_shape, k_shape = shapes.get(q_in), shapes.get(k_in)
    rank = len(q_shape) if q_shape else (3 if "q_num_heads" in attrs else 4)
    if rank not in (3, 4):
        raise DecomposeError(f"Attention {name} has rank-{rank} Q; expected 3-D or 4-D")

    b = Builder(ix, f"{name}_decomposed")

    def i64(hint: str, vals: list[int]) -> str:
        return b.const(hint, np.array(vals, dtype=np.int64))

    if rank == 3:
        hq, hkv = attrs.get("q_num_heads"), attrs.get("kv_num_heads")
        if not hq or not hkv:
            raise DecomposeError(f"Attention {name} has 3-D inputs but no q_num_heads/kv_num_heads attributes")
        if hq != hkv:
            raise DecomposeError(f"Attention {name} groups {hq} query heads over {hkv} KV heads; only plain multi-head attention is supported")

        def split_heads(t: str, heads: int, hint: str) -> str:
            r = b.op("Reshape", [t, i64("heads_shape", [0, 0, heads, -1])], f"{hint}_heads")
            return b.op("Transpose", [r], f"{hint}_bhtd", perm=[0, 2, 1, 3])

        q, k, v = split_heads(q_in, hq, "q"), split_heads(k_in, hkv, "k"), split_heads(v_in, hkv, "v")
        head_dim = q_shape[2] // hq if q_shape and q_shape[2] else None
    else:
        if q_shape and k_shape and q_shape[1] and k_shape[1] and q_shape[1] != k_shape[1]:
            raise DecomposeError(f"Attention {name} groups {q_shape[1]} query heads over {k_shape[1]} KV heads; only plain multi-head attention is supported")
        q, k, v = q_in, k_in, v_in
        head_dim = q_shape[3] if q_shape else None

    np_type = _NP_TYPE.get(dtype)
    if "scale" in attrs:
        scale_val: float | None = float(attrs["scale"])
    elif head_dim:
        scale_val = 1.0 / float(np.sqrt(head_dim))
    else:
        scale_val = None
    if scale_val is not None and np_type is not None:
        scale = b.const("scale", np.array(scale_val, dtype=np_type))
    elif scale_val is not None:  # bfloat16 & co: no numpy type, cast a float32 constant
        scale = b.op("Cast", [b.const("scale_f32", np.array(scale_val, dtype=np.float32))], "scale", to=dtype)
    else:  # head size only known at run time: 1/sqrt(Q.shape[-1]), computed from Shape (data-independent)
        dh = b.op("Gather", [b.op("Shape", [q], "q_shape"), b.const("last", np.array(3, dtype=np.int64))], "head_dim", axis=0)
        root = b.op("Sqrt", [b.op("Cast", [dh], "head_dim_f", to=dtype)], "sqrt_head_dim")
        scale = b.op("Reciprocal", [root], "scale")

    k_t = b.op("Transpose", [k], "k_transposed", perm=[0, 1, 3, 2])
    logits = b.op("Mul", [b.op("MatMul", [q, k_t], "qk"), scale], "scaled_logits")
    precision = attrs.get("softmax_precision")
    if precision and precision != dtype:
        probs = b.op("Softmax", [b.op("Cast", [logits], "logits_cast", to=precision)], "softmax", axis=-1)
        probs = b.op("Cast", [probs], "probs_cast", to=dtype)
    else:
        probs = b.op("Softmax", [logits], "softmax", axis=-1)
    y = node.output[0]
    if rank == 3:
        y4 = b.op("MatMul", [probs, v], "pv")
        yt = b.op("Transpose", [y4], "y_bthd", perm=[0, 2, 1, 3])
        b.nodes.append(helper.make_node("Reshape", [yt, i64("merge_shape", [0, 0, -1])], [y], name=b.name("y")))
    else:
        b.nodes.append(helper.make_node("MatMul", [probs, v], [y], name=b.name("pv")))

    nodes = list(model.graph.node)
    pos = next(i for i, n in enumerate(nodes) if n is node or n == node)
    nodes[pos : pos + 1] = b.nodes
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(b.initializers)
    return name


def decompose_final_attention(model: onnx.ModelProto) -> str | None:
    """Decompose the final fused ONNX Attention op in place when no Softmax follows it; return the
    replaced node's name, or None when nothing needed decomposing."""
    node = final_fused_attention(model)
    if node is None:
        return None
    return decompose_attention(model, node)
