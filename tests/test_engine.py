"""CPU tests of the TensorRT engine orchestration (itae_export.engine / trt_runner).

No GPU and no TensorRT exist where these run. Several tests therefore insert a FAKE `tensorrt`
module into sys.modules (monkeypatch) and a FAKE `trtexec` executable (a small Python script) on
disk. The fakes only record what our code asks of TensorRT (flags, per-layer precisions, profile
shapes, timing cache bytes, trtexec argv) so that our orchestration can be checked; they say nothing
about whether TensorRT builds a correct engine. That is covered by tests/test_engine_gpu.py
(marked gpu), which has not been run yet.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from itae_export import engine as eng
from itae_export.cli.engine_args import add_engine_args, engine_options_from_args
from itae_export.errors import EngineError, ParityError, UsageError
from itae_export.outputs import OutputTransaction
from itae_export.results import RunInfo

GPU = {"name": "Fake GPU 9000", "compute_capability": "9.0"}
H, W = 28, 42  # non-square so a swapped H/W would show


# ----------------------------------------------------------------------------------------------
# a tiny ONNX with the node kinds the engine code cares about
# ----------------------------------------------------------------------------------------------
def make_onnx(path: Path, *, batch: int | str = "batch", h: int | str = H, w: int = W, external: bool = False) -> Path:
    """pixel_values [B,3,h,w] -> embedding [B,3]: ReduceMean, LayerNorm, Softmax and itae/* nodes
    with float, int64 (Shape) and bool (Greater) outputs."""
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [batch, 3, h, w])
    y = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [batch, 3])
    inits = [  # raw_data tensors, so that external=True really moves them to a .data file
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array([1.0, 1.5, 2.0], dtype=np.float32), "ln_scale"),
        numpy_helper.from_array(np.array([0.1, 0.2, 0.3], dtype=np.float32), "ln_bias"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "thr"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values", "axes"], ["pooled"], name="/pool/ReduceMean", keepdims=0),
        helper.make_node("LayerNormalization", ["pooled", "ln_scale", "ln_bias"], ["normed"], name="/norm/LayerNormalization", axis=-1),
        helper.make_node("Softmax", ["normed"], ["soft"], name="node_Softmax_7", axis=-1),
        helper.make_node("Mul", ["normed", "normed"], ["sq"], name="itae/norm/Mul"),
        helper.make_node("Shape", ["normed"], ["shp"], name="itae/shape/Shape"),
        helper.make_node("Greater", ["sq", "thr"], ["flag"], name="itae/flag/Greater"),
        helper.make_node("Cast", ["flag"], ["flag_f"], name="itae/flag/Cast", to=TensorProto.FLOAT),
        helper.make_node("Add", ["soft", "flag_f"], ["embedding"], name="/head/Add"),
    ]
    graph = helper.make_graph(nodes, "tiny", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def reference_fn(x: np.ndarray) -> np.ndarray:
    """What the tiny graph computes (numpy), used as 'PyTorch' reference and by the fake trtexec."""
    pooled = x.mean(axis=(2, 3))
    mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
    normed = (pooled - mu) / np.sqrt(var + 1e-5) * np.array([1.0, 1.5, 2.0]) + np.array([0.1, 0.2, 0.3])
    e = np.exp(normed - normed.max(-1, keepdims=True))
    soft = e / e.sum(-1, keepdims=True)
    return (soft + (normed * normed > 0.5)).astype(np.float32)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "model.onnx")


def cli_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return p.parse_args(argv)


def write_script(onnx_path, engine_path, spec, opts, precision, nodes, model=None) -> Path:
    script = Path(onnx_path).parent / eng.SCRIPT_NAME
    script.write_text(eng.build_script_text(Path(onnx_path), Path(engine_path), spec, opts, precision, nodes, model))
    script.chmod(0o755)
    return script


def build_from_args(argv: list[str], onnx_path: Path, engine_path: Path, meta: dict) -> dict:
    """What itae-export does for --out *.engine: the build script beside the ONNX, then the engine and
    its sidecar in one output transaction."""
    opts = engine_options_from_args(cli_args(argv))
    eng.stage_build_script(onnx_path, onnx_path, engine_path, opts, onnx_path.parent / eng.SCRIPT_NAME)
    run = RunInfo(model=meta.get("model", ""), img_size=meta.get("img_size", 0),
                  num_prefix_tokens=meta.get("num_prefix_tokens", 1), itae=meta.get("itae"), exporter="dynamo",
                  parity=meta.get("parity", {}), reference_inputs=meta.get("reference_inputs"),
                  reference_outputs=meta.get("reference_outputs"))
    with OutputTransaction(engine_path, extra=[Path(str(engine_path) + ".json")]) as txn:
        return eng.build_engine_artifact(onnx_path, engine_path, opts, run, txn)


# ----------------------------------------------------------------------------------------------
# FAKE tensorrt module (records calls; see the module docstring)
# ----------------------------------------------------------------------------------------------
def make_fake_tensorrt(*, weak_typing: bool = True, parse_errors: list[tuple] | None = None) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.99.0-fake" if weak_typing else "11.99.0-fake"
    rec: dict = {"builders": [], "parsed": [], "timing_cache_inputs": []}
    trt.rec = rec
    for dt in ("float32", "float16", "bfloat16", "int64", "bool"):
        setattr(trt, dt, f"DT.{dt}")
    trt.LayerType = types.SimpleNamespace(**{k: f"LT.{k}" for k in (
        "NORMALIZATION", "SOFTMAX", "REDUCE", "ELEMENTWISE", "SHAPE", "CONSTANT", "CAST")})
    flags = ["TF32"] + (["FP16", "BF16", "OBEY_PRECISION_CONSTRAINTS"] if weak_typing else [])
    trt.BuilderFlag = types.SimpleNamespace(**{k: f"BF.{k}" for k in flags})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="POOL.WORKSPACE")

    class Logger:
        WARNING, ERROR = "W", "E"

        def __init__(self, level=None):
            self.level = level

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR="IE", ERROR="E", WARNING="W", INFO="I", VERBOSE="V")

        def __init__(self):
            pass

    trt.Logger, trt.ILogger = Logger, ILogger

    class Tensor:
        def __init__(self, name, dtype):
            self.name, self.dtype = name, dtype

    class Layer:
        def __init__(self, name, type_, onnx_name, out_dtypes):
            self.name, self.type, self.metadata = name, type_, f"[ONNX Layer: {onnx_name}]"
            self._outs = [Tensor(f"{name}_out{i}", d) for i, d in enumerate(out_dtypes)]
            self.precision_set, self.output_types = None, {}

        @property
        def num_outputs(self):
            return len(self._outs)

        def get_output(self, j):
            return self._outs[j]

        @property
        def precision(self):
            return self.precision_set

        @precision.setter
        def precision(self, value):
            self.precision_set = value

        def set_output_type(self, j, dtype):
            self.output_types[j] = dtype

    class Network:
        def __init__(self, flags):
            self.flags, self.layers = flags, []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    op_types = {"LayerNormalization": trt.LayerType.NORMALIZATION, "Softmax": trt.LayerType.SOFTMAX,
                "ReduceMean": trt.LayerType.REDUCE, "Shape": trt.LayerType.SHAPE, "Cast": trt.LayerType.CAST}
    out_types = {"Shape": trt.int64, "Greater": trt.bool}

    class ParserError:
        def __init__(self, node, name, op, desc):
            self._v = (node, name, op, desc)

        def node(self):
            return self._v[0]

        def node_name(self):
            return self._v[1]

        def node_operator(self):
            return self._v[2]

        def desc(self):
            return self._v[3]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            rec["parsed"].append(path)
            if parse_errors:
                self.errors = [ParserError(*e) for e in parse_errors]
                return False
            model = onnx.load(path, load_external_data=False)
            for n in model.graph.node:
                t = op_types.get(n.op_type, trt.LayerType.ELEMENTWISE)
                self.network.layers.append(Layer(n.name, t, n.name, [out_types.get(n.op_type, trt.float32)]))
                if n.name == "itae/norm/Mul":  # a helper layer the parser adds for this node
                    self.network.layers.append(Layer("ONNXTRT_aux_1", trt.LayerType.ELEMENTWISE, n.name, [trt.float32]))
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+timed"

    class Config:
        def __init__(self):
            self.flags, self.cleared, self.pools, self.profiles, self.cache = set(), set(), {}, [], None

        def set_flag(self, f):
            self.flags.add(f)

        def clear_flag(self, f):
            self.cleared.add(f)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def add_optimization_profile(self, p):
            self.profiles.append(p)

        def create_timing_cache(self, data):
            rec["timing_cache_inputs"].append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            self.shapes[name] = (tuple(mn), tuple(opt), tuple(mx))

    class Builder:
        platform_has_fast_fp16 = True

        def __init__(self, logger):
            rec["builders"].append(self)
            self.network = self.config = None

        def create_network(self, flags=0):
            self.network = Network(flags)
            return self.network

        def create_builder_config(self):
            self.config = Config()
            return self.config

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"FAKE-ENGINE-" + trt.__version__.encode()

    if not weak_typing:
        del Builder.platform_has_fast_fp16
    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture()
def fake_trt(monkeypatch):
    trt = make_fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


FAKE_TRTEXEC = r'''#!{python}
"""FAKE trtexec for tests: records argv, 'builds' by writing --saveEngine, 'runs' an engine by
computing the tiny test graph in numpy (the real trtexec is never involved)."""
import json, sys
from pathlib import Path
import numpy as np
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\n")
if "--help" in args:
    print("  --fp16                             Enable fp16 precision\n  --bf16                             Enable bf16")
    sys.exit(0)
print("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec")
opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
if "saveEngine" in opts:
    Path(opts["saveEngine"]).write_bytes(b"FAKE-TRTEXEC-ENGINE")
    sys.exit(0)
if "loadEngine" in opts:
    name, shape = opts["shapes"].rsplit(":", 1)
    x = np.fromfile(opts["loadInputs"].split(":", 1)[1], dtype=np.float32).reshape([int(s) for s in shape.split("x")])
    sys.path.insert(0, {testdir!r})
    from test_engine import reference_fn
    y = reference_fn(x)
    Path(opts["exportOutput"]).write_text(json.dumps([{{"name": "embedding", "dimensions": "x".join(map(str, y.shape)),
                                                        "values": y.ravel().tolist()}}]))
    sys.exit(0)
sys.exit(1)
'''


@pytest.fixture()
def fake_trtexec(tmp_path: Path) -> tuple[Path, Path]:
    exe, log = tmp_path / "bin" / "trtexec", tmp_path / "trtexec_calls.jsonl"
    exe.parent.mkdir()
    exe.write_text(FAKE_TRTEXEC.format(python=sys.executable, log=str(log), testdir=str(Path(__file__).parent)))
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return exe, log


def no_tensorrt(monkeypatch) -> None:
    monkeypatch.setattr(eng, "import_tensorrt", lambda: (None, "No module named 'tensorrt'"))


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(min_batch=4, opt_batch=2, max_batch=8), "--min-batch <= --opt-batch"),
        (dict(min_batch=1, opt_batch=16, max_batch=8), "--min-batch <= --opt-batch"),
        (dict(min_batch=0), "--min-batch"),
        (dict(max_batch=True), "--max-batch"),
        (dict(workspace_mib=0), "--workspace"),
        (dict(workspace_mib=-5), "--workspace"),
        (dict(precision="int8"), "--precision"),
        (dict(builder="magic"), "--engine-builder"),
        (dict(strongly_typed=True, precision="fp16"), "--strongly-typed"),
    ],
)
def test_bad_options_are_usage_errors(kwargs, flag):
    with pytest.raises(UsageError, match=re.escape(flag)):
        eng.EngineOptions(**kwargs)


def test_options_from_cli(tmp_path):
    args = cli_args(["--precision", "bf16", "--min-batch", "2", "--opt-batch", "4", "--max-batch", "16",
                     "--workspace", "1024", "--timing-cache", str(tmp_path / "tc.bin"), "--allow-tf32"])
    o = engine_options_from_args(args)
    assert (o.precision, o.min_batch, o.opt_batch, o.max_batch, o.workspace_mib) == ("bf16", 2, 4, 16, 1024)
    assert o.timing_cache == tmp_path / "tc.bin" and o.allow_tf32 and o.precision_constraints
    d = engine_options_from_args(cli_args([]))
    assert d.precision is None and (d.min_batch, d.opt_batch, d.max_batch) == (1, 8, 32)
    with pytest.raises(UsageError):
        engine_options_from_args(cli_args(["--opt-batch", "64"]))  # > default max 32


# ----------------------------------------------------------------------------------------------
# profile shapes and fp32 nodes read from the ONNX
# ----------------------------------------------------------------------------------------------
def test_input_spec_and_profile_from_onnx(tiny):
    spec = eng.read_input_spec(tiny)
    assert (spec.name, spec.channels, spec.height, spec.width, spec.batch) == ("pixel_values", 3, H, W, "batch")
    shapes = eng.profile_shapes(spec, eng.EngineOptions(min_batch=2, opt_batch=5, max_batch=9))
    assert shapes == {"min": (2, 3, H, W), "opt": (5, 3, H, W), "max": (9, 3, H, W)}


def test_static_batch_and_dynamic_size(tmp_path):
    static = eng.read_input_spec(make_onnx(tmp_path / "s.onnx", batch=4))
    assert eng.profile_shapes(static, eng.EngineOptions(min_batch=4, opt_batch=4, max_batch=4))["opt"][0] == 4
    with pytest.raises(UsageError, match="fixed batch of 4"):
        eng.profile_shapes(static, eng.EngineOptions())
    with pytest.raises(EngineError, match="dynamic H"):
        eng.read_input_spec(make_onnx(tmp_path / "d.onnx", h="height"))
    with pytest.raises(EngineError, match="does not exist"):
        eng.read_input_spec(tmp_path / "missing.onnx")


def test_fp32_nodes_follow_types(tiny):
    nodes = {n["name"]: n for n in eng.fp32_onnx_nodes(tiny)}
    assert set(nodes) == {"/pool/ReduceMean", "/norm/LayerNormalization", "node_Softmax_7", "itae/norm/Mul",
                          "itae/shape/Shape", "itae/flag/Greater", "itae/flag/Cast"}
    assert nodes["itae/norm/Mul"]["float_outputs"] is True
    assert nodes["itae/shape/Shape"]["float_outputs"] is False
    assert nodes["itae/flag/Greater"]["float_outputs"] is False
    assert "/head/Add" not in nodes


# ----------------------------------------------------------------------------------------------
# trtexec command and script
# ----------------------------------------------------------------------------------------------
def test_trtexec_flags_fp16(tiny, tmp_path):
    spec = eng.read_input_spec(tiny)
    opts = eng.EngineOptions(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=1536, timing_cache=tmp_path / "tc")
    cmd = eng.trtexec_command(tiny, tmp_path / "m.engine", spec, opts, "fp16", eng.fp32_onnx_nodes(tiny))
    assert cmd[0] == "trtexec"
    assert f"--onnx={tiny}" in cmd and f"--saveEngine={tmp_path / 'm.engine'}" in cmd
    assert f"--minShapes=pixel_values:1x3x{H}x{W}" in cmd
    assert f"--optShapes=pixel_values:4x3x{H}x{W}" in cmd
    assert f"--maxShapes=pixel_values:8x3x{H}x{W}" in cmd
    assert "--memPoolSize=workspace:1536M" in cmd and "--fp16" in cmd and "--noTF32" not in cmd
    assert f"--timingCacheFile={tmp_path / 'tc'}" in cmd and "--skipInference" in cmd
    assert "--precisionConstraints=obey" in cmd
    lp = next(c for c in cmd if c.startswith("--layerPrecisions="))[len("--layerPrecisions="):].split(",")
    for name in ("node_Softmax_7", "/norm/LayerNormalization", "/pool/ReduceMean", "itae/norm/Mul", "itae/flag/Cast"):
        assert f"{name}:fp32" in lp
    assert "itae/*:fp32" in lp
    assert not any(s.startswith(("itae/shape/Shape", "itae/flag/Greater")) for s in lp)  # int/bool outputs
    lo = next(c for c in cmd if c.startswith("--layerOutputTypes="))
    assert "node_Softmax_7:fp32" in lo and "*" not in lo


def test_trtexec_flags_other_precisions(tiny, tmp_path):
    spec, nodes = eng.read_input_spec(tiny), eng.fp32_onnx_nodes(tiny)
    fp32 = eng.trtexec_command(tiny, "e", spec, eng.EngineOptions(), "fp32", nodes)
    assert "--noTF32" in fp32 and not any(c.startswith(("--fp16", "--bf16", "--precisionConstraints")) for c in fp32)
    assert not any(c.startswith("--timingCacheFile") for c in fp32)
    bf16 = eng.trtexec_command(tiny, "e", spec, eng.EngineOptions(), "bf16", nodes)
    assert "--bf16" in bf16 and "--fp16" not in bf16 and "--precisionConstraints=obey" in bf16
    loose = eng.trtexec_command(tiny, "e", spec, eng.EngineOptions(precision_constraints=False), "fp16", nodes)
    assert "--fp16" in loose and not any(c.startswith("--layerPrecisions") for c in loose)
    typed = eng.trtexec_command(tiny, "e", spec, eng.EngineOptions(strongly_typed=True), "fp32", nodes)
    assert "--stronglyTyped" in typed and "--fp16" not in typed


def test_unsafe_layer_names_are_skipped():
    precs, outs, skipped = eng.trtexec_layer_specs(
        [{"name": "a,b", "op": "Softmax", "float_outputs": True, "n_outputs": 1},
         {"name": "ok", "op": "Softmax", "float_outputs": True, "n_outputs": 1}])
    assert precs == ["ok:fp32"] and outs == ["ok:fp32"] and skipped == ["a,b"]


def test_build_script_runs_with_fake_trtexec(tiny, tmp_path, fake_trtexec):
    exe, log = fake_trtexec
    out = tmp_path / "engines" / "model.engine"
    spec = eng.read_input_spec(tiny)
    opts = eng.EngineOptions(opt_batch=2, max_batch=4, timing_cache=tmp_path / "caches" / "t.cache")
    script = write_script(tiny, out, spec, opts, "fp16", eng.fp32_onnx_nodes(tiny), "tiny")
    assert script == tiny.parent / "build_engine.sh" and os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text and "# " in text
    assert str(tmp_path) not in text  # relative paths: the folder can be copied to a GPU machine
    subprocess.run(["bash", "-n", str(script)], check=True)
    r = subprocess.run([str(script)], env={**os.environ, "TRTEXEC": str(exe)}, cwd="/", capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    argv = [json.loads(line) for line in log.read_text().splitlines()]
    build = next(a for a in argv if "--help" not in a)
    assert "--onnx=model.onnx" in build and "--saveEngine=engines/model.engine" in build
    assert "--timingCacheFile=caches/t.cache" in build and "--fp16" in build
    assert f"--maxShapes=pixel_values:4x3x{H}x{W}" in build
    assert (tmp_path / "engines" / "model.engine").read_bytes() == b"FAKE-TRTEXEC-ENGINE"


def test_build_script_without_trtexec_fails_clearly(tiny, tmp_path):
    spec = eng.read_input_spec(tiny)
    script = write_script(tiny, tmp_path / "m.engine", spec, eng.EngineOptions(), "fp32", [])
    r = subprocess.run([str(script)], env={"PATH": "/usr/bin:/bin", "TRTEXEC": "no-such-trtexec"},
                       capture_output=True, text=True)
    assert r.returncode == 4 and "trtexec not found" in r.stderr


# ----------------------------------------------------------------------------------------------
# build_from_args error paths (no TensorRT / no GPU)
# ----------------------------------------------------------------------------------------------
def test_no_tensorrt_no_trtexec_is_one_sentence_engine_error(tiny, tmp_path, monkeypatch):
    no_tensorrt(monkeypatch)
    monkeypatch.setattr(eng, "find_trtexec", lambda: None)
    monkeypatch.setattr(eng, "gpu_info", lambda: GPU)
    out = tmp_path / "model.engine"
    with pytest.raises(EngineError) as ei:
        build_from_args([], tiny, out, {"model": "tiny"})
    msg, script = str(ei.value), tmp_path / "build_engine.sh"
    assert ei.value.exit_code == 4
    assert script.is_file() and str(script) in msg
    assert 'pip install -e ".[trt]"' in msg and "NGC TensorRT container" in msg and "TensorRT" in msg
    assert "GPU (" not in msg  # the GPU is there; only TensorRT is missing
    assert "\n" not in msg and "Traceback" not in msg
    assert not out.exists() and not Path(str(out) + ".json").exists()


def test_no_gpu_is_engine_error_even_with_trtexec(tiny, tmp_path, monkeypatch, fake_trtexec):
    no_tensorrt(monkeypatch)
    monkeypatch.setattr(eng, "find_trtexec", lambda: str(fake_trtexec[0]))
    monkeypatch.setattr(eng, "gpu_info", lambda: None)
    with pytest.raises(EngineError, match="no NVIDIA GPU") as ei:
        build_from_args(["--precision", "fp32"], tiny, tmp_path / "m.engine", {})
    assert "build_engine.sh" in str(ei.value) and not fake_trtexec[1].exists()  # trtexec never called


def test_bad_profile_is_usage_error_before_anything(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(eng, "gpu_info", lambda: pytest.fail("must not probe the GPU for bad flags"))
    with pytest.raises(UsageError):
        build_from_args(["--min-batch", "9", "--max-batch", "4"], tiny, tmp_path / "m.engine", {})
    assert not (tmp_path / "build_engine.sh").exists()


def test_gpu_info_without_nvidia_smi_or_cuda(monkeypatch):
    monkeypatch.setattr(eng.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: False)))
    assert eng.gpu_info() is None


# ----------------------------------------------------------------------------------------------
# build_engine with the FAKE tensorrt module
# ----------------------------------------------------------------------------------------------
def test_fp16_build_sets_flags_constraints_profile(tiny, tmp_path, fake_trt):
    opts = eng.EngineOptions(min_batch=1, opt_batch=4, max_batch=8, workspace_mib=512)
    res = eng.build_engine(tiny, tmp_path / "m.engine", opts, gpu=GPU)
    b = fake_trt.rec["builders"][-1]
    cfg, net = b.config, b.network
    assert fake_trt.rec["parsed"] == [str(tiny)]  # parse_from_file with the path
    assert res.precision == "fp16" and "BF.FP16" in cfg.flags and "BF.OBEY_PRECISION_CONSTRAINTS" in cfg.flags
    assert cfg.pools == {"POOL.WORKSPACE": 512 << 20} and net.flags == 0
    assert cfg.profiles[0].shapes == {"pixel_values": ((1, 3, H, W), (4, 3, H, W), (8, 3, H, W))}
    pinned = {lay.name for lay in net.layers if lay.precision_set == "DT.float32"}
    assert pinned == {"/pool/ReduceMean", "/norm/LayerNormalization", "node_Softmax_7", "itae/norm/Mul",
                      "ONNXTRT_aux_1", "itae/flag/Cast"}  # aux layer matched through its ONNX metadata
    assert set(res.fp32_layers) == pinned
    for lay in net.layers:
        assert (lay.output_types == {0: "DT.float32"}) == (lay.name in pinned)
    assert (tmp_path / "m.engine").read_bytes() == b"FAKE-ENGINE-10.99.0-fake"


def test_fp32_bf16_and_strongly_typed_builds(tiny, tmp_path, fake_trt):
    res = eng.build_engine(tiny, tmp_path / "a.engine", eng.EngineOptions(precision="fp32"), gpu=GPU)
    cfg = fake_trt.rec["builders"][-1].config
    assert res.precision == "fp32" and not res.tf32 and "BF.TF32" in cfg.cleared
    assert not cfg.flags and not res.fp32_layers
    res = eng.build_engine(tiny, tmp_path / "b.engine", eng.EngineOptions(precision="bf16"), gpu=GPU)
    assert "BF.BF16" in fake_trt.rec["builders"][-1].config.flags and res.fp32_layers
    with pytest.raises(EngineError, match="compute capability >= 8.0"):
        eng.build_engine(tiny, tmp_path / "c.engine", eng.EngineOptions(precision="bf16"),
                         gpu={"name": "Old", "compute_capability": "7.5"})
    res = eng.build_engine(tiny, tmp_path / "d.engine", eng.EngineOptions(strongly_typed=True), gpu=GPU)
    b = fake_trt.rec["builders"][-1]
    assert b.network.flags == 1 << 3 and not b.config.flags and res.strongly_typed and res.precision == "fp32"
    res = eng.build_engine(tiny, tmp_path / "e.engine", eng.EngineOptions(), gpu={"name": "K80", "compute_capability": "3.7"})
    assert res.precision == "fp32"  # default falls back where fp16 is not fast


def test_timing_cache_is_reused(tiny, tmp_path, fake_trt):
    cache = tmp_path / "cache" / "timing.cache"
    opts = eng.EngineOptions(timing_cache=cache)
    first = eng.build_engine(tiny, tmp_path / "a.engine", opts, gpu=GPU)
    assert not first.timing_cache_reused and cache.read_bytes() == b"+timed"
    second = eng.build_engine(tiny, tmp_path / "b.engine", opts, gpu=GPU)
    assert second.timing_cache_reused
    assert fake_trt.rec["timing_cache_inputs"] == [b"", b"+timed"]
    assert cache.read_bytes() == b"+timed+timed"


def test_parser_errors_are_listed(tiny, tmp_path, monkeypatch):
    trt = make_fake_tensorrt(parse_errors=[(3, "itae/flag/Greater", "Greater", "unsupported type"),
                                           (5, "node_Softmax_7", "Softmax", "bad axis")])
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(EngineError) as ei:
        eng.build_engine(tiny, tmp_path / "m.engine", eng.EngineOptions(), gpu=GPU)
    msg = str(ei.value)
    assert "2 error(s)" in msg and str(tiny) in msg
    assert "node 3 'itae/flag/Greater' (op Greater): unsupported type" in msg
    assert "node 5 'node_Softmax_7' (op Softmax): bad axis" in msg
    assert not (tmp_path / "m.engine").exists()


def test_tensorrt_11_has_no_weak_typing(tiny, tmp_path, monkeypatch):
    trt = make_fake_tensorrt(weak_typing=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    res = eng.build_engine(tiny, tmp_path / "a.engine", eng.EngineOptions(), gpu=GPU)
    assert res.precision == "fp32"
    with pytest.raises(EngineError, match="ModelOpt AutoCast"):
        eng.build_engine(tiny, tmp_path / "b.engine", eng.EngineOptions(precision="fp16"), gpu=GPU)


# ----------------------------------------------------------------------------------------------
# build_from_args end to end with fakes: sidecar and parity
# ----------------------------------------------------------------------------------------------
def _meta(x: np.ndarray, y: np.ndarray) -> dict:
    return {"model": "dinov2_vits14", "img_size": H, "num_prefix_tokens": 1,
            "itae": {"norm_source": "v", "threshold": None, "relative_threshold": 2.0},
            "parity": {"cos_min": 1.0}, "reference_inputs": x, "reference_outputs": y}


def test_build_from_args_writes_sidecar(tmp_path, fake_trt, monkeypatch):
    onnx_path = make_onnx(tmp_path / "model.onnx", external=True)
    monkeypatch.setattr(eng, "gpu_info", lambda: GPU)
    x = np.random.default_rng(0).normal(size=(5, 3, H, W)).astype(np.float32)
    y = reference_fn(x)
    seen = []

    def fake_runner(engine_path, spec, builder, trtexec):
        def run(batch):
            seen.append(len(batch))
            return reference_fn(batch) + 1e-5
        return run, "fake-runner"

    monkeypatch.setattr(eng, "_make_engine_runner", fake_runner)
    argv = ["--opt-batch", "2", "--max-batch", "2", "--timing-cache", str(tmp_path / "tc")]
    summary = build_from_args(argv, onnx_path, tmp_path / "model.engine", _meta(x, y))
    assert seen == [2, 2, 1]  # reference batch split by --max-batch
    side = json.loads((tmp_path / "model.engine.json").read_text())
    assert summary["sidecar"] == str(tmp_path / "model.engine.json") and summary["precision"] == "fp16"
    assert side["model"] == "dinov2_vits14" and side["img_size"] == H and side["itae"]["norm_source"] == "v"
    assert side["precision"] == "fp16" and side["precision_requested"] == "auto"
    assert side["batch_profile"] == {"input": "pixel_values", "min": [1, 3, H, W], "opt": [2, 3, H, W], "max": [2, 3, H, W]}
    assert side["tensorrt_version"] == "10.99.0-fake" and side["builder"] == "tensorrt-python"
    assert side["gpu"] == GPU
    assert side["onnx"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    data = tmp_path / "model.onnx.data"
    assert side["onnx"]["external_data_sha256"] == {data.name: hashlib.sha256(data.read_bytes()).hexdigest()}
    assert side["engine"]["sha256"] == hashlib.sha256((tmp_path / "model.engine").read_bytes()).hexdigest()
    p = side["parity"]
    assert p["ok"] is True and p["batch"] == 5 and p["runner"] == "fake-runner"
    assert 0 < p["max_abs"] < 2e-5 and p["cos_min"] > 0.99999
    assert side["fp32_layers"]["count"] == 6 and side["timing_cache"]["reused"] is False
    assert "reference_inputs" not in json.dumps(side) and side["export"]["parity_onnxruntime"]["cos_min"] == 1.0
    assert (tmp_path / "build_engine.sh").is_file()


def test_parity_failure_keeps_sidecar_and_raises(tiny, tmp_path, fake_trt, monkeypatch):
    monkeypatch.setattr(eng, "gpu_info", lambda: GPU)
    x = np.random.default_rng(1).normal(size=(4, 3, H, W)).astype(np.float32)
    y = reference_fn(x)
    wrong = np.random.default_rng(2).normal(size=y.shape).astype(np.float32)
    monkeypatch.setattr(eng, "_make_engine_runner", lambda *a: ((lambda b: wrong[: len(b)]), "fake-runner"))
    with pytest.raises(ParityError) as ei:
        build_from_args(["--precision", "fp32"], tiny, tmp_path / "model.engine", _meta(x, y))
    assert ei.value.exit_code == 3 and "model.engine.json" in str(ei.value)
    side = json.loads((tmp_path / "model.engine.json").read_text())
    assert side["parity"]["ok"] is False and side["precision"] == "fp32"


def test_trtexec_fallback_build_and_parity(tiny, tmp_path, monkeypatch, fake_trtexec):
    exe, log = fake_trtexec
    no_tensorrt(monkeypatch)
    monkeypatch.setattr(eng, "find_trtexec", lambda: str(exe))
    monkeypatch.setattr(eng, "gpu_info", lambda: GPU)
    x = np.random.default_rng(3).normal(size=(3, 3, H, W)).astype(np.float32)
    summary = build_from_args(["--max-batch", "8"], tiny, tmp_path / "model.engine",
                                 _meta(x, reference_fn(x)))
    side = json.loads((tmp_path / "model.engine.json").read_text())
    assert side["builder"] == "trtexec" and side["tensorrt_version"] == "10.3.0"
    assert side["parity"]["ok"] is True and side["parity"]["runner"] == "trtexec"
    assert side["parity"]["max_abs"] < 1e-5
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    build = next(c for c in calls if any(a.startswith("--saveEngine") for a in c))
    assert "--fp16" in build and "--precisionConstraints=obey" in build
    assert (tmp_path / "model.engine").read_bytes() == b"FAKE-TRTEXEC-ENGINE"
    assert summary["builder"] == "trtexec"


# ----------------------------------------------------------------------------------------------
# trt_runner and the onnxruntime GPU providers
# ----------------------------------------------------------------------------------------------
def test_trt_runner_without_tensorrt(tmp_path, monkeypatch):
    from itae_export.trt_runner import TrtRunner

    with pytest.raises(EngineError, match="does not exist"):
        TrtRunner(tmp_path / "none.engine")
    (tmp_path / "m.engine").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(EngineError, match=r'pip install -e "\.\[trt\]"'):
        TrtRunner(tmp_path / "m.engine")


def test_ort_gpu_providers(tmp_path, monkeypatch):
    import onnxruntime as ort

    from itae_export.trt_runner import check_session_providers, ort_gpu_providers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    for kind in ("cuda", "tensorrt"):
        with pytest.raises(EngineError, match="onnxruntime-gpu"):
            ort_gpu_providers(kind, tmp_path)
    with pytest.raises(EngineError, match="unknown GPU provider"):
        ort_gpu_providers("rocm", tmp_path)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    cuda = ort_gpu_providers("cuda", None)
    assert [p if isinstance(p, str) else p[0] for p in cuda] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    prof = {k: ("pixel_values", (b, 3, 224, 224)) for k, b in (("min", 1), ("opt", 8), ("max", 32))}
    trt = ort_gpu_providers("tensorrt", tmp_path / "cache", fp16=True, profile=prof)
    name, opts = trt[0]
    assert name == "TensorrtExecutionProvider" and opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_enable"] and opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_profile_max_shapes"] == "pixel_values:32x3x224x224" and (tmp_path / "cache").is_dir()
    with pytest.raises(EngineError, match="did not start CUDAExecutionProvider"):
        check_session_providers(types.SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"]), "cuda")
    check_session_providers(types.SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider"]), "cuda")


def test_trtexec_version_parse():
    assert eng._trtexec_version("[TensorRT v100300] # trtexec") == "10.3.0"
    assert eng._trtexec_version("[TensorRT v110401]") == "11.4.1"
    assert eng._trtexec_version("nothing") == "unknown"


def test_sidecar_is_atomic_json(tmp_path):
    engine_path = tmp_path / "x.engine"
    path = eng.write_sidecar(engine_path, {"a": np.float32(0.5), "p": tmp_path, "arr": np.zeros(3)})
    assert path == tmp_path / "x.engine.json"
    assert json.loads(path.read_text()) == {"a": 0.5, "p": str(tmp_path)}  # arrays never go into a sidecar
    assert [p.name for p in tmp_path.iterdir()] == ["x.engine.json"]  # no temp files left


def test_tiny_graph_is_valid_and_matches_its_numpy_reference(tiny):
    import onnxruntime as ort

    onnx.checker.check_model(onnx.load(str(tiny)), full_check=True)
    x = np.random.default_rng(4).normal(size=(2, 3, H, W)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tiny), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
    np.testing.assert_allclose(y, reference_fn(x), atol=1e-5)
