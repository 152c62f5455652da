"""fuse_attention: non-final attention blocks -> com.microsoft.MultiHeadAttention, exact within
1e-5, final block and ITAE nodes untouched, and refusals with their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.fuse_attention import MS_DOMAIN, fuse_attention

IMG = 56
TOL = 1e-5


def _run(model: onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    src = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _pixels(n: int = 2) -> dict[str, np.ndarray]:
    return {"pixel_values": np.random.default_rng(3).standard_normal((n, 3, IMG, IMG)).astype(np.float32)}


def _softmaxes(m: onnx.ModelProto) -> list[str]:
    return [n.name or n.output[0] for n in m.graph.node if n.op_type == "Softmax"]


def _mha(m: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in m.graph.node if n.op_type == "MultiHeadAttention" and n.domain == MS_DOMAIN]


def _check_fused(orig: onnx.ModelProto, fused: onnx.ModelProto, res, n_blocks: int) -> None:
    sms = _softmaxes(orig)
    assert res.num_fused == n_blocks - 1 == len(_mha(fused)), res.summary()
    assert res.kept_final == sms[-1]
    assert _softmaxes(fused) == [sms[-1]]  # the final block's Softmax is the only one left
    assert any(o.domain == MS_DOMAIN and o.version == 1 for o in fused.opset_import)
    onnx.checker.check_model(fused)
    for n in _mha(fused):
        assert helper.get_attribute_value(next(a for a in n.attribute if a.name == "num_heads")) == 6
        assert abs(helper.get_attribute_value(next(a for a in n.attribute if a.name == "scale")) - 64 ** -0.5) < 1e-7


# ------------------------------------------------------------------------- exported tiny DINOv2
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("variant", ["plain", "reg"])
def test_fuse_exported(exported, variant, exporter):
    orig = onnx.load(str(exported(variant, exporter)), load_external_data=False)
    fused, res = fuse_attention(orig)
    _check_fused(orig, fused, res, n_blocks=2)
    feeds = _pixels()
    diff = np.abs(_run(fused, feeds) - _run(orig, feeds)).max()
    assert diff < TOL, diff
    # idempotent: a second run fuses nothing and says why
    again, res2 = fuse_attention(fused)
    assert res2.num_fused == 0 and "already holds" in res2.note
    assert len(_mha(again)) == len(_mha(fused))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fuse_depth3(tmp_path, exporter):
    from itae_export.models import build_model
    from itae_export.onnx_export import export_onnx

    model = build_model("dinov2_vits14", random_weights=True, seed=1, depth=3, img_size=IMG)
    path = export_onnx(model, tmp_path / "d3.onnx", img_size=IMG, exporter=exporter)
    orig = onnx.load(str(path))
    fused, res = fuse_attention(orig)
    _check_fused(orig, fused, res, n_blocks=3)
    feeds = _pixels(3)
    ref = _run(orig, feeds)
    assert np.abs(_run(fused, feeds) - ref).max() < TOL
    # skip_final=False fuses every block, the final one too
    every, res_all = fuse_attention(orig, skip_final=False)
    assert res_all.num_fused == 3 and not _softmaxes(every) and res_all.kept_final is None
    assert np.abs(_run(every, feeds) - ref).max() < TOL


def test_fuse_external_weights_not_loaded(exported, tmp_path):
    """The pass reads only the graph: weights stay in the external data file, never loaded."""
    m = onnx.load(str(exported("plain", "dynamo")))
    src = tmp_path / "ext.onnx"
    onnx.save_model(m, str(src), save_as_external_data=True, location="ext.data", size_threshold=1024)
    light = onnx.load(str(src), load_external_data=False)
    fused, res = fuse_attention(light)
    assert res.num_fused == 1
    dst = tmp_path / "fused.onnx"  # same folder: the external references stay valid
    onnx.save_model(fused, str(dst))
    feeds = _pixels()
    assert np.abs(_run(str(dst), feeds) - _run(str(src), feeds)).max() < TOL


@pytest.mark.parametrize("variant,exporter", [("plain", "dynamo"), ("reg", "torchscript"),
                                              ("reg", "dynamo"), ("plain", "torchscript")])
def test_fuse_after_itae(exported, variant, exporter):
    from graph_passes.config import ITAEConfig
    from graph_passes.itae import apply_itae

    orig = onnx.load(str(exported(variant, exporter)))
    patched, _ = apply_itae(orig, ITAEConfig())
    fused, res = fuse_attention(patched)
    _check_fused(patched, fused, res, n_blocks=2)

    def itae_nodes(m):
        return sorted((n.name, n.op_type, tuple(n.input), tuple(n.output)) for n in m.graph.node
                      if n.name.startswith("itae/"))

    assert itae_nodes(fused) == itae_nodes(patched) and itae_nodes(fused)
    assert {p.key: p.value for p in fused.metadata_props} == {p.key: p.value for p in patched.metadata_props}
    feeds = _pixels()
    assert np.abs(_run(fused, feeds) - _run(patched, feeds)).max() < TOL
    # and in the other order: fusing first leaves ITAE a graph it can still patch
    unpatched, _ = fuse_attention(orig)
    repatched, _ = apply_itae(unpatched, ITAEConfig())
    assert np.abs(_run(repatched, feeds) - _run(patched, feeds)).max() < TOL


# ------------------------------------------------------------------------- hand-built graphs
B, N, H, DH = 2, 5, 2, 4
D = H * DH


def _attention_graph(*, mask: bool = False, qkv_perm=(2, 0, 3, 1, 4), ctx_perm=(0, 2, 1, 3),
                     v_scale: bool = False, qkv_chunks=(0, 1, 2)) -> onnx.ModelProto:
    """One timm-style attention block: x -> qkv Linear -> Reshape/Transpose/Split -> scaled
    attention -> Transpose/Reshape -> out. Knobs break one piece at a time."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((D, 3 * D)).astype(np.float32), "w_qkv"),
        numpy_helper.from_array(rng.standard_normal(3 * D).astype(np.float32), "b_qkv"),
        numpy_helper.from_array(np.array([B, N, 3, H, DH], np.int64), "shape5"),
        numpy_helper.from_array(np.array([B, N, D], np.int64), "shape3"),
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "ones"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
        numpy_helper.from_array(np.array(DH ** -0.5, np.float32), "scale"),
        numpy_helper.from_array(np.where(np.arange(N) < 2, -1e4, 0).astype(np.float32), "mask"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_qkv"], ["mm"]),
        helper.make_node("Add", ["mm", "b_qkv"], ["p"]),
        helper.make_node("Reshape", ["p", "shape5"], ["r5"]),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=list(qkv_perm)),
        helper.make_node("Split", ["t5", "ones"], ["s0", "s1", "s2"], axis=0),
        *[helper.make_node("Squeeze", [f"s{i}", "axis0"], [n]) for i, n in zip(qkv_chunks, "qkv", strict=True)],
        helper.make_node("Mul", ["q", "scale"], ["qs"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qs", "kt"], ["logits"]),
    ]
    logits = "logits"
    if mask:
        nodes.append(helper.make_node("Add", ["logits", "mask"], ["masked"]))
        logits = "masked"
    v = "v"
    if v_scale:
        nodes.append(helper.make_node("Mul", ["v", "scale"], ["vs"]))
        v = "vs"
    nodes += [
        helper.make_node("Softmax", [logits], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", v], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=list(ctx_perm)),
        helper.make_node("Reshape", ["ctx_t", "shape3"], ["y"]),
    ]
    for i, n in enumerate(nodes):
        n.name = f"n{i}_{n.op_type}"
    g = helper.make_graph(nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [B, N, D])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, N, D])], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _x() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(5).standard_normal((B, N, D)).astype(np.float32)}


def test_handbuilt_fuses_and_matches():
    m = _attention_graph()
    fused, res = fuse_attention(m, skip_final=False)
    assert res.num_fused == 1 and res.fused[0]["num_heads"] == H and res.fused[0]["scale_on"] == ["q"]
    onnx.checker.check_model(fused)
    assert np.abs(_run(fused, _x()) - _run(m, _x())).max() < TOL
    # the only block is the final one: with skip_final it stays
    kept, res_kept = fuse_attention(m)
    assert res_kept.num_fused == 0 and res_kept.kept_final == _softmaxes(m)[0] and not _mha(kept)


@pytest.mark.parametrize("knob,reason", [
    ({"mask": True}, "Add between Q*K^T and Softmax"),
    ({"ctx_perm": (0, 2, 3, 1)}, "Transpose(0,2,1,3)"),
    ({"qkv_perm": (2, 0, 1, 3, 4)}, "Transpose(2,0,3,1,4)"),
    ({"v_scale": True}, "v does not come from a linear projection"),  # match.py refuses it
    ({"qkv_chunks": (1, 0, 2)}, "expected 0, 1, 2"),
])
def test_handbuilt_refusals(knob, reason):
    m = _attention_graph(**knob)
    out, res = fuse_attention(m, skip_final=False)
    assert res.num_fused == 0 and not _mha(out)
    assert len(res.rejected) == 1 and reason in res.rejected[0][1], res.rejected
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in m.graph.node]


def test_classifier_softmax_is_not_the_final_block(exported):
    """A Softmax after the blocks (a classifier head) must not be taken for the final attention."""
    m = onnx.load(str(exported("plain", "torchscript")))
    attn = _softmaxes(m)
    emb = m.graph.output[0].name
    m.graph.node.append(helper.make_node("Softmax", [emb], ["probs_head"], name="head/Softmax", axis=-1))
    m.graph.output.append(helper.make_tensor_value_info("probs_head", TensorProto.FLOAT, None))
    fused, res = fuse_attention(m)
    assert res.num_fused == 1 and res.kept_final == attn[-1]
    assert any(name == "head/Softmax" and "not an attention block" in why for name, why in res.rejected)
    assert _softmaxes(fused) == [attn[-1], "head/Softmax"]
