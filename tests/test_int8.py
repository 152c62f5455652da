"""graph_passes.int8.quantize_dynamic_int8 against onnxruntime's quantize_dynamic on a tiny DINOv2."""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ort = pytest.importorskip("onnxruntime")
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402

from graph_passes.int8 import Int8Error, quantize_dynamic_int8, quantize_weight  # noqa: E402

IMG = 56
META = {"itae_export.model": "dinov2_vits14", "custom.key": "kept"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from itae_export.models import build_model
    from itae_export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("int8")
    exported = export_onnx(build_model("dinov2_vits14", random_weights=True, depth=2, img_size=IMG),
                           d / "export.onnx", img_size=IMG)
    m = onnx.load(str(exported))
    for k, v in META.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save_model(m, str(d / "inline.onnx"))
    onnx.save_model(m, str(d / "ext.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=1024)
    return {"inline": d / "inline.onnx", "ext": d / "ext.onnx", "dir": d}


def _digest(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def _ort_quantize(src: Path, dst: Path, exclude: set[str], per_channel: bool, weight_type: str) -> None:
    logging.disable(logging.WARNING)  # the pre-processing hint
    try:
        quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                         weight_type=QuantType.QInt8 if weight_type == "qint8" else QuantType.QUInt8,
                         per_channel=per_channel, nodes_to_exclude=sorted(exclude),
                         use_external_data_format=any(
                             t.data_location == onnx.TensorProto.EXTERNAL
                             for t in onnx.load(str(src), load_external_data=False).graph.initializer))
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.parametrize(("kind", "per_channel", "weight_type"), [
    ("ext", True, "qint8"), ("inline", True, "qint8"), ("ext", False, "qint8"), ("inline", False, "quint8"),
])
def test_matches_ort_quantize_dynamic(tiny, tmp_path, kind, per_channel, weight_type):
    from graph_passes.final_block import final_block_nodes

    src = tiny[kind]
    inputs = [src] + ([src.parent / "ext.onnx.data"] if kind == "ext" else [])
    before = _digest(inputs)
    exclude = final_block_nodes(onnx.load(str(src), load_external_data=False))
    assert exclude

    ours, ref = tmp_path / "ours.onnx", tmp_path / "ref" / "ort.onnx"
    ref.parent.mkdir()
    res = quantize_dynamic_int8(src, ours, exclude=exclude, per_channel=per_channel, weight_type=weight_type)
    _ort_quantize(src, ref, exclude, per_channel, weight_type)
    assert _digest(inputs) == before, "the input files changed"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == (
        ["ours.onnx", "ours.onnx.data"] if kind == "ext" else ["ours.onnx"])  # no temp files left

    a = onnx.load(str(ours))
    b = onnx.load(str(ref))
    onnx.checker.check_model(a, full_check=True)
    # same quantized MatMuls, same op multiset, same node names and wiring (order may differ: ORT toposorts)
    q_ref = {n.name[: -len("_quant")] for n in b.graph.node if n.op_type == "MatMulInteger"}
    assert set(res.quantized) == q_ref and len(q_ref) >= 4
    assert not set(res.quantized) & exclude
    assert ("excluded" in {r for _, r in res.skipped})
    assert Counter(n.op_type for n in a.graph.node) == Counter(n.op_type for n in b.graph.node)
    sig = lambda m: sorted((n.op_type, n.name, tuple(n.input), tuple(n.output)) for n in m.graph.node)  # noqa: E731
    assert sig(a) == sig(b)
    # bit-identical quantized weights, scales and zero points
    ia = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    ib = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert set(ia) == set(ib)
    qnames = [n for n in ia if n.endswith(("_quantized", "_scale", "_zero_point"))]
    assert len(qnames) == 3 * len(res.quantized_weights)
    for n in ia:
        assert ia[n].dtype == ib[n].dtype and ia[n].shape == ib[n].shape, n
        np.testing.assert_array_equal(ia[n], ib[n], err_msg=n)
    if per_channel:
        assert all(ia[w + "_scale"].ndim == 1 for w in res.quantized_weights)
    assert {p.key: p.value for p in a.metadata_props} == META
    assert list(a.opset_import) == list(onnx.load(str(src), load_external_data=False).opset_import)
    assert res.external_data == (kind == "ext") and res.bytes_out < res.bytes_in

    x = np.random.default_rng(0).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    y_ours, y_ref, y_fp = _run(ours, x), _run(ref, x), _run(src, x)
    # identical graphs and weights: ORT computes the same thing; 1e-5 leaves room for kernel choice
    np.testing.assert_allclose(y_ours, y_ref, atol=1e-5, rtol=0)
    cos = (y_ours * y_fp).sum(1) / np.linalg.norm(y_ours, axis=1) / np.linalg.norm(y_fp, axis=1)
    assert cos.min() >= 0.99


def test_quantize_weight_formula():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 5)).astype(np.float32)
    w[:, 2] = 0.0  # all-zero column: scale 1, q 0 (ORT's tiny-range rule)
    w[:, 3] = np.abs(w[:, 3])
    q, s, z = quantize_weight(w, per_channel=True)
    assert q.dtype == np.int8 and s.shape == (5,) and s.dtype == np.float32 and not z.any()
    assert s[2] == 1.0 and not q[:, 2].any()
    assert np.abs(q).max() == 127 and (np.abs(q).max(axis=0)[[0, 1, 3, 4]] == 127).all()
    np.testing.assert_allclose(q * s, w, atol=float(s[[0, 1, 3, 4]].max()) / 2 + 1e-7)
    qu, su, zu = quantize_weight(w, per_channel=False, weight_type="quint8")
    assert qu.dtype == np.uint8 and su.shape == () and zu.dtype == np.uint8
    np.testing.assert_allclose((qu.astype(np.float32) - float(zu)) * su, w, atol=float(su) / 2 + 1e-6)


def test_refusals(tiny, tmp_path):
    src = tiny["ext"]
    with pytest.raises(Int8Error, match="is the input"):
        quantize_dynamic_int8(src, src, exclude=set())
    with pytest.raises(FileNotFoundError, match="missing.onnx not found"):
        quantize_dynamic_int8(tmp_path / "missing.onnx", tmp_path / "o.onnx", exclude=set())
    with pytest.raises(Int8Error, match="weight_type"):
        quantize_dynamic_int8(src, tmp_path / "o.onnx", exclude=set(), weight_type="int4")
    # an output whose .data file would be the input's data file
    g = onnx.load(str(src), load_external_data=False)
    for t in g.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "b.onnx.data"
    sub = tmp_path / "sub"
    sub.mkdir()
    onnx.save_model(g, str(sub / "a.onnx"))
    shutil.copyfile(src.parent / "ext.onnx.data", sub / "b.onnx.data")
    before = _digest([sub / "b.onnx.data"])
    with pytest.raises(Int8Error, match="would overwrite"):
        quantize_dynamic_int8(sub / "a.onnx", sub / "b.onnx", exclude=set())
    assert _digest([sub / "b.onnx.data"]) == before
    shutil.rmtree(sub)
    assert not list(tmp_path.iterdir())


def test_module_is_torch_free():
    code = ("import sys, graph_passes.int8; bad = [m for m in ('torch', 'itae_export') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
