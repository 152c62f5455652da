"""Deployment graph passes (graph_passes/preprocess.py): uint8 NHWC input and L2-normalised output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graph_passes.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    L2_NORMALIZE_KEY,
    UINT8_INPUT_KEY,
    PreprocessPassError,
    add_l2_normalize,
    add_uint8_nhwc_input,
    applied_passes,
    external_data_locations,
    save_model,
)

H, W = 10, 12


def tiny_model(
    *, dtype: int = TensorProto.FLOAT, opset: int = 18, batch: int | str = "batch", hw=(H, W), seed: int = 0
) -> onnx.ModelProto:
    """Conv -> GlobalAveragePool -> Flatten -> MatMul: image [B,3,H,W] -> embedding [B,5]."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    conv_w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np_dtype), "conv_w")
    conv_b = numpy_helper.from_array(rng.normal(size=(4,)).astype(np_dtype), "conv_b")
    fc = numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np_dtype), "fc")
    nodes = [
        helper.make_node("Conv", ["pixel_values", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "fc"], ["embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixel_values", dtype, [batch, 3, *hw])],
        [helper.make_tensor_value_info("embedding", dtype, [batch, 5])],
        [conv_w, conv_b, fc],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model.metadata_props.add(key="itae", value='{"norm_source": "v"}')
    return model


def run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def normalise(pixels_nhwc: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    x = pixels_nhwc.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    return (x - np.reshape(mean, (1, 3, 1, 1))) / np.reshape(std, (1, 3, 1, 1))


def pixels(batch: int, seed: int = 1, hw=(H, W)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(batch, *hw, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ uint8


@pytest.mark.parametrize("opset", [17, 18])
def test_uint8_input_matches_float_model_with_preprocessing(opset: int) -> None:
    model = tiny_model(opset=opset)
    new, res = add_uint8_nhwc_input(model)
    onnx.checker.check_model(new, full_check=True)
    assert [n.op_type for n in new.graph.node[:4]] == ["Cast", "Transpose", "Mul", "Add"]
    assert res.nodes == ("Cast", "Transpose", "Mul", "Add")
    perm = next(a for a in new.graph.node[1].attribute if a.name == "perm")
    assert list(perm.ints) == [0, 3, 1, 2]
    # the input keeps its name, becomes uint8 NHWC with the symbolic batch dim
    (inp,) = new.graph.input
    assert inp.name == "pixel_values" and inp.type.tensor_type.elem_type == TensorProto.UINT8
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", H, W, 3]
    # the original is untouched
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    for batch in (1, 3):  # dynamic batch still works
        px = pixels(batch, seed=batch)
        got = run(new, px)
        ref = run(model, normalise(px).astype(np.float32))
        assert got.shape == (batch, 5)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_uint8_metadata_carried_and_recorded() -> None:
    new, res = add_uint8_nhwc_input(
        tiny_model(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0), input_name="images"
    )
    md = {p.key: p.value for p in new.metadata_props}
    assert md["itae"] == '{"norm_source": "v"}'  # existing metadata kept
    rec = json.loads(md[UINT8_INPUT_KEY])
    assert rec["input_name"] == "images" and rec["source_input"] == "pixel_values"
    assert rec["std"] == [0.25, 0.5, 1.0] and rec["height"] == H and rec["width"] == W
    assert applied_passes(new)[UINT8_INPUT_KEY]["layout"] == "NHWC"
    assert [i.name for i in new.graph.input] == ["images"]
    px = pixels(2)
    ref = run(tiny_model(), normalise(px, (0.5,) * 3, (0.25, 0.5, 1.0)).astype(np.float32))
    np.testing.assert_allclose(run(new, px), ref, rtol=1e-5, atol=1e-5)
    assert res.input_name == "images"


def test_uint8_constants_folded_in_float64() -> None:
    new, _ = add_uint8_nhwc_input(tiny_model())
    inits = {t.name: numpy_helper.to_array(t) for t in new.graph.initializer}
    mul, add = new.graph.node[2], new.graph.node[3]
    scale, bias = inits[mul.input[1]], inits[add.input[1]]
    assert scale.shape == (1, 3, 1, 1) and scale.dtype == np.float32
    std = np.array(IMAGENET_STD)
    np.testing.assert_array_equal(scale.ravel(), (1.0 / (255.0 * std)).astype(np.float32))
    np.testing.assert_array_equal(bias.ravel(), (-np.array(IMAGENET_MEAN) / std).astype(np.float32))


def test_uint8_float16_graph() -> None:
    model = tiny_model(dtype=TensorProto.FLOAT16)
    new, res = add_uint8_nhwc_input(model)
    onnx.checker.check_model(new, full_check=True)
    assert res.graph_dtype == "float16"
    assert [n.op_type for n in new.graph.node[:5]] == ["Cast", "Transpose", "Mul", "Add", "Cast"]
    px = pixels(2)
    got = run(new, px)
    assert got.dtype == np.float16
    ref = run(model, normalise(px).astype(np.float16))
    np.testing.assert_allclose(got.astype(np.float32), ref.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_uint8_refusals() -> None:
    new, _ = add_uint8_nhwc_input(tiny_model())
    with pytest.raises(PreprocessPassError, match="already"):
        add_uint8_nhwc_input(new)
    named, rec = add_uint8_nhwc_input(tiny_model(hw=("h", "w")))  # dynamic-size graphs: the names are kept
    assert (rec.height, rec.width) == ("h", "w")
    assert [d.dim_param or d.dim_value for d in named.graph.input[0].type.tensor_type.shape.dim][1:] == ["h", "w", 3]
    unknown = tiny_model()
    unknown.graph.input[0].type.tensor_type.shape.dim[2].ClearField("dim_value")  # neither a size nor a name
    with pytest.raises(PreprocessPassError, match="must be sizes or named dims"):
        add_uint8_nhwc_input(unknown)
    m = tiny_model()
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    with pytest.raises(PreprocessPassError, match="INT64"):
        add_uint8_nhwc_input(m)
    m = tiny_model()
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 4
    with pytest.raises(PreprocessPassError, match=r"\[B, 3, H, W\]"):
        add_uint8_nhwc_input(m)
    m = tiny_model()
    m.graph.input.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1]))
    with pytest.raises(PreprocessPassError, match="exactly one"):
        add_uint8_nhwc_input(m)
    with pytest.raises(PreprocessPassError, match="std"):
        add_uint8_nhwc_input(tiny_model(), std=(0.2, 0.0, 0.2))
    with pytest.raises(PreprocessPassError, match="already used"):
        add_uint8_nhwc_input(tiny_model(), input_name="fc")
    assert issubclass(PreprocessPassError, ValueError)


# ------------------------------------------------------------------------------------------- L2


@pytest.mark.parametrize("opset", [13, 18])
def test_l2_normalize_unit_rows(opset: int) -> None:
    model = tiny_model(opset=opset)
    new, res = add_l2_normalize(model)
    onnx.checker.check_model(new, full_check=True)
    assert res.nodes == ("ReduceL2", "Max", "Div")
    assert [n.op_type for n in new.graph.node[-3:]] == ["ReduceL2", "Max", "Div"]
    assert [o.name for o in new.graph.output] == ["embedding"]
    x = np.random.default_rng(0).normal(size=(3, 3, H, W)).astype(np.float32)
    raw = run(model, x)
    got = run(new, x)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    assert (
        json.loads({p.key: p.value for p in new.metadata_props}[L2_NORMALIZE_KEY])["output_name"]
        == "embedding"
    )


def test_l2_zero_vector_stays_finite() -> None:
    new, _ = add_l2_normalize(tiny_model())
    # zero the fc weights -> zero embedding: eps keeps the division finite
    for t in new.graph.initializer:
        if t.name == "fc":
            t.CopyFrom(numpy_helper.from_array(np.zeros((4, 5), np.float32), "fc"))
    got = run(new, np.ones((1, 3, H, W), np.float32))
    assert np.all(np.isfinite(got)) and np.all(got == 0)


def test_l2_float16_graph_computes_in_float32() -> None:
    model = tiny_model(dtype=TensorProto.FLOAT16)
    # scale the embedding so the sum of squares overflows float16 (max 65504)
    for t in model.graph.initializer:
        if t.name == "fc":
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * 300).astype(np.float16), "fc"))
    new, res = add_l2_normalize(model)
    onnx.checker.check_model(new, full_check=True)
    assert res.nodes == ("Cast", "ReduceL2", "Max", "Div", "Cast")
    x = np.random.default_rng(0).normal(size=(2, 3, H, W)).astype(np.float16)
    raw = run(model, x).astype(np.float64)
    assert np.max(np.sum(raw**2, axis=1)) > 65504  # the case the float32 compute is for
    got = run(new, x)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=2e-3)


def test_l2_refusals_and_output_choice() -> None:
    new, _ = add_l2_normalize(tiny_model())
    with pytest.raises(PreprocessPassError, match="already"):
        add_l2_normalize(new)
    with pytest.raises(PreprocessPassError, match="no graph output"):
        add_l2_normalize(tiny_model(), "logits")
    m = tiny_model()
    m.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 4, 1, 1]))
    with pytest.raises(PreprocessPassError, match="2 outputs"):
        add_l2_normalize(m)
    with pytest.raises(PreprocessPassError, match="rank 2"):
        add_l2_normalize(m, "p")
    new, _ = add_l2_normalize(m, "embedding")  # the other output still gives the raw tensor
    x = np.ones((1, 3, H, W), np.float32)
    sess = ort.InferenceSession(new.SerializeToString(), providers=["CPUExecutionProvider"])
    emb, p = sess.run(None, {"pixel_values": x})
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    assert p.shape == (1, 4, 1, 1)


def test_both_passes_compose() -> None:
    model = tiny_model()
    new, _ = add_uint8_nhwc_input(model)
    new, _ = add_l2_normalize(new)
    onnx.checker.check_model(new, full_check=True)
    assert set(applied_passes(new)) == {UINT8_INPUT_KEY, L2_NORMALIZE_KEY}
    px = pixels(2)
    raw = run(model, normalise(px).astype(np.float32))
    np.testing.assert_allclose(run(new, px), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)


# ----------------------------------------------------------------------------------- external data


def test_external_data_not_loaded_and_saved_elsewhere(tmp_path: Path) -> None:
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    src = src_dir / "m.onnx"
    onnx.save(tiny_model(), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    data_before = (src_dir / "m.onnx.data").read_bytes()
    lazy = onnx.load(src, load_external_data=False)
    assert external_data_locations(lazy) == ["m.onnx.data"]
    new, _ = add_uint8_nhwc_input(lazy)
    new, _ = add_l2_normalize(new)
    # beside the original: the reference stays valid, nothing copied
    beside = save_model(new, src_dir / "m_deploy.onnx", source_path=src)
    # elsewhere: the data file is copied
    other = save_model(new, tmp_path / "out" / "m_deploy.onnx", source_path=src)
    assert (tmp_path / "out" / "m.onnx.data").read_bytes() == data_before
    assert (src_dir / "m.onnx.data").read_bytes() == data_before  # input untouched
    onnx.checker.check_model(str(other), full_check=True)
    px = pixels(2)
    raw = run(src, normalise(px).astype(np.float32))
    want = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    for path in (beside, other):
        np.testing.assert_allclose(run(path, px), want, atol=1e-6)
    # a different data file in the way is refused, not overwritten
    (tmp_path / "clash").mkdir()
    (tmp_path / "clash" / "m.onnx.data").write_bytes(b"other")
    with pytest.raises(FileExistsError):
        save_model(new, tmp_path / "clash" / "x.onnx", source_path=src)
    with pytest.raises(FileNotFoundError):
        save_model(new, tmp_path / "nowhere" / "x.onnx")
