"""Triton model repositories (itae_export/triton.py) and the deployment graph options."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper

from itae_export.cli.triton_args import triton_main as main
from itae_export.errors import DeployError, UsageError
from itae_export.graph_options import GraphOptions, apply_graph_options, verify_graph_options
from itae_export.triton import TritonOptions, default_model_name, deploy, write_triton_repo

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason='the config checks need Triton ModelConfig: pip install "tritonclient[grpc]"',
)

H, W, D = 14, 14, 6
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
ORT_TO_TRITON = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(uint8)": "TYPE_UINT8"}


def save_tiny(path: Path, *, batch: int | str = "batch", seed: int = 0, d: int = D) -> Path:
    """[B,3,H,W] -> Flatten -> MatMul -> [B,d], weights in an external .data file."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(size=(3 * H * W, d)).astype(np.float32) * 0.05, "w")
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["pixel_values"], ["f"]),
            helper.make_node("MatMul", ["f", "w"], ["embedding"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, H, W])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, d])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


def tree_digest(d: Path) -> dict[str, str]:
    return {
        str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(d.rglob("*"))
        if p.is_file()
    }


def parse(path: Path):
    cfg = model_config_pb2.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def assert_config_matches_session(cfg, onnx_path: Path) -> None:
    """Names, types and dims of the config against ONNX Runtime's view of the deployed file."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for kind, ort_list in (("input", sess.get_inputs()), ("output", sess.get_outputs())):
        entries = list(getattr(cfg, kind))
        assert [e.name for e in entries] == [t.name for t in ort_list]
        for e, t in zip(entries, ort_list, strict=True):
            assert model_config_pb2.DataType.Name(e.data_type) == ORT_TO_TRITON[t.type]
            want = [d if isinstance(d, int) else -1 for d in t.shape]
            assert list(e.dims) == (want[1:] if cfg.max_batch_size > 0 else want)


def run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_onnx_repo_layout_and_config(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "export" / "tiny.onnx")
    res = write_triton_repo(
        src, tmp_path / "repo", model_name="tiny", max_batch=4, meta={"model": "x", "itae": None}
    )
    vdir = tmp_path / "repo" / "tiny" / "1"
    assert res.version == 1 and res.version_dir == vdir and res.config_written
    assert (vdir / "model.onnx").read_bytes() == src.read_bytes()  # unchanged graph: exact copy
    assert (vdir / "tiny.onnx.data").read_bytes() == (src.parent / "tiny.onnx.data").read_bytes()
    assert json.loads((vdir / "itae_export.json").read_text())["meta"]["model"] == "x"
    cfg = parse(res.config_path)
    assert cfg.name == "tiny" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 4
    assert cfg.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in cfg.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)
    ]
    assert list(cfg.input[0].dims) == [3, H, W] and list(cfg.output[0].dims) == [D]
    assert_config_matches_session(cfg, vdir / "model.onnx")
    x = np.random.default_rng(0).normal(size=(2, 3, H, W)).astype(np.float32)
    np.testing.assert_array_equal(run(vdir / "model.onnx", x), run(src, x))
    assert not [p for p in res.model_dir.iterdir() if p.name.startswith(".")]  # no staging left


def test_new_version_leaves_old_untouched_and_keeps_config(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_triton_repo(save_tiny(tmp_path / "a" / "m.onnx", seed=0), repo, model_name="emb", max_batch=4)
    before = tree_digest(repo)
    res = write_triton_repo(save_tiny(tmp_path / "b" / "m.onnx", seed=1), repo, model_name="emb", max_batch=4)
    assert res.version == 2 and not res.config_written
    after = tree_digest(repo)
    assert {k: v for k, v in after.items() if not k.startswith("emb/2/")} == before
    assert after["emb/2/m.onnx.data"] != before["emb/1/m.onnx.data"]  # really the new weights
    # versions count up from the highest existing one
    (repo / "emb" / "7").mkdir()
    assert write_triton_repo(tmp_path / "b" / "m.onnx", repo, model_name="emb", max_batch=4).version == 8


def test_incompatible_config_refused_without_writing(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    src = save_tiny(tmp_path / "a" / "m.onnx")
    write_triton_repo(src, repo, model_name="emb", max_batch=4)
    before = tree_digest(repo)
    with pytest.raises(DeployError, match="another model"):
        write_triton_repo(save_tiny(tmp_path / "b" / "m.onnx", d=D + 1), repo, model_name="emb", max_batch=4)
    with pytest.raises(DeployError, match="max_batch_size"):
        write_triton_repo(src, repo, model_name="emb", max_batch=2)
    with pytest.raises(DeployError, match="TYPE_UINT8"):
        write_triton_repo(src, repo, model_name="emb", max_batch=4, graph_options=GraphOptions("uint8-nhwc"))
    assert tree_digest(repo) == before
    assert sorted(p.name for p in (repo / "emb").iterdir()) == ["1", "config.pbtxt"]
    # a hand-written config without IO (Triton auto-completes it) is compatible and kept as is
    (repo / "auto").mkdir()
    (repo / "auto" / "config.pbtxt").write_text('platform: "onnxruntime_onnx"\nmax_batch_size: 4\n')
    res = write_triton_repo(src, repo, model_name="auto", max_batch=4)
    assert not res.config_written and (repo / "auto" / "config.pbtxt").read_text().count("\n") == 2
    (repo / "bad").mkdir()
    (repo / "bad" / "config.pbtxt").write_text("max_batch_size: [oops\n")
    with pytest.raises(DeployError, match="not a valid Triton model config"):
        write_triton_repo(src, repo, model_name="bad", max_batch=4)


def test_graph_options_in_deployed_copy(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "export" / "m.onnx")
    src_bytes = src.read_bytes()
    res = write_triton_repo(
        src, tmp_path / "repo", model_name="raw", max_batch=8, graph_options=GraphOptions("uint8-nhwc", True)
    )
    assert src.read_bytes() == src_bytes  # the source is never modified
    cfg = parse(res.config_path)
    assert model_config_pb2.DataType.Name(cfg.input[0].data_type) == "TYPE_UINT8"
    assert list(cfg.input[0].dims) == [H, W, 3]
    assert "L2-normalised" in res.config_path.read_text()
    deployed = res.version_dir / "model.onnx"
    onnx.checker.check_model(str(deployed), full_check=True)
    assert_config_matches_session(cfg, deployed)
    px = np.random.default_rng(3).integers(0, 256, size=(3, H, W, 3), dtype=np.uint8)
    x = ((px.transpose(0, 3, 1, 2) / 255.0 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)).astype(
        np.float32
    )
    ref = run(src, x)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(run(deployed, px), ref, atol=1e-5)
    prov = json.loads((res.version_dir / "itae_export.json").read_text())
    assert set(prov["graph_options"]) == {"uint8_nhwc_input", "l2_normalize"}


def test_batching_options(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "m.onnx")
    res = write_triton_repo(
        src, tmp_path / "repo", model_name="nobatch", max_batch=0, instance_kind="KIND_CPU"
    )
    cfg = parse(res.config_path)
    assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching")
    assert list(cfg.input[0].dims) == [-1, 3, H, W]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert_config_matches_session(cfg, res.version_dir / "model.onnx")
    static = save_tiny(tmp_path / "s" / "m.onnx", batch=1)
    with pytest.raises(DeployError, match="dynamic batch"):
        write_triton_repo(static, tmp_path / "repo", model_name="static", max_batch=4)
    assert not (tmp_path / "repo" / "static").exists() or not any((tmp_path / "repo" / "static").iterdir())
    with pytest.raises(UsageError, match="model-name"):
        write_triton_repo(src, tmp_path / "repo", model_name="../x", max_batch=4)


def _fake_engine(tmp_path: Path, *, sidecar: dict | None) -> Path:
    eng = tmp_path / "eng" / "model.engine"
    eng.parent.mkdir(parents=True)
    eng.write_bytes(b"not really a plan")
    if sidecar is not None:
        (eng.parent / "model.engine.json").write_text(json.dumps(sidecar))
    return eng


SIDECAR = {
    "inputs": [
        {"name": "pixel_values", "dtype": "float32", "shape": [-1, 3, 28, 28], "max_shape": [16, 3, 28, 28]}
    ],
    "outputs": [{"name": "embedding", "dtype": "DataType.HALF", "shape": [-1, 384]}],
    "compute_capability": [9, 0],
    "device_name": "NVIDIA H100",
    "tensorrt_version": "10.9",
}


def test_plan_from_sidecar(tmp_path: Path) -> None:
    eng = _fake_engine(tmp_path, sidecar=SIDECAR)
    res = write_triton_repo(eng, tmp_path / "repo", model_name="trt")
    assert (res.version_dir / "model.plan").read_bytes() == eng.read_bytes()
    text = res.config_path.read_text()
    cfg = parse(res.config_path)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16  # the profile's max
    assert dict(cfg.cc_model_filenames) == {"9.0": "model.plan"}
    assert "compute capability 9.0 (NVIDIA H100)" in text
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("pixel_values", [3, 28, 28])]
    assert model_config_pb2.DataType.Name(cfg.output[0].data_type) == "TYPE_FP16"
    with pytest.raises(UsageError, match="optimization profile"):
        write_triton_repo(eng, tmp_path / "repo2", model_name="trt", max_batch=32)
    with pytest.raises(UsageError, match="GPU only"):
        write_triton_repo(eng, tmp_path / "repo2", model_name="trt", instance_kind="KIND_CPU")
    with pytest.raises(UsageError, match="before building the engine"):
        write_triton_repo(eng, tmp_path / "repo2", model_name="trt", graph_options=GraphOptions("uint8-nhwc"))
    with pytest.raises(DeployError, match="another model"):  # an ONNX under a plan's config
        write_triton_repo(
            save_tiny(tmp_path / "o" / "m.onnx"), tmp_path / "repo", model_name="trt", max_batch=16
        )


def test_plan_without_sidecar_needs_tensorrt(tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="with TensorRT installed the engine itself is read")
    eng = _fake_engine(tmp_path, sidecar=None)
    with pytest.raises(DeployError):
        write_triton_repo(eng, tmp_path / "repo", model_name="trt")


def test_plan_without_sidecar_or_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as on a machine without it
    eng = _fake_engine(tmp_path, sidecar=None)
    with pytest.raises(DeployError, match="sidecar"):
        write_triton_repo(eng, tmp_path / "repo", model_name="trt")


def test_deploy_with_options(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "e" / "m.onnx")
    opts = TritonOptions(repo=tmp_path / "repo", max_batch=2)
    meta = {"model": "dinov2_vits14", "img_size": 14, "itae": {"norm_source": "v"}}
    res = deploy(src, opts, graph_options=GraphOptions(None, True), meta=meta)
    assert res.model_dir.name == "dinov2_vits14_itae" == default_model_name(meta, src)
    assert parse(res.config_path).max_batch_size == 2 and "ITAE:" in res.config_path.read_text()
    out = run(res.version_dir / "model.onnx", np.ones((1, 3, H, W), np.float32))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("kwargs, flag", [
    ({"model_name": "a/b"}, "--model-name"), ({"model_name": "x\ny"}, "--model-name"), ({"model_name": "abc\n"}, "--model-name"),
    ({"model_name": ".."}, "--model-name"), ({"instances": 0}, "--instances"), ({"instances": True}, "--instances"),
    ({"max_batch": -1}, "--max-batch"), ({"instance_kind": "KIND_TPU"}, "--instance-kind"),
    ({"platform": "tf"}, "--platform"),
])
def test_triton_options_refused_up_front(tmp_path: Path, kwargs, flag) -> None:
    with pytest.raises(UsageError, match=re.escape(flag)):
        TritonOptions(repo=tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_apply_graph_options_files(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "m.onnx")
    ns = GraphOptions(None, False)
    assert apply_graph_options(src, tmp_path / "o.onnx", ns) == src and not (tmp_path / "o.onnx").exists()
    ns = GraphOptions("uint8-nhwc", True)
    out = apply_graph_options(src, tmp_path / "m.deploy.onnx", ns)
    assert out == tmp_path / "m.deploy.onnx"
    parity = verify_graph_options(src, out)
    assert parity["max_abs"] < 1e-5 and parity["cos_min"] > 0.99999
    # idempotent on an already rewritten model; float32-nchw on a uint8 model is refused
    assert (
        apply_graph_options(out, tmp_path / "again.onnx", ns) == out
        and not (tmp_path / "again.onnx").exists()
    )
    with pytest.raises(UsageError, match="float32-nchw"):
        apply_graph_options(
            out, tmp_path / "f.onnx", GraphOptions("float32-nchw", False)
        )
    with pytest.raises(UsageError, match="input ONNX"):
        apply_graph_options(src, src, ns)
    # elsewhere: the .data comes along
    other = apply_graph_options(src, tmp_path / "sub" / "m.onnx", ns)
    assert (tmp_path / "sub" / "m.onnx.data").is_file() and verify_graph_options(src, other)[
        "cos_min"
    ] > 0.99999


def test_standalone_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = save_tiny(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    rc = main(
        [str(src), "--triton-repo", str(repo), "--input-format", "uint8-nhwc", "--max-batch", "4", "--json"]
    )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == 1 and printed["inputs"][0]["data_type"] == "TYPE_UINT8"
    assert parse(repo / "m" / "config.pbtxt").name == "m"
    assert (
        main([str(src), "--triton-repo", str(repo), "--max-batch", "4"]) == DeployError.exit_code
    )  # float vs uint8
    assert "another model" in capsys.readouterr().err
    assert main([str(src)]) == UsageError.exit_code


def test_plan_from_engine_builder_sidecar(tmp_path: Path) -> None:
    """The sidecar itae_export.engine writes: IO from the ONNX it names (hash-checked), profile, GPU."""
    engine = pytest.importorskip("itae_export.engine")
    d = tmp_path / "build"
    src = save_tiny(d / "m.onnx")
    deploy_onnx = apply_graph_options(src, d / "m.deploy.onnx", GraphOptions("uint8-nhwc", True))
    eng = d / "m.engine"
    eng.write_bytes(b"plan bytes")
    result = engine.EngineBuildResult(
        engine_path=eng, precision="fp16", builder="tensorrt-python", tensorrt_version="10.9",
        input_name="pixel_values", profile={"min": [1, H, W, 3], "opt": [4, H, W, 3], "max": [16, H, W, 3]},
        strongly_typed=False, tf32=False,
    )  # fmt: skip
    gpu = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    meta = {"model": "dinov2_vits14", "img_size": H, "itae": {"norm_source": "v"}}
    engine.write_sidecar(
        eng, engine.sidecar_data(result, deploy_onnx, engine.EngineOptions(), meta, gpu, None)
    )
    res = write_triton_repo(
        eng, tmp_path / "repo", model_name="trt", graph_options=GraphOptions("uint8-nhwc", True)
    )
    cfg = parse(res.config_path)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 16
    assert dict(cfg.cc_model_filenames) == {"9.0": "model.plan"}
    assert [(model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in cfg.input] == [
        ("TYPE_UINT8", [H, W, 3])
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("embedding", [D])]
    text = res.config_path.read_text()
    assert "NVIDIA H100" in text and "L2-normalised" in text and "dinov2_vits14" in text
    # an engine built without the options is refused when they are asked for
    plain = d / "plain.engine"
    plain.write_bytes(b"plan bytes")
    engine.write_sidecar(plain, engine.sidecar_data(result, src, engine.EngineOptions(), meta, gpu, None))
    with pytest.raises(UsageError, match="l2-normalize"):
        write_triton_repo(plain, tmp_path / "repo2", model_name="p", graph_options=GraphOptions(None, True))
    # the ONNX changed after the build: its IO no longer describes the engine
    for f in (d / "m.onnx", d / "m.onnx.data"):
        f.unlink()
    save_tiny(d / "m.onnx", d=D + 1)
    with pytest.raises(DeployError, match="changed since the engine was built"):
        write_triton_repo(plain, tmp_path / "repo2", model_name="p")


# ------------------------------------------------------------------- a small random DINOv2, end to end


@pytest.fixture(scope="module")
def dinov2_onnx(tmp_path_factory: pytest.TempPathFactory):
    """Random 2-block ViT-S/14 at 28 px, exported (dynamo, weights in .data) and ITAE-patched."""
    torch = pytest.importorskip("torch")
    from graph_passes.config import ITAEConfig
    from graph_passes.itae import apply_itae
    from graph_passes.preprocess import save_model
    from itae_export.models import build_model
    from itae_export.onnx_export import export_onnx
    from itae_export.reference import ITAEReference

    torch.manual_seed(0)
    embedder = build_model("dinov2_vits14", random_weights=True, depth=2, img_size=28).eval()
    d = tmp_path_factory.mktemp("dino")
    plain = export_onnx(embedder, d / "dino.onnx", img_size=28, exporter="dynamo", external_data=True)
    cfg = ITAEConfig(relative_threshold=1.0)  # low gamma: random weights have no real artifacts
    patched, _ = apply_itae(onnx.load(str(plain), load_external_data=False), cfg, num_prefix_tokens=1)
    itae_path = save_model(patched, d / "dino.itae.onnx", source_path=plain)
    return {"torch": torch, "reference": ITAEReference(embedder, cfg).eval(), "onnx": itae_path, "dir": d}


def _torch_same_preprocessing(torch, reference, px: np.ndarray, l2: bool) -> np.ndarray:
    x = torch.from_numpy(px).permute(0, 3, 1, 2).to(torch.float32) / 255.0
    x = (x - torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float32
    ).view(1, 3, 1, 1)
    with torch.no_grad():
        y = reference(x)
        if l2:
            y = torch.nn.functional.normalize(y, dim=-1)
    return y.numpy()


@pytest.mark.parametrize(("fmt", "l2"), [("uint8-nhwc", False), (None, True), ("uint8-nhwc", True)])
def test_dinov2_graph_options_match_pytorch(dinov2_onnx, fmt: str | None, l2: bool) -> None:
    torch, reference, src = dinov2_onnx["torch"], dinov2_onnx["reference"], dinov2_onnx["onnx"]
    tag = f"{fmt}-{l2}"
    out = apply_graph_options(src, dinov2_onnx["dir"] / f"dino.{tag}.onnx", GraphOptions(fmt, l2))
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    if fmt:
        assert ops[:4] == ["Cast", "Transpose", "Mul", "Add"]
    if l2:
        assert ops[-3:] == ["ReduceL2", "Max", "Div"]
    assert any(p.key == "itae.settings" for p in model.metadata_props)  # the ITAE record is carried over
    px = np.random.default_rng(7).integers(0, 256, size=(3, 28, 28, 3), dtype=np.uint8)
    want = _torch_same_preprocessing(torch, reference, px, l2)
    if fmt:
        got = run(out, px)
    else:
        x = ((px.transpose(0, 3, 1, 2) / 255.0 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)).astype(
            np.float32
        )
        got = run(out, x)
    cos = np.sum(want * got, 1) / (np.linalg.norm(want, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() >= 0.99999
    assert np.max(np.abs(want - got)) < (2e-6 if l2 else 2e-5)  # measured 6e-8 / 1.2e-6
    if l2:
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # the ONNX-level check the CLI can run agrees
    assert verify_graph_options(src, out)["cos_min"] >= 0.99999


def test_dinov2_triton_repo(dinov2_onnx, tmp_path: Path) -> None:
    src = dinov2_onnx["onnx"]
    repo = tmp_path / "repo"
    meta = {"model": "dinov2_vits14", "img_size": 28, "itae": {"relative_threshold": 1.0}}
    r1 = write_triton_repo(src, repo, model_name="dino", max_batch=8, meta=meta)
    cfg = parse(r1.config_path)
    assert_config_matches_session(cfg, r1.version_dir / "model.onnx")
    assert list(cfg.input[0].dims) == [3, 28, 28] and list(cfg.output[0].dims) == [384]
    v1 = tree_digest(r1.version_dir)
    r2 = write_triton_repo(src, repo, model_name="dino", max_batch=8, meta=meta)
    assert r2.version == 2 and tree_digest(r1.version_dir) == v1
    with pytest.raises(DeployError, match="another model"):
        write_triton_repo(src, repo, model_name="dino", max_batch=8, graph_options=GraphOptions("uint8-nhwc"))
    r3 = write_triton_repo(
        src, repo, model_name="dino_raw", max_batch=8, graph_options=GraphOptions("uint8-nhwc", True)
    )
    cfg3 = parse(r3.config_path)
    assert_config_matches_session(cfg3, r3.version_dir / "model.onnx")
    assert list(cfg3.input[0].dims) == [28, 28, 3]
    px = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28, 3), dtype=np.uint8)
    want = _torch_same_preprocessing(dinov2_onnx["torch"], dinov2_onnx["reference"], px, True)
    np.testing.assert_allclose(run(r3.version_dir / "model.onnx", px), want, atol=1e-5)


# ------------------------------------------------------------------------------- tools/triton_client.py


def _load_client_tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "triton_client", Path(__file__).resolve().parents[1] / "tools" / "triton_client.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("triton_client", mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class FakeTriton:
    """Stands in for a Triton server: serves config.pbtxt (as Triton's JSON) and runs the model in ORT."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.batches: list[tuple[int, ...]] = []

    def get_model_config(self, name: str, version: str = "") -> dict:
        from google.protobuf.json_format import MessageToDict

        return MessageToDict(parse(self.repo / name / "config.pbtxt"), preserving_proto_field_name=True)

    def infer(self, name: str, inputs, outputs, model_version: str = ""):
        latest = max(int(p.name) for p in (self.repo / name).iterdir() if p.name.isdigit())
        sess = ort.InferenceSession(str(self.repo / name / str(latest) / "model.onnx"))
        (inp,) = inputs
        dtype = {"UINT8": np.uint8, "FP32": np.float32}[inp.datatype()]
        x = np.frombuffer(inp._get_binary_data(), dtype=dtype).reshape(inp.shape())
        assert sess.get_inputs()[0].name == inp.name()
        self.batches.append(tuple(x.shape))
        y = sess.run([o.name() for o in outputs], {inp.name(): x})[0]
        return type("Result", (), {"as_numpy": lambda self, _n: y})()


def test_client_tool_both_input_formats_agree(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tritonclient.http")
    from PIL import Image

    tool = _load_client_tool()
    src = save_tiny(tmp_path / "m.onnx")
    repo = tmp_path / "repo"
    write_triton_repo(
        src, repo, model_name="raw", max_batch=4, graph_options=GraphOptions("uint8-nhwc", True)
    )
    write_triton_repo(src, repo, model_name="flt", max_batch=4, graph_options=GraphOptions(None, True))
    rng = np.random.default_rng(0)
    files = []
    for i, size in enumerate([(40, 30), (14, 14), (20, 33)]):
        f = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(f)
        files.append(str(f))
    fake = FakeTriton(repo)
    outs = {}
    for name in ("raw", "flt"):
        out = tmp_path / f"{name}.npy"
        args = ["--model-name", name, "--out", str(out), "--batch-size", "2", *files]
        assert tool.main(args, client=fake) == 0
        outs[name] = np.load(out)
        assert out.with_suffix(".files.txt").read_text().split() == files
    assert fake.batches == [(2, H, W, 3), (1, H, W, 3), (2, 3, H, W), (1, 3, H, W)]
    assert outs["raw"].shape == (3, D)
    np.testing.assert_allclose(outs["raw"], outs["flt"], atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(outs["raw"], axis=1), 1.0, rtol=1e-5)
    # the client's own preprocessing equals the graph's
    io = tool.model_io(fake.get_model_config("flt"))
    assert (io.layout, io.height, io.width, io.max_batch) == ("NCHW", H, W, 4)
    px = np.stack([tool.load_image(f, H, W) for f in files])
    want = (px.transpose(0, 3, 1, 2) / 255.0 - MEAN.reshape(1, 3, 1, 1)) / STD.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(tool.to_model_input(px, io), want, atol=1e-6)
    assert tool.main(["--model-name", "raw", "--batch-size", "9", *files], client=fake) == 2
    assert "max_batch_size 4" in capsys.readouterr().err


def test_reference_batch_for_engine_parity(tmp_path: Path) -> None:
    from itae_export.graph_options import reference_batch

    src = save_tiny(tmp_path / "m.onnx")
    for opts in (GraphOptions("uint8-nhwc", True), GraphOptions("uint8-nhwc"), GraphOptions(None, True)):
        out = apply_graph_options(src, tmp_path / f"o{opts.input_format}{opts.l2_normalize}.onnx", opts)
        x, want = reference_batch(opts, lambda x: run(src, x), batch=3, height=H, width=W, seed=1)
        assert x.dtype == (np.uint8 if opts.input_format else np.float32)
        np.testing.assert_allclose(run(out, x), want, atol=1e-5)


def test_provenance_leaves_out_arrays(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "m.onnx")
    meta = {"model": "m", "reference_inputs": np.zeros((4, 3, H, W)), "parity": {"max_abs": np.float32(1e-6)}}
    res = write_triton_repo(src, tmp_path / "repo", model_name="m", max_batch=2, meta=meta)
    prov = json.loads((res.version_dir / "itae_export.json").read_text())
    assert "reference_inputs" not in prov["meta"] and prov["meta"]["parity"]["max_abs"] == pytest.approx(1e-6)


def test_graph_option_refusals_name_the_flag(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "m.onnx", batch="batch")
    m = onnx.load(str(src), load_external_data=False)
    m.graph.input[0].type.tensor_type.shape.dim[2].ClearField("dim_value")  # unknown H: no uint8 input possible
    bad = tmp_path / "dyn.onnx"
    onnx.save(m, bad)
    with pytest.raises(UsageError, match=r"^--input-format uint8-nhwc: .*named dims"):
        apply_graph_options(bad, tmp_path / "o.onnx", GraphOptions("uint8-nhwc"))
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.save(m, bad)
    with pytest.raises(UsageError, match=r"^--l2-normalize: .*INT64"):
        apply_graph_options(bad, tmp_path / "o.onnx", GraphOptions(None, True))
    assert not (tmp_path / "o.onnx").exists()


def test_standalone_cli_names_model_from_export_metadata(tmp_path: Path, capsys) -> None:
    src = save_tiny(tmp_path / "m.onnx")
    m = onnx.load(str(src), load_external_data=False)
    m.metadata_props.add(key="itae_export.model", value="dinov2_vitb14")
    m.metadata_props.add(key="itae_export.img_size", value=str(H))
    m.metadata_props.add(key="itae.settings", value='{"norm_source": "v"}')
    onnx.save(m, tmp_path / "exported.onnx")
    assert (
        main([str(tmp_path / "exported.onnx"), "--triton-repo", str(tmp_path / "repo"), "--max-batch", "2"])
        == 0
    )
    assert "dinov2_vitb14_itae version 1" in capsys.readouterr().out
    text = (tmp_path / "repo" / "dinov2_vitb14_itae" / "config.pbtxt").read_text()
    assert 'ITAE: {"norm_source": "v"}' in text and "model: dinov2_vitb14" in text


def test_fast_path_model_defaults_to_cpu_instances(tmp_path):
    """A --fast-path model (int8 / fused) is an ONNX Runtime CPU model: KIND_CPU unless asked otherwise."""
    src = save_tiny(tmp_path / "m.onnx")
    fast = tmp_path / "fast.onnx"
    g = onnx.load(str(src))
    g.metadata_props.append(onnx.StringStringEntryProto(key="itae_export.fast_path", value="int8-dynamic"))
    onnx.save_model(g, str(fast))
    kinds = {}
    for name, path, extra in [("plain", src, []), ("fast", fast, []), ("forced", fast, ["--instance-kind", "KIND_GPU"])]:
        assert main([str(path), "--triton-repo", str(tmp_path / "repo"), "--model-name", name, *extra]) == 0
        kinds[name] = parse(tmp_path / "repo" / name / "config.pbtxt").instance_group[0].kind
    groups = model_config_pb2.ModelInstanceGroup
    assert kinds == {"plain": groups.KIND_GPU, "fast": groups.KIND_CPU, "forced": groups.KIND_GPU}


# ---------------------------------------------------------------------------- writing: one output transaction
def test_version_held_by_another_writer_gets_the_next_number(tmp_path: Path) -> None:
    """The transaction's claim on REPO/NAME/<N> makes a second writer take N+1; nothing of the
    holder is touched, and the holder can still commit its own N afterwards."""
    from itae_export.outputs import OutputTransaction

    repo = tmp_path / "repo"
    src = save_tiny(tmp_path / "a" / "m.onnx")
    write_triton_repo(src, repo, model_name="emb", max_batch=4)
    with OutputTransaction(repo / "emb" / "2") as holder:  # another deployment staging version 2
        res = write_triton_repo(src, repo, model_name="emb", max_batch=4)
        assert res.version == 3 and not res.config_written
        stage = holder.stage_path()
        stage.mkdir()
        (stage / "model.onnx").write_bytes(src.read_bytes())
        holder.add(stage)
        holder.commit()
    assert sorted(p.name for p in (repo / "emb").iterdir()) == ["1", "2", "3", "config.pbtxt"]


def test_writer_waits_for_a_concurrent_config_writer(tmp_path: Path) -> None:
    """Another deployment holding config.pbtxt (about to commit it): the second writer waits, then
    keeps the committed config and takes the next version."""
    import threading

    from itae_export.outputs import OutputTransaction

    repo = tmp_path / "repo"
    src = save_tiny(tmp_path / "a" / "m.onnx")
    first = write_triton_repo(src, tmp_path / "other", model_name="emb", max_batch=4)  # a config to copy
    with OutputTransaction(repo / "emb" / "1", extra=[repo / "emb" / "config.pbtxt"]) as holder:
        stage = holder.stage_path()
        stage.mkdir()
        (stage / "model.onnx").write_bytes(src.read_bytes())
        cfg = holder.stage_path(repo / "emb" / "config.pbtxt")
        cfg.write_text(first.config_path.read_text())
        holder.add(cfg, repo / "emb" / "config.pbtxt")
        holder.add(stage)
        box: list = []
        t = threading.Thread(target=lambda: box.append(write_triton_repo(src, repo, model_name="emb", max_batch=4)))
        t.start()
        t.join(0.5)
        assert t.is_alive()  # waiting: version 1 is taken, config.pbtxt is being written
        holder.commit()
    t.join(30)
    assert box and box[0].version == 2 and not box[0].config_written
    assert sorted(p.name for p in (repo / "emb").iterdir()) == ["1", "2", "config.pbtxt"]


def test_copied_files_are_never_wider_than_their_sources(tmp_path: Path) -> None:
    import stat

    src = save_tiny(tmp_path / "a" / "m.onnx")
    (src.parent / "m.onnx.data").chmod(0o600)
    res = write_triton_repo(src, tmp_path / "repo", model_name="emb", max_batch=4)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in res.version_dir.iterdir()}
    assert modes == {"model.onnx": 0o600, "m.onnx.data": 0o600, "itae_export.json": 0o600}
    assert stat.S_IMODE(res.config_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(res.version_dir.stat().st_mode) == 0o755
    open_src = save_tiny(tmp_path / "b" / "m.onnx")
    (open_src.parent / "m.onnx.data").chmod(0o644)  # onnx.save writes .data 0600; itae-export ships 0644
    res = write_triton_repo(open_src, tmp_path / "repo", model_name="emb", max_batch=4)
    assert {stat.S_IMODE(p.stat().st_mode) for p in res.version_dir.iterdir()} == {0o644}


def test_failed_deployment_leaves_the_repo_as_it_was(tmp_path: Path) -> None:
    src = save_tiny(tmp_path / "a" / "m.onnx")
    (src.parent / "m.onnx.data").unlink()
    with pytest.raises(DeployError, match="missing"):
        write_triton_repo(src, tmp_path / "repo", model_name="emb", max_batch=4)
    assert not (tmp_path / "repo").exists()  # the folders the transaction made are gone too
