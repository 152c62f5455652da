"""itae-validate (itae_export.validation, itae_export.testing): parity of artifacts against PyTorch on tiny
random models (depth 2, 56 px), tampered artifacts, weights identity, reports, bad input, engines."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import itae_export
from itae_export.cli.validate_cmd import validate_main
from itae_export.errors import DataError, EngineError, ModelError, UsageError
from itae_export.testing import assert_parity
from itae_export.validation import Artifact, Weights, check_weights

TINY = dict(random_weights=True, depth=2, img_size=56, force=True)


@pytest.fixture(scope="module")
def arts(tmp_path_factory):
    """Every artifact kind, exported once: {name: path}."""
    from itae_export.triton import TritonOptions

    d = tmp_path_factory.mktemp("validate")
    out = {}
    out["plain"] = itae_export.export("dinov2_vits14", d / "plain.onnx", **TINY).onnx
    base = itae_export.export("dinov2_vits14", d / "base.onnx", itae=None, **TINY).onnx
    out["base"] = base
    out["patched"] = itae_export.patch(base, d / "patched.onnx", force=True).out
    out["int8"] = itae_export.export("dinov2_vits14", d / "int8.onnx", fast_path="int8", fast_path_eval_images=10,
                                     **TINY).onnx
    out["int8_fp32"] = d / "int8.fp32.onnx"
    out["demo"] = itae_export.export("dinov2_vits14", d / "demo.onnx", demo_artifacts=True, depth=2, img_size=56,
                                     force=True).onnx
    res = itae_export.export("dinov2_vits14", d / "tr" / "tr.onnx", triton=TritonOptions(repo=d / "repo"), **TINY)
    out["triton_model"] = res.triton.version_dir.parent
    out["triton_version"] = res.triton.version_dir
    return out


def _last_matmul_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    weights = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    return [t for t in model.graph.initializer if t.name in weights and len(t.dims) == 2][-1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = validate_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


# ------------------------------------------------------------------------------------------ passing
@pytest.mark.parametrize("name", ["plain", "base", "patched", "triton_model", "triton_version", "int8_fp32"])
def test_artifacts_pass(arts, name, capsys):
    code, out, err = _run(capsys, arts[name])
    assert code == 0, out + err
    assert "PASSED" in out and "max_abs" in out and "cos_min" in out


def test_api_report(arts):
    rep = itae_export.validate(arts["patched"], n_random=4)
    assert rep and rep.passed and rep.precision == "fp32"
    assert rep.tolerance == {"max_abs": 1e-4, "cos_min": 0.99999, "flag_agreement": 1.0}
    assert rep.check("flagged_agreement").status == "passed" and rep.figures["flagged_agreement"] == 1.0
    assert [c.name for c in rep.checks] == ["max_abs", "cos_min", "flagged_agreement"]
    d = rep.to_dict()
    assert json.loads(json.dumps(d))["passed"] is True and d["images"] == 4
    assert "weights random(seed=0)" in str(rep)
    base = itae_export.validate(arts["base"], n_random=2)
    assert base.check("flagged_agreement").status == "skipped" and "no ITAE" in base.check("flagged_agreement").detail


def test_int8_fast_path_uses_its_tolerance(arts, capsys):
    rep = itae_export.validate(arts["int8"], n_random=20)
    assert rep, str(rep)
    assert rep.precision == "int8" and rep.tolerance["cos_min"] == 0.999 and rep.tolerance["max_abs"] is None
    assert rep.check("max_abs").limit is None  # reported, not checked
    assert rep.check("kmeans_ari").status in ("passed", "skipped")
    # the fp32 limit would be the wrong yardstick for int8: max abs is far above 1e-4 here
    assert rep.figures["max_abs"] > 1e-4
    code, out, _ = _run(capsys, arts["int8"], "--atol", "1e-4")
    assert code == 3 and "max_abs" in out


def test_demo_artifacts_flag_the_same_tokens(arts, capsys):
    rep = itae_export.validate(arts["demo"], n_random=8)
    assert rep, str(rep)
    assert rep.weights == "demo-artifacts(seed=0)"
    assert rep.figures["flagged_agreement"] == 1.0
    assert rep.figures["flagged_reference"] > 0 and rep.figures["flagged_artifact"] == rep.figures["flagged_reference"]
    assert all(p["same"] and p["flagged_reference"] > 0 for p in rep.per_image)
    code, out, _ = _run(capsys, arts["demo"], "--demo-artifacts")
    assert code == 0 and "flagged_agreement 1.0000000" in out


def test_against_other_artifacts(arts, capsys):
    code, out, err = _run(capsys, arts["int8"], "--against", arts["int8_fp32"])
    assert code == 0, out + err
    assert "int8 vs fp32" in out
    code, out, _ = _run(capsys, arts["patched"], "--against", arts["plain"])
    assert code == 0 and "max abs diff 0" in out
    # the baseline against the ITAE model: different outputs, flags only on one side
    rep = itae_export.validate(arts["base"], against=arts["demo"], force=True)
    assert rep.check("flagged_agreement").status == "skipped"


def test_images_folder(arts, tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (70 + 9 * i, 60, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "sub" / "x.jpg")
    rep = itae_export.validate(arts["demo"], images=tmp_path / "imgs")
    assert rep and rep.images == 4 and [p["name"] for p in rep.per_image][-1] == "sub/x.jpg"
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    code, _, err = _run(capsys, arts["plain"], "--images", tmp_path / "imgs")
    assert code == 2 and "bad.png" in err


# --------------------------------------------------------------------------------------- tampering
def test_tampered_graph_weight_fails(arts, tmp_path, capsys):
    m = onnx.load(str(arts["plain"]))
    t = _last_matmul_weight(m)
    w = numpy_helper.to_array(t).copy()
    w.flat[0] += 1.0
    t.CopyFrom(numpy_helper.from_array(w, t.name))
    onnx.save_model(m, str(tmp_path / "tampered.onnx"))
    code, out, err = _run(capsys, tmp_path / "tampered.onnx", "--json", tmp_path / "r.json")
    assert code == 3, out + err
    assert "parity failed" in err and ("max_abs" in err or "cos_min" in err)
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["passed"] is False and {c["name"] for c in rep["checks"] if c["status"] == "failed"}
    with pytest.raises(AssertionError, match="parity failed"):
        assert_parity(tmp_path / "tampered.onnx", n_random=2)


def test_tampered_external_data_fails(arts, tmp_path, capsys):
    m = onnx.load(str(arts["plain"]))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(m, str(ext / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data")
    code, out, err = _run(capsys, ext / "m.onnx", "--random", 2)
    assert code == 0, out + err  # untouched: still the export
    header = onnx.load(str(ext / "m.onnx"), load_external_data=False)
    t = _last_matmul_weight(header)
    offset = int({e.key: e.value for e in t.external_data}["offset"])
    data = bytearray((ext / "m.onnx.data").read_bytes())
    value = np.frombuffer(bytes(data[offset:offset + 4]), np.float32)[0]
    data[offset:offset + 4] = np.float32(value + 1.0).tobytes()
    (ext / "m.onnx.data").write_bytes(bytes(data))
    code, out, err = _run(capsys, ext / "m.onnx", "--random", 2)
    assert code == 3, out + err
    assert "parity failed" in err and ("max_abs" in err or "cos_min" in err)


# ---------------------------------------------------------------------------------- weights identity
def test_wrong_weights_refused_before_comparing(arts, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, out, err = _run(capsys, arts["plain"], "--random-weights", "--seed", 1, "--json", report)
    assert code == 2 and "weights mismatch" in err and "random(seed=0)" in err and "random(seed=1)" in err
    assert "nothing was compared" in err and "max abs" not in out and not report.exists()
    code, out, err = _run(capsys, arts["plain"], "--demo-artifacts", "--json", report)
    assert code == 2 and "weights mismatch" in err and not report.exists()
    code, out, err = _run(capsys, arts["plain"], "--random-weights", "--seed", 1, "--force", "--json", report)
    assert code == 3 and "weights mismatch ignored (--force)" in out  # compared, and (rightly) failed
    assert json.loads(report.read_text())["passed"] is False
    code, out, _ = _run(capsys, arts["plain"], "--random-weights", "--seed", 0, "--random", 2)
    assert code == 0


def test_weights_file_identity(tmp_path):
    w = tmp_path / "dinov2_vits14_pretrain.pth"
    w.write_bytes(b"weights")
    from itae_export.hashing import sha256_file

    art = Artifact(path=tmp_path / "m.onnx", kind="onnx", label="m.onnx", weights=w.name)
    notes: list[str] = []
    assert check_weights(art, Weights("file", path=w), force=False, notes=notes).path == w
    other = tmp_path / "other.pth"
    other.write_bytes(b"weights")
    with pytest.raises(ModelError, match="weights mismatch"):
        check_weights(art, Weights("file", path=other), force=False, notes=notes)
    with pytest.raises(ModelError, match="weights mismatch"):
        check_weights(art, Weights("random", 0), force=False, notes=notes)
    with pytest.raises(UsageError, match="pass --weights PATH"):
        check_weights(art, None, force=False, notes=notes)
    # a recorded sha256 decides, whatever the file is called
    art.weights_sha256 = sha256_file(w)
    assert check_weights(art, Weights("file", path=other), force=False, notes=notes).path == other
    (tmp_path / "changed.pth").write_bytes(b"other weights")
    with pytest.raises(ModelError, match="sha256"):
        check_weights(art, Weights("file", path=tmp_path / "changed.pth"), force=False, notes=notes)


# -------------------------------------------------------------------------------------------- reports
def test_junit_xml_one_case_per_check(arts, tmp_path, capsys):
    xml_path, json_path = tmp_path / "out" / "junit.xml", tmp_path / "out" / "r.json"
    code, out, err = _run(capsys, arts["plain"], "--random", 20, "--junit-xml", xml_path, "--json", json_path)
    assert code == 0, out + err
    root = ET.parse(xml_path).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == ["max_abs", "cos_min", "flagged_agreement", "kmeans_ari"]
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("failures") == "0"
    assert json.loads(json_path.read_text())["images"] == 20
    # a rerun replaces the reports (CI reruns write the same paths)
    assert validate_main([str(arts["plain"]), "--random", "2", "--junit-xml", str(xml_path)]) == 0
    assert len(ET.parse(xml_path).getroot().findall(".//testcase")) == 3
    # failures are <failure> elements a JUnit reader counts
    rep = itae_export.validate(arts["plain"], n_random=2, cos_min=1.0, atol=0.0)
    root = ET.fromstring(rep.junit_xml().split("\n", 1)[1])
    assert len(root.findall(".//failure")) == len(rep.failed) >= 1


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_nothing_written(arts, tmp_path, capsys):
    report = tmp_path / "r.json"
    code, _, err = _run(capsys, tmp_path / "missing.onnx", "--json", report)
    assert code == 2 and "does not exist" in err
    # no itae-export metadata
    m = onnx.load(str(arts["base"]))
    del m.metadata_props[:]
    onnx.save_model(m, str(tmp_path / "bare.onnx"))
    code, _, err = _run(capsys, tmp_path / "bare.onnx", "--random-weights", "--json", report)
    assert code == 2 and "no itae-export metadata" in err and "--model" in err
    # images: missing, a file, empty
    (tmp_path / "empty").mkdir()
    for folder, why in ((tmp_path / "nope", "does not exist"), (arts["plain"], "is not a folder"),
                        (tmp_path / "empty", "holds no images")):
        code, _, err = _run(capsys, arts["plain"], "--images", folder, "--json", report)
        assert code == 2 and why in err
    code, _, err = _run(capsys, arts["plain"], "--atol", "-1", "--json", report)
    assert code == 2 and "--atol" in err
    code, _, err = _run(capsys, arts["plain"], "--seed", "3")
    assert code == 2 and "--seed applies" in err
    code, _, err = _run(capsys, arts["plain"], "--json", tmp_path)
    assert code == 2 and "is a folder" in err
    assert not report.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bare.onnx", "empty"]
    with pytest.raises(DataError):
        itae_export.validate(arts["plain"], images=tmp_path / "empty")
    with pytest.raises(UsageError, match="--cos-min"):
        itae_export.validate(arts["plain"], cos_min=2)


def test_artifact_without_metadata_given_model_and_size(arts, tmp_path, capsys):
    m = onnx.load(str(arts["base"]))
    del m.metadata_props[:]
    onnx.save_model(m, str(tmp_path / "bare.onnx"))
    code, out, err = _run(capsys, tmp_path / "bare.onnx", "--model", "dinov2_vits14", "--img-size", 56,
                          "--random-weights", "--random", 2)
    assert code == 0, out + err
    assert "records no weights identity" in out
    code, _, err = _run(capsys, tmp_path / "bare.onnx", "--model", "dinov2_vits14_reg", "--img-size", 56,
                        "--random-weights")
    assert code == 2 and "prefix tokens" in err
    code, _, err = _run(capsys, arts["plain"], "--model", "dinov2_vitb14")
    assert code == 2 and "records model dinov2_vits14" in err


# --------------------------------------------------------------------------------------------- engines
def _fake_engine(folder: Path, onnx_path: Path, precision: str = "fp16") -> Path:
    from itae_export.hashing import sha256_file

    folder.mkdir(parents=True, exist_ok=True)
    src = folder / onnx_path.name
    shutil.copyfile(onnx_path, src)
    engine = folder / "m.engine"
    engine.write_bytes(b"FAKE-ENGINE")
    meta = onnx.load(str(src), load_external_data=False)
    itae = json.loads({p.key: p.value for p in meta.metadata_props}["itae.settings"])
    side = {"format": "itae-export.engine.v1", "model": "dinov2_vits14", "img_size": 56, "num_prefix_tokens": 1,
            "itae": itae, "precision": precision,
            "batch_profile": {"input": "pixel_values", "min": [1, 3, 56, 56], "opt": [2, 3, 56, 56],
                              "max": [4, 3, 56, 56]},
            "engine": {"file": engine.name, "sha256": sha256_file(engine)},
            "onnx": {"file": src.name, "sha256": sha256_file(src), "external_data_sha256": {}}}
    (folder / "m.engine.json").write_text(json.dumps(side))
    return engine


def test_engine_through_the_engine_runner(arts, tmp_path, monkeypatch, capsys):
    import itae_export.engine as eng
    from itae_export.runtime import OrtRunner

    engine = _fake_engine(tmp_path / "e", arts["demo"])
    seen: list[int] = []

    def runner(engine_path, spec, builder, trtexec):
        assert engine_path == engine and spec.name == "pixel_values"
        ort = OrtRunner(arts["demo"])

        def run(x):
            seen.append(len(x))
            return ort.run(x) + 1e-4  # fp16-like noise
        return run, "fake-runner"

    monkeypatch.setattr(eng, "_make_engine_runner", runner)
    rep = itae_export.validate(engine, n_random=6)
    assert rep, str(rep)
    assert seen == [4, 2]  # batched by the engine profile's max batch
    assert rep.precision == "engine-fp16" and rep.tolerance["cos_min"] == eng.PARITY_TOLERANCES["fp16"]["cos_min"]
    assert rep.weights == "demo-artifacts(seed=0)"  # from the ONNX the engine was built from
    assert rep.check("flagged_agreement").status == "skipped" and "engine" in rep.check("flagged_agreement").detail
    # an engine that computes something else fails
    wrong = np.random.default_rng(0).normal(size=(8, 384)).astype(np.float32)
    monkeypatch.setattr(eng, "_make_engine_runner", lambda *a: ((lambda x: wrong[: len(x)]), "fake"))
    code, out, err = _run(capsys, engine)
    assert code == 3 and "cos_min" in err
    # engine vs its ONNX, no PyTorch
    monkeypatch.setattr(eng, "_make_engine_runner", runner)
    code, out, err = _run(capsys, engine, "--against", arts["demo"])
    assert code == 0, out + err


def test_triton_plan_version(arts, tmp_path, monkeypatch, capsys):
    import itae_export.engine as eng
    from itae_export.runtime import OrtRunner
    from itae_export.triton import TritonOptions, deploy

    engine = _fake_engine(tmp_path / "e", arts["plain"], precision="fp32")
    res = deploy(engine, TritonOptions(repo=tmp_path / "repo", model_name="eng"))
    assert (res.version_dir / "model.plan").is_file()
    monkeypatch.setattr(eng, "_make_engine_runner", lambda *a: (OrtRunner(arts["plain"]).run, "fake"))
    code, out, err = _run(capsys, tmp_path / "repo" / "eng")
    assert code == 0, out + err
    assert "triton-engine, engine-fp32 tolerance" in out


def test_engine_without_tensorrt_is_exit_4(arts, tmp_path, monkeypatch, capsys):
    import itae_export.engine as eng

    engine = _fake_engine(tmp_path / "e", arts["plain"])
    monkeypatch.setattr(eng, "import_tensorrt", lambda: (None, "No module named 'tensorrt'"))
    monkeypatch.setattr(eng, "find_trtexec", lambda: None)
    code, out, err = _run(capsys, engine)
    assert code == 4 and "no TensorRT runtime" in err and "pip install" in err
    with pytest.raises(EngineError):
        itae_export.validate(engine)
    (tmp_path / "e" / "m.engine.json").unlink()
    code, _, err = _run(capsys, engine, "--model", "dinov2_vits14", "--img-size", 56, "--random-weights")
    assert code == 2 and "--precision" in err


@pytest.mark.gpu
def test_real_engine_on_gpu(tmp_path):
    from itae_export.engine import EngineOptions, gpu_info, import_tensorrt

    if import_tensorrt()[0] is None:
        pytest.skip(f"TensorRT Python package not usable ({import_tensorrt()[1]})")
    if gpu_info() is None:
        pytest.skip("no NVIDIA GPU visible")
    res = itae_export.export("dinov2_vits14", tmp_path / "m.engine", engine=EngineOptions(precision="fp32"),
                             demo_artifacts=True, depth=2, img_size=56, force=True)
    assert res.engine["parity"]["ok"]
    assert_parity(tmp_path / "m.engine", n_random=8)
    assert_parity(tmp_path / "m.engine", against=tmp_path / "m.onnx")


def test_flag_agreement_per_image():
    from itae_export.validation import ValidationReport, flag_agreement

    ref = np.zeros((3, 1, 1, 5), bool)  # [N, 1, 1, T] as the graph's comparison; prefix token 0
    ref[:, ..., 2] = True
    other = ref.copy()
    other[1, ..., 4] = True
    other[2, ..., 0] = True  # a prefix token: ignored (the graph masks it after the comparison)
    agree, per, totals = flag_agreement(ref.reshape(3, 5), other, 1, ["a", "b", "c"])
    assert agree == pytest.approx(2 / 3) and [p["same"] for p in per] == [True, False, True]
    assert per[1]["differ"] == 1 and totals["flagged_reference"] == 3 and totals["flagged_artifact"] == 4
    rep = ValidationReport("m.onnx", "onnx", "pytorch", "dinov2_vits14", 56, "fp32", {}, "random(seed=0)", "3", 3,
                           per_image=per)
    assert "image 1 (b): flagged 1 in the reference, 2 in the artifact, 1 tokens differ" in str(rep)
