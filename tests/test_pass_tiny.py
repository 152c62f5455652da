"""The ITAE pass on tiny attention graphs built here: every exporter shape of the block (scale on
q / on q and k / on the logits; q,k,v by Split, Slice or Gather), checked with onnx.checker and
ONNX Runtime against an independent numpy reference of ITAE.md, for all query rows."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.config import ITAEConfig
from graph_passes.itae import apply_itae
from graph_passes.match import AlreadyPatchedError, MatchError, match_final_attention

B, T, H, DH = 2, 11, 2, 4
D = H * DH
P = 3  # CLS + 2 registers


def _attention_graph(split: str = "split", scale: str = "qk", opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((D, 3 * D)) / np.sqrt(D)).astype(np.float32), "w_qkv"),
        numpy_helper.from_array((rng.standard_normal(3 * D) * 0.1).astype(np.float32), "b_qkv"),
        numpy_helper.from_array(np.array([0, 0, 3, H, DH], dtype=np.int64), "shape5"),
        numpy_helper.from_array(np.array([0, 0, D], dtype=np.int64), "shape3"),
    ]
    n = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["mm"]),
        helper.make_node("Add", ["mm", "b_qkv"], ["qkv"]),
        helper.make_node("Reshape", ["qkv", "shape5"], ["qkv5"]),
        helper.make_node("Transpose", ["qkv5"], ["qkvT"], perm=[2, 0, 3, 1, 4]),
    ]
    if split == "split":
        inits.append(numpy_helper.from_array(np.array([1, 1, 1], dtype=np.int64), "splits"))
        inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "ax0"))
        n.append(helper.make_node("Split", ["qkvT", "splits"], ["q1", "k1", "v1"], axis=0))
        n += [helper.make_node("Squeeze", [f"{c}1", "ax0"], [c]) for c in "qkv"]
    elif split == "slice":
        inits.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "ax0"))
        for i, c in enumerate("qkv"):
            inits.append(numpy_helper.from_array(np.array([i], dtype=np.int64), f"s{c}"))
            inits.append(numpy_helper.from_array(np.array([i + 1], dtype=np.int64), f"e{c}"))
            n.append(helper.make_node("Slice", ["qkvT", f"s{c}", f"e{c}", "ax0"], [f"{c}1"]))
            n.append(helper.make_node("Squeeze", [f"{c}1", "ax0"], [c]))
    else:
        for i, c in enumerate("qkv"):
            inits.append(numpy_helper.from_array(np.array(i, dtype=np.int64), f"i{c}"))
            n.append(helper.make_node("Gather", ["qkvT", f"i{c}"], [c], axis=0))
    n.append(helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 1, 3, 2]))
    s = 1.0 / np.sqrt(DH)
    if scale == "q":
        inits.append(numpy_helper.from_array(np.array(s, dtype=np.float32), "scale"))
        n += [helper.make_node("Mul", ["q", "scale"], ["qs"]), helper.make_node("MatMul", ["qs", "kT"], ["logits"])]
    elif scale == "qk":
        inits.append(numpy_helper.from_array(np.array(np.sqrt(s), dtype=np.float32), "scale"))
        n += [
            helper.make_node("Mul", ["q", "scale"], ["qs"]),
            helper.make_node("Mul", ["kT", "scale"], ["ks"]),
            helper.make_node("MatMul", ["qs", "ks"], ["logits"]),
        ]
    else:
        inits.append(numpy_helper.from_array(np.array(np.sqrt(DH), dtype=np.float32), "scale"))
        n += [helper.make_node("MatMul", ["q", "kT"], ["raw"]), helper.make_node("Div", ["raw", "scale"], ["logits"])]
    n += [
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctxT"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctxT", "shape3"], ["y"]),
    ]
    g = helper.make_graph(
        n, "attn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", T, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", T, D])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _numpy_itae(model: onnx.ModelProto, x: np.ndarray, cfg: ITAEConfig | None) -> np.ndarray:
    """Independent reference: attention with ITAE written from ITAE.md in numpy (float64)."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    qkv = (x.astype(np.float64) @ w["w_qkv"] + w["b_qkv"]).reshape(B, T, 3, H, DH).transpose(2, 0, 3, 1, 4)
    q, k, v = qkv
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(DH)
    if cfg is not None:
        src = {"q": q, "k": k, "v": v}[cfg.norm_source]
        if cfg.norm_scope == "token":
            norms = np.sqrt((src**2).sum(axis=(1, 3)))[:, None, :]  # [B,1,T]
        else:
            norms = np.sqrt((src**2).sum(axis=3))  # [B,H,T]
        if cfg.threshold is not None:
            thr = cfg.threshold
        else:
            patch = norms[..., P:]
            stat = patch.mean(-1, keepdims=True) if cfg.relative_stat == "mean" else np.median(patch, -1, keepdims=True)
            thr = cfg.gamma * stat
        flagged = norms > thr if cfg.direction == "high" else norms < thr
        flagged[..., :P] = False
        for b, h, i in itertools.product(range(B), range(H), range(T)):
            if cfg.rows == "cls" and i != 0:
                continue
            cols = flagged[b, h if cfg.norm_scope == "head" else 0]
            row = logits[b, h, i]
            if cfg.attenuation == "min-logit":
                row[cols] = row[P:].min()
            elif cfg.attenuation == "mask":
                row[cols] = -np.inf
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if cfg.attenuation == "scale":
            f = np.broadcast_to(flagged[:, :, None, :], probs.shape).copy()
            if cfg.rows == "cls":
                f[:, :, 1:, :] = False
            probs = np.where(f, probs * cfg.alpha, probs)
            probs /= probs.sum(-1, keepdims=True)
    else:
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(B, T, D)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _x(seed: int = 3) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((B, T, D)).astype(np.float32)
    x[:, [4, 8]] *= 6.0  # two long tokens per image so that every source has outliers
    return x


def _midpoint_threshold(model, x, cfg: ITAEConfig) -> float:
    """A threshold in the middle of the widest gap between sorted patch norms, so that the
    numeric difference between backends cannot move a token across it."""
    w = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    qkv = (x.astype(np.float64) @ w["w_qkv"] + w["b_qkv"]).reshape(B, T, 3, H, DH).transpose(2, 0, 3, 1, 4)
    src = qkv["qkv".index(cfg.norm_source)]
    norms = np.sqrt((src**2).sum(axis=(1, 3))) if cfg.norm_scope == "token" else np.sqrt((src**2).sum(axis=3))
    vals = np.sort(norms[..., P:].ravel())
    gaps = np.diff(vals)
    i = int(np.argmax(gaps))
    return float((vals[i] + vals[i + 1]) / 2)


@pytest.mark.parametrize("split,scale", [("split", "qk"), ("slice", "q"), ("gather", "logits"), ("split", "logits")])
def test_match_shapes(split, scale):
    m = match_final_attention(_attention_graph(split, scale))
    want = {"qk": ["q", "k"], "q": ["q"], "logits": ["logits"]}[scale]
    assert m.scale_on == want
    assert m.q == "q" and m.v == "v" and m.k_t == "kT"
    assert m.fused_qkv


CONFIGS = [
    ITAEConfig(norm_source=s, norm_scope=sc, direction=d, attenuation=a, rows=r, alpha=0.25)
    for s, sc, d, a, r in itertools.product("qkv", ("token", "head"), ("high", "low"), ("min-logit", "mask", "scale"), ("cls", "all"))
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.norm_source}-{c.norm_scope}-{c.direction}-{c.attenuation}-{c.rows}")
def test_tiny_parity_absolute_threshold(cfg):
    split, scale = [("split", "qk"), ("slice", "q"), ("gather", "logits")][hash(cfg) % 3]
    model = _attention_graph(split, scale)
    x = _x()
    thr = _midpoint_threshold(model, x, cfg)
    cfg = ITAEConfig(**{**cfg.to_dict(), "threshold": thr, "relative_threshold": None})
    patched, res = apply_itae(model, cfg, num_prefix_tokens=P)
    onnx.checker.check_model(patched, full_check=True)
    got = _run(patched, x)
    want = _numpy_itae(model, x, cfg)
    base = _numpy_itae(model, x, None)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - base).max() > 1e-3, "threshold flagged nothing: the test would prove nothing"
    assert all(n.startswith("itae/") for n in res.inserted)


@pytest.mark.parametrize("stat", ["mean", "median"])
@pytest.mark.parametrize("direction,gamma", [("high", 1.5), ("low", 0.6)])
def test_tiny_parity_relative_threshold(stat, direction, gamma):
    model = _attention_graph("split", "qk", opset=18)
    x = _x()
    cfg = ITAEConfig(relative_threshold=gamma, relative_stat=stat, direction=direction, rows="all")
    patched, _ = apply_itae(model, cfg, num_prefix_tokens=P)
    onnx.checker.check_model(patched, full_check=True)
    got = _run(patched, x)
    want = _numpy_itae(model, x, cfg)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(want - _numpy_itae(model, x, None)).max() > 1e-3


def test_median_even_and_odd_counts():
    # T - P = 8 patches (even); a second graph with one more prefix token gives 7 (odd)
    model = _attention_graph("split", "qk")
    x = _x()
    for prefix in (3, 4):
        cfg = ITAEConfig(relative_threshold=1.2, relative_stat="median")
        patched, _ = apply_itae(model, cfg, num_prefix_tokens=prefix)
        got = _run(patched, x)
        global P
        old, P = P, prefix
        try:
            want = _numpy_itae(model, x, cfg)
        finally:
            P = old
        assert np.abs(got - want).max() <= 1e-5


def test_float16_graph_norms_in_float32():
    from onnx import numpy_helper as nh

    model = _attention_graph("split", "qk")
    # convert the graph to float16 by hand: weights, input and output
    for t in model.graph.initializer:
        a = nh.to_array(t)
        if a.dtype == np.float32:
            t.CopyFrom(nh.from_array(a.astype(np.float16), t.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    x = _x()
    cfg = ITAEConfig(threshold=_midpoint_threshold(_attention_graph("split", "qk"), x, ITAEConfig()), attenuation="mask")
    patched, res = apply_itae(model, cfg, num_prefix_tokens=P)
    casts = [n for n in patched.graph.node if n.name.startswith("itae/") and n.op_type == "Cast"]
    assert casts and helper.get_attribute_value(casts[0].attribute[0]) == TensorProto.FLOAT
    got = _run(patched, x.astype(np.float16)).astype(np.float32)
    want = _numpy_itae(_attention_graph("split", "qk"), x, cfg)
    from itae_export.parity import compare

    par = compare(want.reshape(-1, D), got.reshape(-1, D))
    assert par.cos_min >= 0.999 and par.max_abs < 0.05, par
    base = _numpy_itae(_attention_graph("split", "qk"), x, None)
    assert compare(base.reshape(-1, D), got.reshape(-1, D)).max_abs > 0.1  # the mask took effect


def test_refuses_already_patched():
    patched, _ = apply_itae(_attention_graph(), ITAEConfig(), num_prefix_tokens=P)
    with pytest.raises(AlreadyPatchedError, match="already patched"):
        apply_itae(patched, ITAEConfig(), num_prefix_tokens=P)
    # also without our metadata: the inserted node names give it away
    del patched.metadata_props[:]
    with pytest.raises(AlreadyPatchedError, match="ITAE nodes"):
        apply_itae(patched, ITAEConfig(), num_prefix_tokens=P)


def test_metadata_written():
    patched, _ = apply_itae(_attention_graph(), ITAEConfig(norm_source="k"), num_prefix_tokens=P, metadata={"m": "x"})
    meta = {p.key: p.value for p in patched.metadata_props}
    assert '"norm_source": "k"' in meta["itae.settings"]
    # one canonical key per entry (graph_passes.metadata): the legacy "itae.num_prefix_tokens" is not written
    assert meta["itae_export.num_prefix_tokens"] == str(P) and meta["m"] == "x"
    assert "itae.num_prefix_tokens" not in meta


def _conv_net() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_refuses_graph_without_softmax():
    with pytest.raises(MatchError) as e:
        apply_itae(_conv_net(), ITAEConfig(), num_prefix_tokens=1)
    assert e.value.step == "softmax" and "no Softmax" in str(e.value)


def test_refuses_classifier_softmax_and_reports_candidate():
    w = numpy_helper.from_array(np.ones((8, 5), dtype=np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["l"]), helper.make_node("Softmax", ["l"], ["y"], axis=-1)], "clf",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w],
    )
    with pytest.raises(MatchError) as e:
        apply_itae(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), ITAEConfig(), num_prefix_tokens=1)
    assert e.value.step == "qk-matmul" and "constant" in str(e.value)


def test_skips_trailing_classifier_softmax():
    """A classifier Softmax after the blocks is rejected; the attention Softmax before it matches."""
    model = _attention_graph()
    w = numpy_helper.from_array(np.ones((D, 3), dtype=np.float32), "w_cls")
    model.graph.initializer.append(w)
    model.graph.node.extend([
        helper.make_node("MatMul", ["y", "w_cls"], ["cls_logits"]),
        helper.make_node("Softmax", ["cls_logits"], ["cls_probs"], axis=-1),
    ])
    model.graph.output.append(helper.make_tensor_value_info("cls_probs", TensorProto.FLOAT, ["B", T, 3]))
    m = match_final_attention(model)
    assert m.q == "q" and len(m.rejected) == 1 and "constant" in m.rejected[0][1]


def test_refuses_softmax_not_fed_by_matmul():
    model = _attention_graph()
    for n in model.graph.node:
        if n.op_type == "Softmax":
            n.input[0] = "x"  # softmax over the input itself
    with pytest.raises(MatchError) as e:
        match_final_attention(model)
    assert e.value.step == "qk-matmul"


def test_refuses_old_opset():
    with pytest.raises(MatchError, match="opset 11"):
        apply_itae(_attention_graph(opset=11), ITAEConfig(), num_prefix_tokens=P)


def test_deep_graph_does_not_hit_recursion_limit():
    """ViT-g has ~40 blocks of ~25 nodes before the final attention; the walks must be iterative."""
    model = _attention_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f"))
    chain = []
    prev = "x"
    for i in range(3000):
        chain.append(helper.make_node("Add", [prev, "zero_f"], [f"deep_{i}"]))
        prev = f"deep_{i}"
    for n in model.graph.node:
        for j, name in enumerate(n.input):
            if name == "x":
                n.input[j] = prev
    nodes = chain + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    x = _x()
    cfg = ITAEConfig(threshold=_midpoint_threshold(_attention_graph(), x, ITAEConfig()))
    patched, _ = apply_itae(model, cfg, num_prefix_tokens=P)
    assert np.abs(_run(patched, x) - _numpy_itae(_attention_graph(), x, cfg)).max() <= 1e-5
