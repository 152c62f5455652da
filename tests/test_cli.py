"""itae-export / itae-patch / itae-inspect: the happy paths and every refusal, with exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from itae_export.cli import export_main, inspect_main, patch_main

TINY = ["--random-weights", "--depth", "2", "--img-size", "56"]


def test_export_default_command_prints_summary(tmp_path):
    """The README's first command, at full ViT-S/14 size and 224 px, as a user runs it."""
    out = tmp_path / "s14.onnx"
    r = subprocess.run([sys.executable, "-m", "itae_export.cli", "dinov2_vits14", "--random-weights", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "matched final attention" in r.stdout and "12 attention blocks" in r.stdout
    assert "ONNX Runtime vs PyTorch ITAE reference" in r.stdout and "cosine min 1.00000" in r.stdout
    assert out.is_file()
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False).metadata_props}
    assert meta["itae_export.model"] == "dinov2_vits14" and meta["itae_export.img_size"] == "224"
    assert json.loads(meta["itae.settings"])["norm_source"] == "v"
    assert not list(tmp_path.glob(".itae-export-*")), "temporary folder left behind"


def test_export_options_and_refusals(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert export_main(["dinov2_vits14_reg", *TINY, "--out", str(out), "--exporter", "torchscript",
                        "--norm-source", "k", "--norm-scope", "head", "--attenuation", "scale", "--alpha", "0.5"]) == 0
    text = capsys.readouterr().out
    assert "prefix tokens (CLS + registers): 5" in text
    settings = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["itae.settings"])
    assert settings["norm_source"] == "k" and settings["attenuation"] == "scale" and settings["alpha"] == 0.5
    before = out.read_bytes()
    assert export_main(["dinov2_vits14_reg", *TINY, "--out", str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert export_main(["dinov2_vits14", *TINY, "--out", str(tmp_path / "x.onnx"), "--alpha", "2"]) == 2
    err = capsys.readouterr().err
    assert "--alpha" in err and "must lie in [0, 1]" in err
    assert export_main(["dinov2_vits14", *TINY, "--out", str(tmp_path / "x.onnx"), "--threshold", "3",
                        "--relative-threshold", "2"]) == 2
    assert "not both" in capsys.readouterr().err
    assert export_main(["dinov2_vits14", *TINY, "--out", str(tmp_path / "x.txt")]) == 2
    assert "use a .onnx path" in capsys.readouterr().err
    assert export_main(["dinov2_vits14", "--img-size", "56", "--out", str(tmp_path / "x.onnx"),
                        "--weights", str(tmp_path / "missing.pth")]) == 2
    assert "missing.pth does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_main(["dinov2_vits14", *TINY, "--out", str(tmp_path / "x.onnx"), "--norm-source", "x"])
    assert e.value.code == 2
    assert not (tmp_path / "x.onnx").exists()


def test_export_settings_file_and_baseline(tmp_path, capsys):
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"itae": {"threshold": 25.0, "norm_source": "q"}, "calibration": {}}))
    out = tmp_path / "m.onnx"
    assert export_main(["dinov2_vits14", *TINY, "--out", str(out), "--settings", str(settings), "--rows", "all"]) == 0
    s = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["itae.settings"])
    assert (s["threshold"], s["norm_source"], s["rows"]) == (25.0, "q", "all")
    base = tmp_path / "base.onnx"
    assert export_main(["dinov2_vits14", *TINY, "--out", str(base), "--no-itae"]) == 0
    assert "ONNX Runtime vs PyTorch model" in capsys.readouterr().out
    meta = {p.key for p in onnx.load(str(base)).metadata_props}
    assert "itae.settings" not in meta and "itae_export.model" in meta
    assert export_main(["dinov2_vits14", *TINY, "--out", str(tmp_path / "b2.onnx"), "--no-itae", "--rows", "all"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert export_main(["dinov2_vits14", *TINY, "--out", str(tmp_path / "b3.onnx"), "--settings", str(bad)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.fixture(scope="module")
def baseline_ext(tmp_path_factory):
    """A baseline export whose weights live in an external .data file."""
    from conftest import tiny_model

    from itae_export.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("src")
    return export_onnx(tiny_model("reg"), d / "base.onnx", img_size=56, external_data=True)


def test_patch_in_place_folder_references_weights(baseline_ext, capsys):
    src = baseline_ext
    data_before = (src.parent / "base.onnx.data").read_bytes()
    onnx_before = src.read_bytes()
    out = src.parent / "patched.onnx"
    assert patch_main([str(src), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "prefix tokens (CLS + registers): 5" in text and "check on 2 random inputs" in text
    assert not (src.parent / "patched.onnx.data").exists()  # references base.onnx.data
    assert src.read_bytes() == onnx_before and (src.parent / "base.onnx.data").read_bytes() == data_before
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # refuse to patch twice, and refuse to overwrite the input
    assert patch_main([str(out), "--out", str(src.parent / "twice.onnx")]) == 2
    assert "already patched" in capsys.readouterr().err
    assert patch_main([str(src), "--out", str(src), "--force"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert src.read_bytes() == onnx_before


def test_patch_other_folder_copies_weights(baseline_ext, tmp_path):
    out = tmp_path / "o" / "p.onnx"
    assert patch_main([str(baseline_ext), "--out", str(out), "--check", "no"]) == 0
    assert (tmp_path / "o" / "p.onnx.data").is_file()
    # still runs after the source is gone: the copy is what it uses
    moved = tmp_path / "moved"
    shutil.copytree(baseline_ext.parent, moved)
    x = np.zeros((1, 3, 56, 56), dtype=np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    assert y.shape == (1, 384)
    out2 = baseline_ext.parent / "copy.onnx"
    assert patch_main([str(baseline_ext), "--out", str(out2), "--copy-weights", "--check", "no"]) == 0
    assert (baseline_ext.parent / "copy.onnx.data").read_bytes() == (baseline_ext.parent / "base.onnx.data").read_bytes()


def _conv_net(path):
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), dtype=np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "cnn",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])], [w])
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_patch_refusals(tmp_path, capsys):
    assert patch_main([str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "o.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "text.onnx").write_text("hello, I am not a model")
    assert patch_main([str(tmp_path / "text.onnx"), "--out", str(tmp_path / "o.onnx")]) == 2
    assert "is not an ONNX model" in capsys.readouterr().err
    _conv_net(tmp_path / "cnn.onnx")
    assert patch_main([str(tmp_path / "cnn.onnx"), "--out", str(tmp_path / "o.onnx")]) == 2
    err = capsys.readouterr().err
    assert "match failed at step 'softmax'" in err and "no Softmax" in err
    assert inspect_main([str(tmp_path / "cnn.onnx")]) == 2
    assert "step 'softmax'" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_graph_shapes(exported, tmp_path, capsys):
    for variant, exporter, blocks, prefix in (("plain", "dynamo", 2, 1), ("reg", "torchscript", 2, 5)):
        assert inspect_main([str(exported(variant, exporter)), "--json"]) == 0
        rep = json.loads(capsys.readouterr().out)
        assert rep["attention_blocks"] == blocks and rep["num_prefix_tokens"] == prefix
        assert rep["scale_on"] == ["q", "k"] and rep["qkv_projection"] == "fused"
        assert rep["embed_dim"] == 384 and rep["already_patched"] is False
        assert rep["would_insert"]["Where"] == 1
    # a patched graph: reported as such, nothing to insert
    out = tmp_path / "p.onnx"
    assert patch_main([str(exported("plain", "dynamo")), "--out", str(out), "--check", "no"]) == 0
    capsys.readouterr()
    assert inspect_main([str(out)]) == 0
    assert "already patched" in capsys.readouterr().out
