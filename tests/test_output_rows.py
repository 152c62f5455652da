"""Output-row pruning (graph_passes.output_rows): tiny graphs built here, ONNX Runtime against a
numpy reference (fixed and dynamic token counts), refusals with their reasons, and the exported
DINOv2 ITAE graphs (plain, _reg) computing the same embedding with the tail on one row."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.output_rows import OutputRowsError, is_pruned, prune_output_rows

B, N, C = 2, 6, 8


def _ln(x, g, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + 1e-6) * g + b


def _erf(x):
    from math import erf

    return np.vectorize(erf)(x).astype(x.dtype)


def _tail_graph(row: int = 0, *, pos_add: bool = False, axis: int = 1, seed: int = 0):
    """x -> mixing (rows attend to each other) -> proj -> + x -> LN -> MLP(erf GELU) -> + -> LN -> Gather.
    Returns (model, numpy reference function)."""
    rng = np.random.default_rng(seed)
    w = {k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
         for k, s in {"w_mix": (C, C), "w_proj": (C, C), "w1": (C, 2 * C), "w2": (2 * C, C)}.items()}
    v = {k: (rng.standard_normal(s) * 0.1 + (1.0 if k.startswith("g") else 0.0)).astype(np.float32)
         for k, s in {"b_proj": (C,), "g1": (C,), "be1": (C,), "b1": (2 * C,), "b2": (C,), "g2": (C,), "be2": (C,)}.items()}
    pos = rng.standard_normal((1, N, C)).astype(np.float32)
    inits = [numpy_helper.from_array(a, k) for k, a in {**w, **v}.items()]
    inits += [numpy_helper.from_array(np.array(row, np.int64), "row"), numpy_helper.from_array(pos, "pos"),
              numpy_helper.from_array(np.array(np.sqrt(2), np.float32), "sqrt2"),
              numpy_helper.from_array(np.array(1, np.float32), "one"), numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    nodes = [
        helper.make_node("MatMul", ["x", "w_mix"], ["xm"]),
        helper.make_node("Transpose", ["xm"], ["xmT"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xmT"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
        helper.make_node("MatMul", ["attn", "x"], ["mixed"]),
        helper.make_node("MatMul", ["mixed", "w_proj"], ["p0"]),
        helper.make_node("Add", ["p0", "b_proj"], ["p1"]),
        helper.make_node("Add", ["x", "p1"], ["h"]),
        helper.make_node("LayerNormalization", ["h", "g1", "be1"], ["n1"], axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["n1", "w1"], ["f0"]),
        helper.make_node("Add", ["f0", "b1"], ["f1"]),
        helper.make_node("Div", ["f1", "sqrt2"], ["f2"]),
        helper.make_node("Erf", ["f2"], ["f3"]),
        helper.make_node("Add", ["f3", "one"], ["f4"]),
        helper.make_node("Mul", ["f4", "half"], ["f5"]),
        helper.make_node("Mul", ["f1", "f5"], ["gelu"]),
        helper.make_node("MatMul", ["gelu", "w2"], ["m0"]),
        helper.make_node("Add", ["m0", "b2"], ["m1"]),
        helper.make_node("Add", ["h", "m1"], ["y"]),
    ]
    last = "y"
    if pos_add:
        nodes.append(helper.make_node("Add", ["y", "pos"], ["y_pos"]))
        last = "y_pos"
    nodes += [helper.make_node("LayerNormalization", [last, "g2", "be2"], ["out"], axis=-1, epsilon=1e-6),
              helper.make_node("Gather", ["out", "row"], ["embedding"], axis=axis)]
    out_shape = [B, C] if axis == 1 else [N, C]
    graph = helper.make_graph(nodes, "tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", N, C])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    def ref(x):
        xm = x @ w["w_mix"]
        s = x @ xm.transpose(0, 2, 1)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        h = x + (a @ x) @ w["w_proj"] + v["b_proj"]
        f1 = _ln(h, v["g1"], v["be1"]) @ w["w1"] + v["b1"]
        y = h + (f1 * 0.5 * (1 + _erf(f1 / np.sqrt(2)))) @ w["w2"] + v["b2"]
        if pos_add:
            y = y + pos
        return np.take(_ln(y, v["g2"], v["be2"]), row, axis=axis)

    return model, ref


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("row", [0, 3])
def test_tail_runs_on_one_row_and_computes_the_same(row):
    model, ref = _tail_graph(row)
    pruned, res = prune_output_rows(model)
    onnx.checker.check_model(pruned, full_check=True)
    x = np.random.default_rng(1).standard_normal((B, N, C)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), ref(x), atol=1e-5)
    np.testing.assert_allclose(_run(pruned, x), ref(x), atol=1e-5)
    assert res.row == row and res.matmuls == 3 and res.region_ops["LayerNormalization"] == 2
    assert sorted(res.cuts) == ["mixed", "x"], res.cuts  # the attention output and the block input
    assert any("is not token rows times a constant 2-D weight" in r for r in res.rejected), res.rejected
    # one Slice of the pass per cut, and no other
    slices = [n for n in pruned.graph.node if n.op_type == "Slice"]
    assert len(slices) == 2 and all(n.name.startswith("output_rows/") for n in slices)
    assert "output 'embedding' reads token row" in res.summary()


def test_dynamic_token_count():
    model, ref = _tail_graph(0)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "tokens"
    pruned, _ = prune_output_rows(model)
    for n in (3, 11):
        x = np.random.default_rng(n).standard_normal((B, n, C)).astype(np.float32)
        np.testing.assert_allclose(_run(pruned, x), _run(model, x), atol=1e-5)


def test_already_pruned_is_refused():
    pruned, _ = prune_output_rows(_tail_graph(0)[0])
    assert is_pruned(pruned) and not is_pruned(_tail_graph(0)[0])
    with pytest.raises(OutputRowsError, match="pruned before"):
        prune_output_rows(pruned)


def test_per_token_constant_stops_the_region_with_its_reason():
    """An Add of a [1, N, C] constant right above the final norm is not row-wise: the region would hold no
    matrix multiply, so the graph is refused, naming the constant."""
    with pytest.raises(OutputRowsError, match="does not broadcast along the last axis only"):
        prune_output_rows(_tail_graph(0, pos_add=True)[0])


def test_output_that_is_not_a_token_row_is_refused():
    with pytest.raises(OutputRowsError, match="not the token axis 1"):
        prune_output_rows(_tail_graph(0, axis=0)[0])
    model, _ = _tail_graph(0)
    model.graph.node[-1].op_type = "Identity"
    del model.graph.node[-1].input[1:]
    del model.graph.node[-1].attribute[:]
    with pytest.raises(OutputRowsError, match="not produced by a Gather"):
        prune_output_rows(model)


def test_row_beyond_the_tokens_is_refused():
    with pytest.raises(OutputRowsError, match="row 9 does not exist"):
        prune_output_rows(_tail_graph(9)[0])


@pytest.mark.parametrize("variant", ["plain", "reg"])
def test_exported_dinov2_itae_graph(variant, exported, images, tmp_path):
    """The ITAE graph of a small random DINOv2 (dynamo export): same embedding, the final block's proj
    and MLP on the CLS row, the ITAE subgraph untouched."""
    from graph_passes.config import ITAEConfig
    from graph_passes.itae import apply_itae

    base = onnx.load(str(exported(variant, "dynamo")))
    patched, _ = apply_itae(base, ITAEConfig())
    pruned, res = prune_output_rows(patched)
    onnx.checker.check_model(pruned)
    assert res.matmuls == 3, res.summary()  # proj, fc1, fc2 of the final block
    itae_nodes = lambda m: sorted(n.name for n in m.graph.node if n.name.startswith("itae/"))  # noqa: E731
    assert itae_nodes(pruned) == itae_nodes(patched)
    x = images.numpy()
    run = lambda m: ort.InferenceSession(m.SerializeToString()).run(None, {m.graph.input[0].name: x})[0]  # noqa: E731
    np.testing.assert_allclose(run(pruned), run(patched), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- in the export pipeline
TINY = dict(random_weights=True, depth=2, img_size=56)


def test_export_prunes_the_onnx_before_validating_it(tmp_path):
    """itae-export optimizes (prunes, k^T) the staged ONNX before the parity check against PyTorch,
    so the committed graph (and every artifact built from it) is the optimized one, proven like any
    export; --no-optimize keeps the graph as exported. Both compute the same embedding."""
    import itae_export
    from graph_passes.metadata import read_metadata
    from itae_export.cli import export_main
    from itae_export.runtime import OrtRunner

    res = itae_export.export("dinov2_vits14", tmp_path / "p.onnx", **TINY)
    assert res.parity["cos_min"] > 0.99999 and res.parity["max_abs"] < 1e-4
    rows = res.run.output_rows
    assert rows is not None and rows["row"] == 0 and rows["region_ops"]["MatMul"] == 3, rows
    pruned = onnx.load(str(tmp_path / "p.onnx"), load_external_data=False)
    assert is_pruned(pruned) and read_metadata(pruned).output_rows == rows
    kt = res.run.optimizations["k_transpose"]  # the other optimization: the first block's k^T
    assert kt["rewritten"] == 1 and read_metadata(pruned).k_transpose == kt
    assert sum(n.name.startswith("itae/") for n in pruned.graph.node) > 0  # ITAE is still there

    assert export_main(["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56",
                        "--no-optimize", "--out", str(tmp_path / "f.onnx")]) == 0
    full = onnx.load(str(tmp_path / "f.onnx"), load_external_data=False)
    assert not is_pruned(full) and read_metadata(full).output_rows is None
    assert read_metadata(full).k_transpose is None
    assert not any(n.name.startswith("output_rows/") for n in full.graph.node)
    x = np.random.default_rng(3).standard_normal((3, 3, 56, 56)).astype(np.float32)
    np.testing.assert_allclose(OrtRunner(tmp_path / "p.onnx").run(x), OrtRunner(tmp_path / "f.onnx").run(x),
                               atol=1e-5, rtol=0)


def test_graph_options_and_fast_path_on_the_pruned_graph(tmp_path):
    """--l2-normalize and the uint8 input are added after the pruning (the output Gather is its
    anchor), and the int8 fast path keeps the pruned final block out of quantization."""
    import itae_export
    from graph_passes.final_block import final_block_nodes
    from graph_passes.metadata import read_metadata

    res = itae_export.export("dinov2_vits14", tmp_path / "g.onnx", graph_options=itae_export.GraphOptions(
        "uint8-nhwc", l2_normalize=True), **TINY)
    g = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    meta = read_metadata(g)
    assert meta.output_rows == res.run.output_rows and meta.l2_normalize and meta.uint8_nhwc_input
    px = np.random.default_rng(1).integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    y = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {g.graph.input[0].name: px})[0]
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, atol=1e-5)

    res = itae_export.export("dinov2_vits14", tmp_path / "q.onnx", fast_path="int8", **TINY)
    q = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert read_metadata(q).output_rows == res.run.output_rows is not None
    final = final_block_nodes(q)
    assert any(n.startswith("output_rows/") for n in final)  # the slices belong to the final block
    quantized = {n.name for n in q.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeLinear")}
    assert quantized and not quantized & final
