"""k^T as one Transpose (graph_passes.k_transpose) and the optimizations the export applies
(graph_passes.optimize): exported tiny DINOv2 graphs (both exporters, plain and _reg, patched or
not) give the same outputs in ONNX Runtime, the 3-D k^T detour is gone, the final block and ITAE
are untouched, a second run changes nothing and says why."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graph_passes.config import ITAEConfig
from graph_passes.itae import apply_itae
from graph_passes.k_transpose import canonical_k_transpose
from graph_passes.metadata import read_metadata
from graph_passes.optimize import optimize


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, {model.graph.input[0].name: x})[0]


def _perms(model: onnx.ModelProto) -> list[list[int]]:
    return [list(a.ints) for n in model.graph.node if n.op_type == "Transpose" for a in n.attribute if a.name == "perm"]


@pytest.mark.parametrize("variant", ["plain", "reg"])
def test_dynamo_graph_same_outputs_one_transpose(variant, exported, images):
    base = onnx.load(str(exported(variant, "dynamo")))
    patched, _ = apply_itae(base, ITAEConfig())
    out, res = canonical_k_transpose(patched)
    onnx.checker.check_model(out)
    # depth 2: the first block is rewritten, the final one (ITAE) is kept as it is
    assert res.num_rewritten == 1 and res.kept_final, res.summary()
    assert _perms(out).count([0, 2, 1]) == _perms(patched).count([0, 2, 1]) - 1  # the 3-D detour is gone
    assert _perms(out).count([0, 1, 3, 2]) == _perms(patched).count([0, 1, 3, 2]) + 1
    ins = [n for n in out.graph.node if n.name.startswith("k_transpose/")]
    assert sorted(n.op_type for n in ins) == ["Mul", "Transpose"]
    itae = lambda m: sorted((n.name, n.op_type, tuple(n.input)) for n in m.graph.node if n.name.startswith("itae/"))  # noqa: E731
    assert itae(out) == itae(patched)
    x = images.numpy()
    np.testing.assert_allclose(_run(out, x), _run(patched, x), atol=1e-5, rtol=0)
    rec = read_metadata(out).k_transpose
    assert rec["rewritten"] == 1 and rec["blocks"][0]["scale"] == pytest.approx(64 ** -0.5, rel=1e-6)

    again, res2 = canonical_k_transpose(out)
    assert res2.num_rewritten == 0
    assert any("already one Transpose" in why for _, why in res2.rejected), res2.summary()


def test_torchscript_graph_left_or_rewritten_with_the_same_outputs(exported, images):
    base = onnx.load(str(exported("plain", "torchscript")))
    out, res = canonical_k_transpose(base)
    assert res.num_rewritten + len(res.rejected) >= 1, res.summary()
    x = images.numpy()
    np.testing.assert_allclose(_run(out, x), _run(base, x), atol=1e-5, rtol=0)


def test_optimize_is_idempotent_and_records_both_passes(exported, images):
    patched, _ = apply_itae(onnx.load(str(exported("plain", "dynamo"))), ITAEConfig())
    once, res = optimize(patched)
    assert res.changed and set(res.records) == {"k_transpose", "output_rows"}, res.summary()
    meta = read_metadata(once)
    assert meta.k_transpose == res.records["k_transpose"] and meta.output_rows == res.records["output_rows"]
    twice, res2 = optimize(once)
    assert not res2.changed and res2.records == res.records
    assert any("applied before" in n for n in res2.notes)
    x = images.numpy()
    np.testing.assert_allclose(_run(twice, x), _run(patched, x), atol=1e-5, rtol=0)


def test_nothing_to_rewrite_is_said(exported, images):
    """After fuse_attention there is no plain non-final attention left: optimize says why it left
    k_transpose out, and still prunes the rows."""
    from graph_passes.fuse_attention import fuse_attention

    patched, _ = apply_itae(onnx.load(str(exported("plain", "dynamo"))), ITAEConfig())
    fused, fres = fuse_attention(patched)
    assert fres.num_fused == 1
    out, res = optimize(fused)
    assert "k_transpose" not in res.records and "output_rows" in res.records
    assert any(n.startswith("k_transpose not applied") for n in res.notes), res.notes
    x = images.numpy()
    np.testing.assert_allclose(_run(out, x), _run(patched, x), atol=1e-5, rtol=0)
