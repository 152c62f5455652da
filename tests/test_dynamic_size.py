"""Dynamic H x W (--dynamic-size): the official position-embedding rule computed in the graph, the
ITAE pass on a dynamic token count, the in-graph size check, engine profiles and Triton configs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from graph_passes.config import ITAEConfig
from graph_passes.itae import apply_itae
from graph_passes.preprocess import IMAGENET_MEAN, IMAGENET_STD
from graph_passes.size_check import SizeCheckError, add_size_check, has_size_check
from itae_export.dynamic_size import SizeBounds
from itae_export.errors import UsageError
from itae_export.pos_embed import interpolate_in_graph, interpolate_official

SIZES = [(112, 112), (224, 224), (168, 252), (252, 168), (518, 518)]  # the acceptance list
BOUNDS = SizeBounds(112, 518)


def _pos(seed: int = 0, dim: int = 16) -> torch.Tensor:
    return torch.randn(1, 37 * 37, dim, generator=torch.Generator().manual_seed(seed)) * 0.1


# ------------------------------------------------------------------------------ the position rule
@pytest.mark.parametrize("registers", [False, True])
def test_in_graph_interpolation_equals_the_official_call(registers):
    pos = _pos()
    for gh, gw in [(8, 8), (16, 16), (12, 18), (18, 12), (37, 37), (37, 20), (40, 40), (64, 48), (1, 1)]:
        want = interpolate_official(pos, (gh, gw), registers=registers)
        got = interpolate_in_graph(pos, gh, gw, registers=registers)
        assert got.shape == want.shape == (1, gh * gw, 16)
        assert (got - want).abs().max().item() < 1e-5, (gh, gw)


def test_plain_rule_is_not_size_based_interpolation():
    """The plain models sample by scale factor (g + 0.1) / 37: a size-based resize (HF optimum's rule)
    is a different computation, and the in-graph version follows the official one."""
    pos = _pos(1)
    src = pos.reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    for g in (8, 16, 24):
        by_size = F.interpolate(src, size=(g, g), mode="bicubic").permute(0, 2, 3, 1).reshape(1, g * g, -1)
        official = interpolate_official(pos, (g, g), registers=False)
        ours = interpolate_in_graph(pos, g, g, registers=False)
        assert (official - by_size).abs().max().item() > 1e-3
        assert (ours - official).abs().max().item() < 1e-5
        assert (ours - by_size).abs().max().item() > 1e-3
    # at 37 x 37 the official code uses the source grid as it is (the scale-factor rule would not)
    assert torch.equal(interpolate_in_graph(pos, 37, 37, registers=False), pos)
    scaled = F.interpolate(src, scale_factor=(37.1 / 37, 37.1 / 37), mode="bicubic")
    assert (scaled.permute(0, 2, 3, 1).reshape(1, 37 * 37, -1) - pos).abs().max().item() > 1e-4


# ------------------------------------------------------------------------------ parity, every size
def _model(variant: str):
    from itae_export.models import build_model

    name = "dinov2_vits14_reg" if variant == "reg" else "dinov2_vits14"
    return build_model(name, random_weights=True, seed=3, depth=2, img_size=224)


@pytest.fixture(scope="module")
def dynamic_exports(tmp_path_factory):
    """{(variant, exporter): (model, baseline ONNX path)} exported once with --dynamic-size bounds."""
    from itae_export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("dynamic")
    out = {}
    for variant in ("plain", "reg"):
        model = _model(variant)
        for exporter in ("dynamo", "torchscript"):
            path = export_onnx(model, root / f"{variant}-{exporter}.onnx", img_size=224, exporter=exporter,
                               dynamic_size=BOUNDS)
            out[(variant, exporter)] = (model, path)
    return out


def _parity(model, onnx_path, cfg):
    import onnxruntime as ort

    from itae_export.parity import compare
    from itae_export.reference import ITAEReference

    model.pos_mode = "official"
    ref = ITAEReference(model, cfg).eval() if cfg is not None else model
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    figures = {}
    for h, w in SIZES:
        x = np.random.default_rng(h * w).standard_normal((2, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        figures[(h, w)] = compare(want, sess.run(None, {"pixel_values": x})[0])
    model.pos_mode = "fixed"
    return figures


@pytest.mark.parametrize("variant", ["plain", "reg"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("itae", [True, False])
def test_one_dynamic_graph_matches_pytorch_at_every_size(dynamic_exports, tmp_path, variant, exporter, itae):
    model, path = dynamic_exports[(variant, exporter)]
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    cfg = ITAEConfig() if itae else None
    if itae:
        patched, res = apply_itae(onnx.load(str(path)), cfg, num_prefix_tokens=model.num_prefix_tokens)
        path = tmp_path / "itae.onnx"
        onnx.save(patched, str(path))
        onnx.checker.check_model(str(path))
    for size, p in _parity(model, path, cfg).items():
        assert p.max_abs <= 1e-4 and p.cos_min >= 0.99999, (size, str(p))


def test_dynamic_itae_uses_each_images_own_patches(dynamic_exports, tmp_path):
    """Relative thresholds per image over a dynamic patch count: the median rule and a threshold
    that flags tokens, every query row, at two sizes."""
    model, path = dynamic_exports[("reg", "dynamo")]
    cfg = ITAEConfig(relative_stat="median", relative_threshold=1.0, rows="all", attenuation="mask")
    patched, _ = apply_itae(onnx.load(str(path)), cfg, num_prefix_tokens=model.num_prefix_tokens)
    out = tmp_path / "median.onnx"
    onnx.save(patched, str(out))
    for size, p in _parity(model, out, cfg).items():
        assert p.max_abs <= 1e-4 and p.cos_min >= 0.99999, (size, str(p))


# ------------------------------------------------------------------------------ the size check
def test_sizes_outside_the_bounds_fail_with_the_models_own_sentence(dynamic_exports):
    from itae_export.runtime import OrtRunner

    _, path = dynamic_exports[("plain", "torchscript")]
    runner = OrtRunner(path)
    assert runner.run(np.zeros((1, 3, 112, 126), np.float32)).shape == (1, 384)
    for h, w in [(98, 112), (532, 224), (230, 224), (224, 225)]:
        with pytest.raises(UsageError, match=rf"multiples of 14 from 112 to 518 pixels, got {h}x{w}"):
            runner.run(np.zeros((1, 3, h, w), np.float32))


def test_size_check_refusals(dynamic_exports):
    _, path = dynamic_exports[("plain", "torchscript")]
    checked = onnx.load(str(path))
    assert has_size_check(checked)
    with pytest.raises(SizeCheckError, match="already has a size check"):
        add_size_check(checked, lo=112, hi=518, multiple=14)
    with pytest.raises(SizeCheckError, match="multiples of 14"):
        add_size_check(checked, lo=100, hi=518, multiple=14)


def test_fixed_size_export_is_unchanged_and_still_the_default(exported):
    from itae_export.pipeline import ExportRequest

    assert ExportRequest(model="dinov2_vits14", out="m.onnx").dynamic_size is None
    m = onnx.load(str(exported("plain", "dynamo")))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 56, 56]
    assert not has_size_check(m)
    with pytest.raises(SizeCheckError, match="fixed H and W"):
        add_size_check(m, lo=112, hi=518, multiple=14)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("kwargs, match", [
    ({"min_size": 100}, "--min-size 100 is not a multiple of the patch size 14; use 98"),
    ({"min_size": 518, "max_size": 224}, "--min-size 518 is above --max-size 224"),
    ({"max_size": 4004}, "--max-size 4004 is above the supported maximum"),
])
def test_bad_bounds_are_refused(kwargs, match):
    from itae_export.pipeline import ExportRequest

    with pytest.raises(UsageError, match=match):
        ExportRequest(model="dinov2_vits14", out="m.onnx", dynamic_size=SizeBounds(**kwargs))


@pytest.mark.parametrize("argv, match", [
    (["--min-size", "112"], "--min-size bound a --dynamic-size export; add --dynamic-size"),
    (["--dynamic-size", "--img-size", "560"], "--img-size 560 .* must lie within --min-size 112 and --max-size 518"),
    (["--dynamic-size", "--fast-path", "fused"], "--fast-path fused needs a fixed token count"),
    (["--dynamic-size", "--out", "m.engine", "--min-shape", "1x3x112x112", "--opt-shape", "8x3x224x224"],
     "give all three of --min-shape"),
])
def test_cli_refuses_bad_dynamic_flags(tmp_path, capsys, argv, match):
    import re

    from itae_export.cli import export_main

    out = ["--out", str(tmp_path / "m.onnx")] if "--out" not in argv else []
    code = export_main(["dinov2_vits14", "--random-weights", *out, *[a if a != "m.engine" else str(tmp_path / a)
                                                                    for a in argv]])
    assert code == 2
    assert re.search(match, capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_validation_sizes_cover_min_opt_nonsquare_max():
    assert BOUNDS.validation_sizes(224) == [(112, 112), (224, 224), (168, 252), (518, 518)]
    small = SizeBounds(56, 112)
    assert small.validation_sizes(56) == [(56, 56), (56, 84), (112, 112)]


# ------------------------------------------------------------------------------ the whole export
@pytest.fixture(scope="module")
def exported_dynamic(tmp_path_factory):
    import itae_export

    root = tmp_path_factory.mktemp("api")
    res = itae_export.export("dinov2_vits14_reg", root / "m.onnx", random_weights=True, depth=1,
                             dynamic_size=SizeBounds(112, 252), validate_batch=2)
    return res


def test_export_reports_parity_per_size_and_records_the_bounds(exported_dynamic):
    from graph_passes.metadata import read_metadata

    res = exported_dynamic
    assert set(res.run.parity_sizes) == {"224x224", "112x112", "168x252", "252x252"}
    for fig in res.run.parity_sizes.values():
        assert fig["max_abs"] <= 1e-4 and fig["cos_min"] >= 0.99999
    meta = read_metadata(onnx.load(str(res.onnx), load_external_data=False))
    assert meta.dynamic_size == {"min": 112, "max": 252, "multiple": 14}
    assert meta.img_size == 224
    assert res.to_dict()["dynamic_size"] == meta.dynamic_size


def test_inspect_shows_the_dynamic_dims(exported_dynamic, capsys):
    from itae_export.cli import inspect_main

    assert inspect_main([str(exported_dynamic.onnx)]) == 0
    text = capsys.readouterr().out
    assert "image size dynamic (input pixel_values [batch, 3, height, width]; H and W multiples of 14 from 112 to 252)" in text


def test_engine_profile_covers_height_and_width(exported_dynamic, tmp_path):
    from itae_export.engine import EngineOptions, build_script_text, profile_shapes, read_input_spec

    spec = read_input_spec(exported_dynamic.onnx)
    assert spec.dynamic_hw and spec.sizes == {"min": 112, "max": 252, "multiple": 14}
    shapes = profile_shapes(spec, EngineOptions(min_batch=1, opt_batch=4, max_batch=16))
    assert shapes == {"min": (1, 3, 112, 112), "opt": (4, 3, 224, 224), "max": (16, 3, 252, 252)}
    opts = EngineOptions(min_shape=(1, 3, 112, 168), opt_shape=(8, 3, 224, 224), max_shape=(8, 3, 252, 252),
                         precision="fp32")
    assert opts.max_batch == 8
    text = build_script_text(exported_dynamic.onnx, tmp_path / "m.engine", spec, opts, "fp32", [])
    for flag in ("--minShapes=pixel_values:1x3x112x168", "--optShapes=pixel_values:8x3x224x224",
                 "--maxShapes=pixel_values:8x3x252x252"):
        assert flag in text
    for bad, match in [((1, 3, 112, 120), "multiples of 14 from 112 to 252"), ((1, 3, 98, 112), "from 112 to 252")]:
        with pytest.raises(UsageError, match=match):
            profile_shapes(spec, EngineOptions(min_shape=bad, opt_shape=(8, 3, 224, 224), max_shape=(8, 3, 252, 252)))


def test_fixed_graph_profile_refuses_other_sizes(exported):
    from itae_export.engine import EngineOptions, profile_shapes, read_input_spec

    spec = read_input_spec(exported("plain", "dynamo"))
    with pytest.raises(UsageError, match="fixed H of 56"):
        profile_shapes(spec, EngineOptions(min_shape=(1, 3, 112, 56), opt_shape=(1, 3, 112, 56),
                                           max_shape=(1, 3, 112, 56)))


def test_triton_config_declares_dynamic_height_and_width(exported_dynamic, tmp_path):
    from itae_export.triton import TritonOptions, deploy

    res = deploy(exported_dynamic.onnx, TritonOptions(repo=tmp_path / "repo"))
    text = next((tmp_path / "repo").glob("*/config.pbtxt")).read_text()
    assert "dims: [ 3, -1, -1 ]" in text
    assert "dynamic size: height and width multiples of 14 from 112 to 252" in text
    assert any("from 112 to 252 (dynamic-size export)" in n for n in res.notes)


def test_uint8_nhwc_input_on_a_dynamic_graph(exported_dynamic, tmp_path):
    import onnxruntime as ort

    from itae_export.graph_options import GraphOptions, apply_graph_options, normalise_pixels

    out = apply_graph_options(exported_dynamic.onnx, tmp_path / "u8.onnx", GraphOptions(input_format="uint8-nhwc"))
    s_u8 = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    s_f = ort.InferenceSession(str(exported_dynamic.onnx), providers=["CPUExecutionProvider"])
    for h, w in [(112, 168), (252, 252)]:
        px = np.random.default_rng(h).integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        want = s_f.run(None, {"pixel_values": normalise_pixels(px, IMAGENET_MEAN, IMAGENET_STD)})[0]
        got = s_u8.run(None, {s_u8.get_inputs()[0].name: px})[0]
        assert np.abs(got - want).max() < 1e-4


def test_a_runtime_that_does_not_check_gather_indices_gets_nan(dynamic_exports, tmp_path):
    """TensorRT does not check Gather indices: simulate it by giving the gate's constant a second
    entry, so index 1 is in range; a bad size must then give NaN, never a cropped result."""
    import onnxruntime as ort
    from onnx import numpy_helper

    _, path = dynamic_exports[("plain", "torchscript")]
    m = onnx.load(str(path))
    gate = next(n for n in m.graph.node if n.name.startswith("size_check/height_and_width_must_be"))
    init = next(t for t in m.graph.initializer if t.name == gate.input[0])
    init.CopyFrom(numpy_helper.from_array(np.array([1.0, 1.0], np.float32), init.name))
    out = tmp_path / "unchecked.onnx"
    onnx.save(m, str(out))
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    good = sess.run(None, {"pixel_values": np.zeros((1, 3, 112, 112), np.float32)})[0]
    bad = sess.run(None, {"pixel_values": np.zeros((1, 3, 230, 224), np.float32)})[0]
    assert np.isfinite(good).all() and np.isnan(bad).all()


def test_itae_validate_checks_every_size_of_a_dynamic_artifact(exported_dynamic):
    import itae_export

    report = itae_export.validate(exported_dynamic.onnx, random_weights=True)
    names = {c.name for c in report.checks}
    assert {"max_abs@112x112", "cos_min@168x252", "max_abs@252x252"} <= names
    assert report.passed, str(report)
    assert set(report.figures["by_size"]) == {"112x112", "168x252", "252x252"}


def test_itae_validate_catches_the_wrong_interpolation_rule(tmp_path, monkeypatch):
    """A plain model exported with the size-based (antialiased) rule: itae-validate, which uses the
    official call, must fail it."""
    import itae_export
    import itae_export.models as models
    from graph_passes import metadata as md
    from itae_export.onnx_export import export_onnx

    real = models.interpolate_in_graph
    model = models.build_model("dinov2_vits14", random_weights=True, seed=0, depth=1, img_size=224)
    monkeypatch.setattr(models, "interpolate_in_graph", lambda p, gh, gw, registers: real(p, gh, gw, registers=True))
    path = export_onnx(model, tmp_path / "wrong.onnx", img_size=224, exporter="torchscript", dynamic_size=BOUNDS)
    monkeypatch.undo()
    m = onnx.load(str(path))
    md.set_metadata_props(m, md.export_metadata(model="dinov2_vits14", img_size=224, num_prefix_tokens=1,
                                                exporter="torchscript", weights="random(seed=0)",
                                                dynamic_size=BOUNDS.to_metadata()))
    onnx.save(m, str(path))
    report = itae_export.validate(path, random_weights=True)
    assert not report.passed
    assert "max_abs@112x112" in {c.name for c in report.failed}


def test_openvino_ir_keeps_dynamic_height_and_width(tmp_path):
    """--dynamic-size with --out model.xml: the IR takes [?,3,?,?], matches the PyTorch reference at
    other sizes, and its runner refuses a bad size in one sentence (OpenVINO does not check Gather)."""
    import openvino as ov

    import itae_export
    from itae_export.ov_runner import OpenVinoRunner
    from itae_export.reference import ITAEReference

    res = itae_export.export("dinov2_vits14", tmp_path / "m.xml", random_weights=True, depth=1, seed=3,
                             dynamic_size=SizeBounds(112, 252), precision="fp32", validate_batch=2,
                             fast_path_eval_images=20)
    shape = ov.Core().read_model(str(tmp_path / "m.xml")).inputs[0].get_partial_shape()
    assert shape.is_dynamic and str(shape) == "[?,3,?,?]"
    runner = OpenVinoRunner(tmp_path / "m.xml")
    from itae_export.models import build_model

    model = build_model("dinov2_vits14", random_weights=True, seed=3, depth=1, img_size=224)
    model.pos_mode = "official"
    ref = ITAEReference(model, ITAEConfig()).eval()
    for h, w in [(112, 168), (252, 252)]:
        x = np.random.default_rng(h).standard_normal((2, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        assert np.abs(runner.run(x) - want).max() < 1e-4
    with pytest.raises(UsageError, match="multiples of 14 from 112 to 252 pixels, got 230x224"):
        runner.run(np.zeros((1, 3, 230, 224), np.float32))
    assert res.run.dynamic_size == {"min": 112, "max": 252, "multiple": 14}
