"""OpenVINO IR target (itae-export --out model.xml, itae_export.openvino_target) on the tiny demo model
(seeded random DINOv2-S, depth 2, 56 px, with planted artifact tokens so ITAE flags something)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov  # a test dependency: .[test] installs the [openvino] extra)
import pytest
from PIL import Image

import itae_export
from itae_export import openvino_target as ovt
from itae_export.errors import DataError, ParityError, UsageError
from itae_export.runtime import OrtRunner

IMG = 56
MODEL = dict(demo_artifacts=True, depth=2, img_size=IMG, fast_path_eval_images=10)


def _image_folder(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def irs(tmp_path_factory):
    """{precision: ExportResult} of one export per precision (int8 calibrated on 8 digits)."""
    root = tmp_path_factory.mktemp("ov")
    out = {}
    for prec in ovt.PRECISIONS:
        kw = {"calibration_images": 8} if prec == "int8" else {}
        out[prec] = itae_export.export("dinov2_vits14", root / prec / "m.xml", precision=prec, **kw, **MODEL)
    return out


def _compile(xml: Path, config: dict):
    core = ov.Core()
    return core.compile_model(core.read_model(str(xml)), "CPU", config)


def _runtime_layers(compiled) -> list[tuple[str, str, str]]:
    """(layer type, runtime precision, original layer names) of every executed layer."""
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        out.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str),
                    info["originalLayersNames"].astype(str)))
    return out


def test_ir_per_precision_files_sidecar_and_parity(irs):
    x = np.random.default_rng(3).standard_normal((3, 3, IMG, IMG)).astype(np.float32)
    for prec, res in irs.items():
        xml = res.request.out
        files = {p.name for p in xml.parent.iterdir()}
        assert files == {"m.xml", "m.bin", "m.xml.json", "m.onnx"}, (prec, files)
        side = json.loads((xml.parent / "m.xml.json").read_text())
        assert side["precision"] == prec and side["format"] == "itae-export.openvino.v1"
        assert side["openvino_version"] == ov.__version__
        assert side["itae"] == res.run.itae and side["model"] == "dinov2_vits14"
        assert side["ir"]["bin_bytes"] == (xml.parent / "m.bin").stat().st_size
        gate = ovt.GATES[prec]
        for where in ("validation", "digits"):
            assert side["parity"][where]["cos_min"] >= gate[f"{where}_cos_min"], (prec, where)
        assert side["parity"]["gate"]["missed"] == []
        # the sidecar's compile_config is what a user passes to compile_model, and it reproduces parity
        y = _compile(xml, side["compile_config"])(x)[0]
        ref = OrtRunner(xml.with_suffix(".onnx")).run(x)
        cos = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= gate["validation_cos_min"], (prec, cos)
    assert irs["fp32"].run.openvino["compile_config"] == {"INFERENCE_PRECISION_HINT": "f32"}
    assert irs["bf16"].run.openvino["compile_config"] == {"INFERENCE_PRECISION_HINT": "bf16"}


def test_default_precision_is_bf16(irs, tmp_path):
    req = itae_export.pipeline.ExportRequest(model="dinov2_vits14", out=tmp_path / "d.xml", random_weights=True)
    assert req.openvino.precision == ovt.DEFAULT_PRECISION == "bf16"
    assert req.onnx_out == tmp_path / "d.onnx"


def test_bf16_keeps_itae_final_block_layernorm_softmax_f32(irs):
    xml = irs["bf16"].request.out
    layers = _runtime_layers(_compile(xml, ovt.compile_config("bf16")))
    itae = [(t, p) for t, p, names in layers if "itae/" in names and t != "Const"]
    assert itae and all(p == "f32" for _, p in itae), itae
    assert all(p == "f32" for t, p, _ in layers if t in ("MVN", "Softmax")), layers
    if ovt.has_bf16():  # the earlier blocks really run in bf16 (and the final block does not)
        assert any(p == "bf16" for t, p, _ in layers if t in ("FullyConnected", "ScaledDotProductAttention"))
    # the peer: the same ONNX with only the bf16 hint lowers ITAE layers to bf16, which the islands prevent
    if ovt.has_bf16():
        core = ov.Core()
        peer = core.compile_model(core.read_model(str(xml.with_suffix(".onnx"))), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "bf16"})
        assert any(p == "bf16" for t, p, names in _runtime_layers(peer) if "itae/" in names and t != "Const")


def _flags(xml: Path, config: dict, x: np.ndarray) -> np.ndarray:
    core = ov.Core()
    model = core.read_model(str(xml))
    name = next(o.get_friendly_name() for o in model.get_ordered_ops() if o.get_friendly_name().startswith("itae/flagged"))
    model.add_outputs([name])
    compiled = core.compile_model(model, "CPU", config)
    return np.asarray(compiled(x)[compiled.outputs[-1]]).astype(bool)


def test_bf16_flagged_tokens_identical_to_f32_on_planted_model(irs):
    from itae_export.fastpath import digits_eval_inputs

    x = np.concatenate([digits_eval_inputs(IMG, 16, seed=2)[0],
                        np.random.default_rng(4).standard_normal((4, 3, IMG, IMG)).astype(np.float32)])
    f32 = _flags(irs["fp32"].request.out, ovt.compile_config("fp32"), x)
    bf16 = _flags(irs["bf16"].request.out, ovt.compile_config("bf16"), x)
    assert f32.any(), "the planted model must flag tokens"
    np.testing.assert_array_equal(bf16, f32)


def test_int8_quantizes_but_leaves_itae_and_final_block(irs):
    xml = irs["int8"].request.out
    model = ov.Core().read_model(str(xml))
    fq = [o for o in model.get_ordered_ops() if o.get_type_name() == "FakeQuantize"]
    assert fq, "NNCF inserted no quantizer"
    consumers = {t.get_node().get_friendly_name() for q in fq for out in q.outputs() for t in out.get_target_inputs()}
    side = json.loads((xml.parent / "m.xml.json").read_text())
    assert side["conversion"]["calibration"] == {**side["conversion"]["calibration"], "images": 8,
                                                 "source": "digits (bundled)"}
    assert not any(n.startswith("itae/") for n in consumers)
    import onnx

    from graph_passes.final_block import final_block_nodes

    final = final_block_nodes(onnx.load(str(xml.with_suffix(".onnx")), load_external_data=False))
    assert not consumers & final
    # the patch embedding and the attention of the other blocks stay float too (FLOAT_TYPES_INT8), while
    # the other blocks' projections and MLPs are quantized
    for kind in ovt.FLOAT_TYPES_INT8:
        ops = [o for o in model.get_ordered_ops() if o.get_type_name() == kind]
        assert ops, kind
        assert not any(i.get_node().get_type_name() == "FakeQuantize" for c in ops for i in c.input_values()), kind
    mm = [o for o in model.get_ordered_ops() if o.get_type_name() == "MatMul" and o.get_friendly_name() not in final]
    assert any(i.get_node().get_type_name() == "FakeQuantize" for m in mm for i in m.input_values())


def test_ir_is_converted_from_the_output_row_pruned_graph(irs):
    """The IR computes the final block's projection, MLP and norm on the CLS row only, as the committed
    .onnx does (the export pruned it before validating it): sidecar record equal to the ONNX metadata's,
    Slice layers of the pass, same embedding."""
    import onnx

    from graph_passes.metadata import read_metadata

    x = np.random.default_rng(5).standard_normal((2, 3, IMG, IMG)).astype(np.float32)
    for prec, res in irs.items():
        xml = res.request.out
        side = json.loads((xml.parent / "m.xml.json").read_text())
        rows = side["conversion"]["output_rows"]
        assert rows["row"] == 0 and rows["region_ops"]["MatMul"] == 3, (prec, rows)
        model = ov.Core().read_model(str(xml))
        slices = [o for o in model.get_ordered_ops()
                  if o.get_friendly_name().startswith("output_rows/") and "Slice" in o.get_type_name()]
        assert len(slices) == 2, prec
        committed = onnx.load(str(xml.with_suffix(".onnx")), load_external_data=False)
        assert sum(n.op_type == "Slice" and n.name.startswith("output_rows/") for n in committed.graph.node) == 2
        assert read_metadata(committed).output_rows == rows == res.run.output_rows, prec
    y = _compile(irs["fp32"].request.out, {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    np.testing.assert_allclose(y, OrtRunner(irs["fp32"].request.out.with_suffix(".onnx")).run(x), atol=1e-4)


def test_triton_repo_openvino_backend(irs, tmp_path):
    from tritonclient.grpc import model_config_pb2

    from itae_export.triton import TritonOptions, deploy, parse_config

    for prec in ("bf16", "fp32"):
        res = deploy(irs[prec].request.out, TritonOptions(repo=tmp_path / "repo", model_name=f"m_{prec}"))
        cfg = parse_config(res.config_path.read_text(), res.config_path)
        assert cfg.backend == "openvino" and not cfg.platform
        assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params == ({"HINT_BF16": "YES"} if prec == "bf16" else {})
        assert {p.name for p in res.version_dir.iterdir()} == {"model.xml", "model.bin", "model.xml.json",
                                                                "itae_export.json"}
    with pytest.raises(UsageError, match="CPU only"):
        deploy(irs["bf16"].request.out, TritonOptions(repo=tmp_path / "repo", instance_kind="KIND_GPU"))


def test_calibration_folder_images(tmp_path):
    opts = ovt.OpenVinoOptions(precision="int8", calibration_data=_image_folder(tmp_path / "calib", 5),
                               calibration_images=3)
    x = ovt.calibration_inputs(opts, IMG)
    assert x.shape == (3, 3, IMG, IMG) and x.dtype == np.float32 and np.isfinite(x).all()


def test_gate_refusal_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setitem(ovt.GATES, "fp32", {"digits_cos_min": 1.5})
    with pytest.raises(ParityError, match="misses its accuracy gate.*nothing was written"):
        itae_export.export("dinov2_vits14", tmp_path / "o" / "m.xml", precision="fp32", **{**MODEL, "depth": 1})
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_bad_inputs_refused_cleanly(tmp_path, capsys):
    from itae_export.cli.export_cmd import export_main

    out = tmp_path / "o"
    with pytest.raises(UsageError, match="--precision"):
        itae_export.export("dinov2_vits14", out / "m.xml", precision="int4", **MODEL)
    with pytest.raises(UsageError, match="apply to an OpenVINO"):
        itae_export.export("dinov2_vits14", out / "m.onnx", precision="bf16", **MODEL)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    (tmp_path / "empty" / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="--calibration-data .*no class sub-folders with images"):
        itae_export.export("dinov2_vits14", out / "m.xml", precision="int8", calibration_data=tmp_path / "empty",
                           **MODEL)
    base = ["dinov2_vits14", "--random-weights", "--depth", "1", "--img-size", "56"]
    assert export_main(base + ["--out", str(out / "m.onnx"), "--precision", "int8"]) == 2
    assert "--precision" in capsys.readouterr().err
    assert export_main(base + ["--out", str(out / "m.xml"), "--precision", "bf16", "--calibration-data",
                               str(tmp_path)]) == 2
    assert "int8 only" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())


def test_ir_without_bin_refused(irs, tmp_path, capsys):
    from itae_export.cli.eval_cmd import eval_main
    from itae_export.ov_runner import OpenVinoRunner

    src = irs["bf16"].request.out
    lone = tmp_path / "lone.xml"
    lone.write_bytes(src.read_bytes())
    with pytest.raises(UsageError, match="lone.bin is missing"):
        OpenVinoRunner(lone)
    report = tmp_path / "report"
    rc = eval_main(["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56", "--dataset", "digits",
                    "--limit", "10", "--no-progress", "--report-dir", str(report), "--openvino", str(lone)])
    assert rc == 2 and "lone.bin is missing" in capsys.readouterr().err
    assert not report.exists() or not list(report.iterdir())
    # a .bin of another size than the sidecar records is refused too
    other = tmp_path / "other"
    other.mkdir()
    for suffix in (".xml", ".xml.json"):
        (other / ("m" + suffix)).write_bytes(Path(str(src.with_suffix("")) + suffix).read_bytes())
    (other / "m.bin").write_bytes(b"\0" * 16)
    with pytest.raises(itae_export.errors.ModelError, match="belongs to another export"):
        OpenVinoRunner(other / "m.xml")
    (other / "m.bin").write_bytes(Path(str(src.with_suffix(".bin"))).read_bytes())
    OpenVinoRunner(other / "m.xml")  # the matching files load
    (other / "m.xml").write_bytes(irs["fp32"].request.out.read_bytes())  # another export's graph
    with pytest.raises(itae_export.errors.ModelError, match="is not the .xml its sidecar"):
        OpenVinoRunner(other / "m.xml")
    big = tmp_path / "big.xml"  # sized before anything reads it (a sparse file: no disk used)
    with open(big, "wb") as f:
        f.truncate((64 << 20) + 1)
    (tmp_path / "big.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="more than the 64 MB an IR graph file needs"):
        OpenVinoRunner(big)


def test_itae_validate_reads_the_ir(irs, tmp_path):
    from itae_export.cli.validate_cmd import validate_main

    rep = itae_export.validate(irs["bf16"].request.out, demo_artifacts=True, n_random=4)
    assert rep and rep.precision == "openvino-bf16" and rep.kind == "openvino"
    lone = tmp_path / "lone.xml"
    lone.write_bytes(irs["bf16"].request.out.read_bytes())
    assert validate_main([str(lone), "--demo-artifacts"]) == 2


def test_island_sets(irs):
    import onnx

    xml = irs["bf16"].request.out
    model = ov.convert_model(str(xml.with_suffix(".onnx")))
    islands = ovt.f32_island_names(model, onnx.load(str(xml.with_suffix(".onnx")), load_external_data=False))
    types = {o.get_friendly_name(): o.get_type_name() for o in model.get_ordered_ops()}
    assert {n for n, t in types.items() if n.startswith("itae/") and t != "Constant"} <= islands.core
    assert {n for n, t in types.items() if t in ("MVN", "Softmax")} <= islands.core  # every block's
    assert sum(types[n] == "MatMul" for n in islands.final_block) >= 4  # qkv, QK, PV, proj, fc1, fc2 (some fused)
    assert any(t == "MatMul" and n not in islands.bf16_keep for n, t in types.items())  # earlier blocks: bf16


def _copy_ir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for suffix in (".xml", ".bin", ".xml.json", ".onnx"):
        f = Path(str(src.with_suffix("")) + suffix)
        if f.exists():
            (dst / ("m" + suffix)).write_bytes(f.read_bytes())
    return dst / "m.xml"


def _edit_sidecar(xml: Path, **changes) -> None:
    side_path = Path(str(xml) + ".json")
    side = json.loads(side_path.read_text())
    side.update(changes)
    side_path.write_text(json.dumps(side))


def test_sidecar_compile_config_is_allowlisted(irs, tmp_path, capsys):
    """A sidecar may come from anywhere: a property outside the allowlist (CACHE_DIR would make OpenVINO
    write compiled blobs to a folder of the file's choosing) or an unknown value is refused, by the
    runner, itae-eval, itae-validate and the Triton writer alike, before anything is compiled or written."""
    from itae_export.cli.eval_cmd import eval_main
    from itae_export.ov_runner import OpenVinoRunner, sidecar_compile_config
    from itae_export.triton import TritonOptions, deploy

    xml = _copy_ir(irs["bf16"].request.out, tmp_path / "ir")
    assert OpenVinoRunner(xml).compile_config == {"INFERENCE_PRECISION_HINT": "bf16"}
    cache = tmp_path / "cache"
    _edit_sidecar(xml, compile_config={"INFERENCE_PRECISION_HINT": "bf16", "CACHE_DIR": str(cache)})
    with pytest.raises(UsageError, match="CACHE_DIR=.* is not a property itae-export accepts"):
        OpenVinoRunner(xml)
    with pytest.raises(UsageError, match="CACHE_DIR"):
        itae_export.validate(xml, demo_artifacts=True, n_random=2)
    with pytest.raises(UsageError, match="CACHE_DIR"):
        deploy(xml, TritonOptions(repo=tmp_path / "repo", model_name="m"))
    rc = eval_main(["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56", "--dataset", "digits",
                    "--limit", "4", "--no-progress", "--report-dir", str(tmp_path / "report"), "--openvino", str(xml)])
    assert rc == 2 and "CACHE_DIR" in capsys.readouterr().err
    assert not cache.exists() and not (tmp_path / "repo").exists()
    for bad in ({"INFERENCE_PRECISION_HINT": "int4"}, {"INFERENCE_NUM_THREADS": "-1"}, {"NUM_STREAMS": ["2"]},
                {"ENABLE_CPU_PINNING": True}, "bf16"):
        with pytest.raises(UsageError, match="compile_config"):
            sidecar_compile_config({"compile_config": bad}, xml)
    ok = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": 2, "NUM_STREAMS": "AUTO",
          "PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": "NO"}
    assert sidecar_compile_config({"compile_config": ok}, xml) == {k: str(v) for k, v in ok.items()}
    # an explicit config is the caller's own choice and is not checked against the sidecar's allowlist
    assert OpenVinoRunner(xml, {"INFERENCE_PRECISION_HINT": "f32"}).compile_config == {"INFERENCE_PRECISION_HINT": "f32"}


def test_sidecar_source_onnx_must_lie_beside_the_ir(irs, tmp_path):
    """The sidecar names the ONNX the IR came from; itae-validate reads it only as a file beside the IR:
    a path to a folder, '..' or a link out of the folder is refused, and nothing outside is read."""
    xml = _copy_ir(irs["bf16"].request.out, tmp_path / "ir")
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((xml.parent / "m.onnx").read_bytes())
    for name in ("../outside.onnx", str(outside), "sub/m.onnx", "..", "C:m.onnx"):
        _edit_sidecar(xml, onnx=name)
        with pytest.raises(UsageError, match="not a plain file name"):
            itae_export.validate(xml, demo_artifacts=True, n_random=2)
    (xml.parent / "link.onnx").symlink_to(outside)
    _edit_sidecar(xml, onnx="link.onnx")
    with pytest.raises(UsageError, match="links out of the folder are refused"):
        itae_export.validate(xml, demo_artifacts=True, n_random=2)
    _edit_sidecar(xml, onnx="m.onnx")
    rep = itae_export.validate(xml, demo_artifacts=True, n_random=2)
    assert rep and rep.kind == "openvino"
