"""Triton Inference Server model repositories, and the deployment graph options.

Layout written (https://github.com/triton-inference-server/server, docs/user_guide/model_repository.md):

    REPO/NAME/config.pbtxt
    REPO/NAME/<version>/model.onnx (+ its external .data file(s))   platform onnxruntime_onnx
    REPO/NAME/<version>/model.plan (a TensorRT engine)               platform tensorrt_plan
    REPO/NAME/<version>/model.xml + model.bin (OpenVINO IR)          backend openvino (triton_openvino)
    REPO/NAME/<version>/itae_export.json                             provenance (ignored by Triton)

Input/output names, types and dims come from the model itself (ONNX graph, or the engine's JSON
sidecar). An existing version is never touched: each call adds the next version number. An existing
config.pbtxt is kept when it describes the same IO and refused (DeployError) otherwise.

Graph options (--input-format uint8-nhwc, --l2-normalize) rewrite the ONNX graph with
graph_passes.preprocess. They must be applied BEFORE a TensorRT engine is built from the ONNX, so the
export pipeline applies them (itae_export.graph_options) between the ITAE pass and the engine build,
and calls :func:`deploy` at the end. ``itae-triton MODEL --triton-repo DIR`` deploys an existing
ONNX file (applying the options in the copy it deploys) or engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.message import DecodeError

from .errors import DeployError, OutputBusyError, OutputError, OutputExistsError, UsageError
from .graph_options import GraphOptions, apply_graph_options_proto
from .hashing import sha256_file
from .jsonable import jsonable
from .outputs import CLAIM_PREFIX, OutputTransaction

PLATFORMS = ("onnxruntime_onnx", "tensorrt_plan", "openvino")  # "openvino" is written as backend: "openvino"
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")
DEFAULT_MAX_BATCH = 8
PROVENANCE_FILE = "itae_export.json"
_MODEL_FILE = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "openvino": "model.xml"}
_ENGINE_SUFFIXES = (".plan", ".engine", ".trt")
_CONFIG_WAIT_S = 120.0  # how long to wait for a concurrent writer of config.pbtxt
_MAX_VERSION_SKIPS = 100

# ONNX TensorProto data type names -> Triton's DataType enum names
_ONNX_TO_TRITON = {
    "FLOAT": "TYPE_FP32",
    "FLOAT16": "TYPE_FP16",
    "BFLOAT16": "TYPE_BF16",
    "DOUBLE": "TYPE_FP64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "BOOL": "TYPE_BOOL",
    "STRING": "TYPE_STRING",
}
# spellings an engine sidecar may use (numpy names, TensorRT enum names) -> Triton
_DTYPE_ALIASES = {
    "float32": "TYPE_FP32", "float": "TYPE_FP32", "fp32": "TYPE_FP32",
    "float16": "TYPE_FP16", "half": "TYPE_FP16", "fp16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16",
    "uint8": "TYPE_UINT8", "int8": "TYPE_INT8", "int32": "TYPE_INT32", "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton enum name, e.g. TYPE_FP32
    shape: tuple[int, ...]  # full shape, -1 for a dynamic dim (batch included)

    def config_dims(self, max_batch: int) -> tuple[int, ...]:
        # with max_batch_size > 0, Triton's dims leave out the batch dim
        return self.shape[1:] if max_batch > 0 else self.shape


@dataclass
class TritonRepoResult:
    model_dir: Path
    config_path: Path
    version: int
    version_dir: Path
    platform: str
    max_batch: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    config_written: bool  # False: an existing compatible config.pbtxt was kept
    files: list[Path] = field(default_factory=list)
    graph_options: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("model_dir", "config_path", "version_dir"):
            d[k] = str(d[k])
        d["files"] = [str(f) for f in self.files]
        return d

    def summary(self) -> str:
        cfg = "written" if self.config_written else "kept (compatible)"
        lines = [
            f"Triton: {self.model_dir.name} version {self.version} ({self.platform}, max_batch_size "
            f"{self.max_batch}) in {self.version_dir}; config.pbtxt {cfg}",
            "  inputs:  " + ", ".join(f"{t.name} {t.data_type} {list(t.shape)}" for t in self.inputs),
            "  outputs: " + ", ".join(f"{t.name} {t.data_type} {list(t.shape)}" for t in self.outputs),
        ]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------- reading IO


def _onnx_specs(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import onnx

    def spec(vi, kind: str) -> TensorSpec:
        tt = vi.type.tensor_type
        name = onnx.TensorProto.DataType.Name(tt.elem_type) if vi.type.HasField("tensor_type") else "?"
        if name not in _ONNX_TO_TRITON:
            raise DeployError(f"ONNX {kind} {vi.name!r} has type {name}, which Triton cannot serve")
        if not tt.HasField("shape"):
            raise DeployError(f"ONNX {kind} {vi.name!r} has no shape; Triton's config needs its rank")
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        return TensorSpec(vi.name, _ONNX_TO_TRITON[name], dims)

    inits = {t.name for t in model.graph.initializer}
    outputs = list(model.graph.output)
    if any(not o.type.tensor_type.HasField("shape") for o in outputs):
        # weights stay unloaded: inference only needs the initializers' dims
        inferred = onnx.shape_inference.infer_shapes(model)
        outputs = list(inferred.graph.output)
    ins = [spec(v, "input") for v in model.graph.input if v.name not in inits]
    return ins, [spec(v, "output") for v in outputs]


def find_engine_sidecar(engine_path: str | Path) -> Path | None:
    """The JSON written beside an engine: `model.engine` -> `model.engine.json` (also X.plan.json)."""
    p = Path(engine_path)
    for cand in (p.with_name(p.name + ".json"), p.with_name(p.stem + ".engine.json"), p.with_suffix(".json")):
        if cand.is_file():
            return cand
    return None


def _sidecar_dtype(value: Any, where: str) -> str:
    s = str(value).strip()
    if s.upper() in _ONNX_TO_TRITON.values():
        return s.upper()
    s = s.lower().removeprefix("datatype.").removeprefix("torch.").removeprefix("np.")
    if s.upper() in _ONNX_TO_TRITON:
        return _ONNX_TO_TRITON[s.upper()]
    if s in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[s]
    raise DeployError(f"{where}: unknown data type {value!r}")


def _cc_string(value: Any) -> str | None:
    """'8.6', [8, 6], 86, 'sm_86' -> '8.6' (the key format of Triton's cc_model_filenames)."""
    if value is None:
        return None
    if isinstance(value, list | tuple) and len(value) == 2:
        return f"{int(value[0])}.{int(value[1])}"
    s = str(value).lower().removeprefix("sm_").removeprefix("sm")
    if re.fullmatch(r"\d+\.\d+", s):
        return s
    if re.fullmatch(r"\d{2,3}", s):
        return f"{s[:-1]}.{s[-1]}"
    return None


def read_engine_sidecar(path: Path) -> dict[str, Any]:
    """IO, compute capability and profile max batch of an engine, from its JSON sidecar.

    The sidecar itae_export.engine writes ("format": "itae-export.engine.v1") names the ONNX the engine
    was built from ("onnx": {"file": path relative to the sidecar, "sha256"}): the IO (names, dtypes,
    dims) is read from that ONNX, after checking its hash; "batch_profile" gives the max batch and
    "gpu" the compute capability. A sidecar may instead list the IO itself: {"inputs": [{"name",
    "dtype", "shape", optional "max_shape"}], "outputs": [...], "compute_capability", "max_batch"}.
    """
    from .safe_io import read_json_object

    data = read_json_object(path, "engine sidecar", "rebuild the engine", err=DeployError, max_bytes=4 << 20)
    gpu = data.get("gpu") if isinstance(data.get("gpu"), dict) else {}
    profile = data.get("batch_profile") or {}
    max_batch = data.get("max_batch")
    if max_batch is None and profile.get("max"):
        max_batch = int(profile["max"][0])
    info: dict[str, Any] = {
        "compute_capability": _cc_string(gpu.get("compute_capability") or data.get("compute_capability")),
        "device_name": gpu.get("name") or data.get("device_name"),
        "tensorrt_version": data.get("tensorrt_version"),
        "precision": data.get("precision"),
        "raw": data,
    }
    io_root = data.get("io", data)
    if io_root.get("inputs") and io_root.get("outputs"):
        ins, mb = _sidecar_specs(path, io_root, "inputs")
        outs, _ = _sidecar_specs(path, io_root, "outputs")
        if max_batch is None and mb:
            max_batch = min(mb)
        info["onnx_metadata"] = {}
    elif isinstance(data.get("onnx"), dict) and data["onnx"].get("file"):
        import onnx

        onnx_path = (path.parent / data["onnx"]["file"]).resolve()
        if not onnx_path.is_file():
            raise DeployError(
                f"engine sidecar {path} takes the IO from {onnx_path} (the ONNX the engine was built from), "
                "which is missing; keep that ONNX where it was, or rebuild the engine"
            )
        want = data["onnx"].get("sha256")
        if want and sha256_file(onnx_path) != want:
            raise DeployError(
                f"{onnx_path} changed since the engine was built (sha256 differs from {path}); "
                "rebuild the engine from the current ONNX"
            )
        proto = onnx.load(str(onnx_path), load_external_data=False)
        ins, outs = _onnx_specs(proto)
        info["onnx_metadata"] = {q.key: q.value for q in proto.metadata_props}
    else:
        raise DeployError(
            f"engine sidecar {path} has neither IO lists nor the source ONNX; rebuild the engine"
        )
    info.update(inputs=ins, outputs=outs, max_batch=int(max_batch) if max_batch is not None else None)
    return info


def _sidecar_specs(path: Path, io_root: dict, kind: str) -> tuple[list[TensorSpec], list[int]]:
    items = io_root.get(kind)
    if isinstance(items, dict):
        items = [{"name": k, **v} for k, v in items.items()]
    out, max_batches = [], []
    for it in items:
        shape = it.get("shape")
        if "name" not in it or shape is None:
            raise DeployError(f"engine sidecar {path}: each of {kind} needs 'name' and 'shape'")
        dtype = _sidecar_dtype(it.get("dtype", it.get("data_type")), f"{path} {kind} {it['name']}")
        out.append(TensorSpec(it["name"], dtype, tuple(int(d) for d in shape)))
        if it.get("max_shape"):
            max_batches.append(int(it["max_shape"][0]))
    return out, max_batches


def _engine_info_from_tensorrt(path: Path) -> dict[str, Any]:
    """Without a sidecar, ask TensorRT (needs TensorRT and a GPU)."""
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing here
        raise DeployError(
            f"{path}: no JSON sidecar ({path.name}.json) and TensorRT is not importable ({e}); "
            "deploy the engine from the machine that built it, or rebuild it with itae-export"
        ) from e
    try:
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - no GPU / CUDA init failure surface as plain exceptions
        raise DeployError(f"{path}: TensorRT could not read the engine ({e}); write its JSON sidecar") from e
    if engine is None:
        raise DeployError(
            f"{path}: TensorRT could not deserialize the engine (other GPU or TensorRT version?)"
        )
    ins, outs, mb = [], [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = _sidecar_dtype(str(engine.get_tensor_dtype(name)), f"{path} {name}")
        spec = TensorSpec(name, dtype, tuple(int(d) for d in engine.get_tensor_shape(name)))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            ins.append(spec)
            if spec.shape and spec.shape[0] == -1:
                mb.append(int(engine.get_tensor_profile_shape(name, 0)[2][0]))
        else:
            outs.append(spec)
    return {"inputs": ins, "outputs": outs, "compute_capability": None, "device_name": None,
            "tensorrt_version": trt.__version__, "max_batch": min(mb) if mb else None, "raw": {}}  # fmt: skip


# ----------------------------------------------------------------------------------- config.pbtxt


def _q(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid protobuf text-format string literal


def _tensor_block(kind: str, specs: list[TensorSpec], max_batch: int) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(specs):
        dims = ", ".join(str(d) for d in t.config_dims(max_batch))
        lines += [
            "  {",
            f"    name: {_q(t.name)}",
            f"    data_type: {t.data_type}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if i < len(specs) - 1 else ""),
        ]
    return lines + ["]"]


def render_config(
    *,
    model_name: str,
    platform: str,
    max_batch: int,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    compute_capability: str | None = None,
    comments: Sequence[str] = (),
    parameters: dict[str, str] | None = None,
) -> str:
    lines = [f"# {c}" for c in comments]
    lines += [
        f"name: {_q(model_name)}",
        f"backend: {_q(platform)}" if platform == "openvino" else f"platform: {_q(platform)}",
        f"max_batch_size: {max_batch}",
    ]
    lines += _tensor_block("input", inputs, max_batch)
    lines += _tensor_block("output", outputs, max_batch)
    if max_batch > 0:
        lines.append("dynamic_batching { }")
    lines += [
        "instance_group [",
        "  {",
        f"    count: {instance_count}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    if compute_capability:
        # a plan only deserializes on the compute capability it was built for; the map records it and
        # lets a later repository hold one plan per GPU type (model_sm90.plan ...) under one version
        lines += [
            f"# TensorRT plan built for compute capability {compute_capability}; other GPUs need their own plan",
            f'cc_model_filenames {{ key: {_q(compute_capability)} value: "model.plan" }}',
        ]
    if parameters:
        from .triton_openvino import parameter_lines

        lines += parameter_lines(parameters)
    return "\n".join(lines) + "\n"


def _model_config_pb2():
    """Triton's ModelConfig protobuf (tritonclient[grpc], a core dependency), imported when needed."""
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def parse_config(text: str, where: str | Path):
    """Parse config.pbtxt text with Triton's own ModelConfig protobuf (tritonclient[grpc])."""
    pb2 = _model_config_pb2()
    from google.protobuf import text_format

    cfg = pb2.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise DeployError(f"{where} is not a valid Triton model config: {e}") from e
    return cfg


def _config_io(cfg, kind: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    pb2 = _model_config_pb2()
    return {t.name: (pb2.DataType.Name(t.data_type), tuple(t.dims)) for t in getattr(cfg, kind)}


_BACKEND_OF = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt", "openvino": "openvino"}


def _incompatibilities(cfg, platform: str, max_batch: int, ins, outs) -> list[str]:
    problems = []
    have_platform = cfg.platform or {v: k for k, v in _BACKEND_OF.items()}.get(cfg.backend, cfg.backend)
    if have_platform and have_platform != platform:
        problems.append(f"platform {have_platform!r} (this model: {platform!r})")
    if cfg.max_batch_size != max_batch:
        problems.append(f"max_batch_size {cfg.max_batch_size} (this model: {max_batch})")
    for kind, specs in (("input", ins), ("output", outs)):
        have = _config_io(cfg, kind)
        if not have:
            continue  # Triton auto-completes IO from the model: nothing to contradict
        want = {t.name: (t.data_type, t.config_dims(max_batch)) for t in specs}
        if have != want:
            problems.append(f"{kind}s {have} (this model: {want})")
    return problems


# ------------------------------------------------------------------------------------ writing repos

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")


def _existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _platform_for(path: Path, platform: str | None) -> str:
    guess = (
        "onnxruntime_onnx"
        if path.suffix == ".onnx"
        else "tensorrt_plan"
        if path.suffix in _ENGINE_SUFFIXES
        else "openvino"
        if path.suffix == ".xml"
        else None
    )
    if platform is None:
        if guess is None:
            raise UsageError(
                f"{path}: cannot tell the platform from the suffix; pass --platform {'|'.join(PLATFORMS)}"
            )
        return guess
    if platform not in PLATFORMS:
        raise UsageError(f"--platform {platform!r}: choose one of {', '.join(PLATFORMS)}")
    if guess is not None and guess != platform:
        raise UsageError(f"--platform {platform} does not fit {path} (looks like {guess})")
    return platform


@dataclass
class _Source:
    """The model file being deployed, as read: its IO, what goes into the version folder, and what the
    config's comments and the result's notes say about it."""

    path: Path
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    meta: dict[str, Any] | None  # the export's record, else what the artifact records
    proto: Any = None  # ONNX: the ModelProto deployed (graph options applied); None for an engine
    record: dict[str, Any] = field(default_factory=dict)  # graph options applied in the deployed copy
    sidecar: Path | None = None  # engine: its JSON sidecar
    engine_max: int | None = None  # engine: the optimization profile's max batch
    cc: str | None = None  # engine: compute capability it was built for
    l2_applied: bool = False
    parameters: dict[str, str] = field(default_factory=dict)  # OpenVINO: the backend's parameters
    comments: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Committed:
    """What one committed output transaction added to the model folder."""

    version: int
    version_dir: Path
    config_written: bool
    files: list[Path]
    notes: list[str]


def write_triton_repo(
    model_path: str | Path,
    repo_dir: str | Path,
    *,
    model_name: str,
    max_batch: int | None = None,
    platform: str | None = None,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    graph_options: GraphOptions | None = None,
    meta: dict[str, Any] | None = None,
) -> TritonRepoResult:
    """Add `model_path` (ONNX or TensorRT engine) as a new version of `repo_dir/model_name`.

    max_batch None: the engine profile's max batch (engines) or 8; 0 disables batching (dims then
    include the batch dim). graph_options apply to ONNX sources only (in the deployed copy; the
    source is not modified); for engines they are checked against the engine's IO.

    Steps: check the arguments, read the source's IO (_read_source), settle max_batch, render the
    config (_render_checked), then stage and commit the version folder (_commit_version).
    """
    src = Path(model_path)
    _check_repo_args(src, model_name, instance_kind, instance_count, max_batch)
    platform = _platform_for(src, platform)
    source = _read_source(src, platform, graph_options or GraphOptions(), instance_kind, meta)
    max_batch = _resolve_max_batch(source, max_batch)
    config_text = _render_checked(source, model_name, max_batch, instance_kind, instance_count)
    model_dir = Path(repo_dir) / model_name
    done = _commit_version(source, model_dir, max_batch, config_text)
    return TritonRepoResult(
        model_dir=model_dir, config_path=model_dir / "config.pbtxt", version=done.version,
        version_dir=done.version_dir, platform=platform, max_batch=max_batch, inputs=source.inputs,
        outputs=source.outputs, config_written=done.config_written, files=done.files,
        graph_options=source.record, notes=source.notes + done.notes,
    )  # fmt: skip


def _check_repo_args(src: Path, model_name: str, instance_kind: str, instance_count: int,
                     max_batch: int | None) -> None:
    if not src.is_file():
        raise UsageError(f"{src} does not exist; pass an .onnx file, a TensorRT engine (.plan/.engine) or an "
                         "OpenVINO IR (.xml)")
    if not _NAME_RE.match(model_name or ""):
        raise UsageError(
            f"--model-name {model_name!r}: use letters, digits, '_', '-', '.' (a directory name)"
        )
    if instance_kind not in INSTANCE_KINDS:
        raise UsageError(f"--instance-kind {instance_kind!r}: choose one of {', '.join(INSTANCE_KINDS)}")
    if instance_count < 1:
        raise UsageError(f"--instances must be >= 1, got {instance_count}")
    if max_batch is not None and max_batch < 0:
        raise UsageError(f"--max-batch must be >= 0 (0: no batching), got {max_batch}")


def _read_source(src: Path, platform: str, opts: GraphOptions, instance_kind: str,
                 meta: dict[str, Any] | None) -> _Source:
    """The ONNX (graph options applied to the deployed copy) or the engine's IO, from the file."""
    comments = [f"Written by itae-export (itae_export.triton) from {src.name}."]
    if platform == "onnxruntime_onnx":
        from .safe_io import load_onnx_checked

        proto = load_onnx_checked(src, "model")  # UsageError for garbage, unsafe data locations
        record: dict[str, Any] = {}
        if opts.any or opts.input_format:
            proto, record = apply_graph_options_proto(proto, opts)
        ins, outs = _onnx_specs(proto)
        return _Source(src, platform, ins, outs, meta, proto=proto, record=record, comments=comments)
    if platform == "openvino":
        from .triton_openvino import read_ir_source

        if opts.any:
            raise UsageError("--input-format/--l2-normalize cannot be applied to an OpenVINO IR; export it without them")
        return _Source(src, platform, comments=comments, **read_ir_source(src, instance_kind, meta, comments))
    if instance_kind != "KIND_GPU":
        raise UsageError("--instance-kind KIND_CPU: a TensorRT plan runs on a GPU only; use KIND_GPU")
    return _read_engine(src, opts, meta, comments)


def _read_engine(src: Path, opts: GraphOptions, meta: dict[str, Any] | None, comments: list[str]) -> _Source:
    sidecar = find_engine_sidecar(src)
    info = read_engine_sidecar(sidecar) if sidecar else _engine_info_from_tensorrt(src)
    s = _Source(
        src, "tensorrt_plan", info["inputs"], info["outputs"], meta, sidecar=sidecar,
        engine_max=info["max_batch"], cc=info["compute_capability"], comments=comments,
    )  # fmt: skip
    engine_md = info.get("onnx_metadata")  # metadata of the ONNX the engine was built from, if known
    _check_engine_options(s, opts, engine_md)
    if engine_md:
        s.l2_applied = _has_l2(engine_md)
    if meta is None and sidecar is not None:
        raw = info["raw"]
        s.meta = {k: raw[k] for k in ("model", "img_size", "itae", "dynamic_size") if k in raw}
    if info.get("precision"):
        comments.append(f"TensorRT precision: {info['precision']}")
    if s.cc:
        dev = f" ({info['device_name']})" if info.get("device_name") else ""
        comments.append(
            f"TensorRT engine for compute capability {s.cc}{dev}, TensorRT {info.get('tensorrt_version')}."
        )
    else:
        s.notes.append(
            "compute capability unknown (no sidecar value): the plan loads only on the GPU type it was built for"
        )
    return s


def _check_engine_options(s: _Source, opts: GraphOptions, engine_md: dict[str, str] | None) -> None:
    """Graph options cannot be applied to an engine: refuse those its IO (or source ONNX) contradicts."""
    src, ins = s.path, s.inputs
    if opts.input_format == "uint8-nhwc" and not any(t.data_type == "TYPE_UINT8" for t in ins):
        raise UsageError(
            f"--input-format uint8-nhwc: engine {src} takes {ins[0].data_type}; apply the graph options "
            "to the ONNX before building the engine (itae_export.triton.apply_graph_options)"
        )
    if opts.input_format == "float32-nchw" and ins[0].data_type == "TYPE_UINT8":
        raise UsageError(
            f"--input-format float32-nchw: engine {src} takes uint8 NHWC pixels; drop the flag"
        )
    if not opts.l2_normalize:
        return
    from graph_passes.preprocess import L2_NORMALIZE_KEY

    if engine_md is None:
        s.notes.append("--l2-normalize cannot be checked on this engine; it must have been built with it")
    elif L2_NORMALIZE_KEY not in engine_md:
        raise UsageError(
            f"--l2-normalize: engine {src} was built from an ONNX without it; apply the graph options "
            "to the ONNX before building the engine (itae_export.triton.apply_graph_options)"
        )


def _resolve_max_batch(s: _Source, max_batch: int | None) -> int:
    """The config's max_batch_size: given, else the engine profile's max, else 8; checked against the IO."""
    engine_max = s.engine_max
    if max_batch is None:
        max_batch = engine_max if engine_max is not None else DEFAULT_MAX_BATCH
    if engine_max is not None and max_batch > engine_max:
        raise UsageError(
            f"--max-batch {max_batch} exceeds the engine's optimization profile (max batch {engine_max}); "
            f"use --max-batch {engine_max} or rebuild the engine"
        )
    if max_batch > 0:
        for t in s.inputs + s.outputs:
            if not t.shape or t.shape[0] != -1:
                raise DeployError(
                    f"{s.path}: {t.name!r} has shape {list(t.shape)}, no dynamic batch dim; re-export with a "
                    "dynamic batch or pass --max-batch 0"
                )
    sizes = (s.meta or {}).get("dynamic_size")
    for t in s.inputs:
        if -1 in t.shape[1:] and sizes:
            s.notes.append(f"input {t.name!r} {list(t.shape)} takes any height and width that are multiples of "
                           f"{sizes.get('multiple', 14)} from {sizes['min']} to {sizes['max']} (dynamic-size export)")
        elif -1 in t.shape[1:]:
            s.notes.append(
                f"input {t.name!r} has dynamic non-batch dims {list(t.shape)}; clients must send a fixed size"
            )
    return max_batch


def _describe_model(s: _Source) -> list[str]:
    """The config's comments on the model: name and ITAE settings, input format, L2 normalisation."""
    comments, meta = [], s.meta
    if meta:
        if meta.get("model"):
            comments.append(f"model: {meta['model']}, img_size {meta.get('img_size')}")
        if meta.get("dynamic_size"):
            d = meta["dynamic_size"]
            comments.append(f"dynamic size: height and width multiples of {d.get('multiple', 14)} from {d.get('min')} "
                            f"to {d.get('max')}")
        if "itae" in meta:
            comments.append("ITAE: " + (json.dumps(meta["itae"], sort_keys=True) if meta["itae"] else "off"))
    fmt = (
        "uint8 NHWC RGB pixels (normalised inside the graph)"
        if s.inputs[0].data_type == "TYPE_UINT8"
        else "float, ImageNet-normalised NCHW"
    )
    comments.append(f"input {s.inputs[0].name!r}: {fmt}")
    if s.proto is not None:
        s.l2_applied = _has_l2({q.key: q.value for q in s.proto.metadata_props})
    if s.l2_applied:
        comments.append("output is L2-normalised (unit length): use inner product / cosine")
    return comments


def _render_checked(s: _Source, model_name: str, max_batch: int, instance_kind: str, instance_count: int) -> str:
    """config.pbtxt's text, parsed back with Triton's ModelConfig where tritonclient is installed."""
    s.comments += _describe_model(s)
    config_text = render_config(
        model_name=model_name, platform=s.platform, max_batch=max_batch, inputs=s.inputs, outputs=s.outputs,
        instance_kind=instance_kind, instance_count=instance_count, compute_capability=s.cc, comments=s.comments,
        parameters=s.parameters,
    )  # fmt: skip
    parse_config(config_text, "generated config.pbtxt")  # guard against a malformed render
    return config_text


def _provenance(s: _Source) -> dict[str, Any]:
    return {
        "source": str(s.path.resolve()),
        "platform": s.platform,
        "graph_options": s.record,
        "meta": jsonable(s.meta or {}),
        "engine_sidecar": str(s.sidecar) if s.sidecar else None,
    }


def _commit_version(s: _Source, model_dir: Path, max_batch: int, config_text: str) -> _Committed:
    """Stage and commit the next free version (and config.pbtxt when missing), retrying around
    concurrent writers: a version number another writer holds or committed is skipped, a config.pbtxt
    another writer is adding is waited for (up to _CONFIG_WAIT_S) and then checked."""
    config_path = model_dir / "config.pbtxt"
    provenance = _provenance(s)
    held: set[int] = set()  # version numbers another writer is staging: try the next one
    deadline = time.monotonic() + _CONFIG_WAIT_S
    while True:
        config_notes: list[str] = []
        config_written = _config_to_write(
            config_path, s.platform, max_batch, s.inputs, s.outputs, s.cc, config_notes
        )
        version = _next_version(model_dir, held)
        version_dir = model_dir / str(version)
        try:
            files = _write_version(
                s.path, version_dir, config_path if config_written else None, config_text, s.platform, s.proto,
                s.record, s.sidecar, provenance,
            )  # fmt: skip
        except OutputBusyError:
            if (model_dir / f"{CLAIM_PREFIX}{version}").exists() and len(held) < _MAX_VERSION_SKIPS:
                held.add(version)  # a concurrent writer took this number
                continue
            if time.monotonic() < deadline and len(held) < _MAX_VERSION_SKIPS:
                time.sleep(0.05)  # another writer is adding config.pbtxt: look again when it is done
                continue
            raise
        except (OutputExistsError, UsageError):
            if os.path.lexists(version_dir) and len(held) < _MAX_VERSION_SKIPS:
                held.add(version)  # another writer committed this number meanwhile (or a file has it)
                continue
            if config_written and config_path.exists():
                continue  # another writer committed config.pbtxt meanwhile: check it and keep it
            raise
        return _Committed(version, version_dir, config_written, files, config_notes)


def _config_to_write(config_path: Path, platform: str, max_batch: int, ins: list[TensorSpec],
                     outs: list[TensorSpec], cc: str | None, notes: list[str]) -> bool:
    """True when config.pbtxt is missing (this call writes it); an existing one is kept when it
    describes the same model, else DeployError."""
    if not config_path.exists():
        return True
    existing = parse_config(config_path.read_text(), config_path)
    problems = _incompatibilities(existing, platform, max_batch, ins, outs)
    if problems:
        raise DeployError(
            f"{config_path} describes another model: "
            + "; ".join(problems)
            + ". Choose another --model-name, or move that model away (versions are never overwritten)"
        )
    if cc and cc not in dict(existing.cc_model_filenames):
        notes.append(f"kept config.pbtxt has no cc_model_filenames entry for {cc}")
    return False


def _next_version(model_dir: Path, held: set[int]) -> int:
    version = max(_existing_versions(model_dir), default=0) + 1
    while version in held:
        version += 1
    return version


def _write_version(
    src: Path, version_dir: Path, config_path: Path | None, config_text: str, platform: str, proto,
    record: dict, sidecar: Path | None, provenance: dict,
) -> list[Path]:
    """One output transaction: the version folder (staged under a name Triton ignores, committed by one
    rename, never over an existing one) and config.pbtxt when this call writes it (committed first).
    Raises OutputBusyError when another writer holds the version number or the config."""
    inputs = [src] + ([sidecar] if sidecar else [])
    extra = [config_path] if config_path is not None else []
    with OutputTransaction(version_dir, extra=extra, inputs=inputs, flag="--triton-repo") as tx:
        stage = tx.stage_path()
        stage.mkdir()
        files, sources = _stage_files(src, stage, platform, proto, record, sidecar)
        (stage / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")
        if config_path is not None:
            staged_config = tx.stage_path(config_path)
            staged_config.write_text(config_text)
            tx.add(staged_config, config_path)
        # copied files are never more readable than their sources (0o644 & the strictest source's mode)
        tx.add(stage, version_dir, source=_strictest(sources))
        tx.commit()
    return [version_dir / f.relative_to(stage) for f in files]


def _strictest(files: list[Path]) -> Path:
    return min(files, key=lambda f: bin(f.stat().st_mode & 0o777).count("1"))


def _has_l2(metadata: dict[str, str]) -> bool:
    from graph_passes.preprocess import L2_NORMALIZE_KEY

    return L2_NORMALIZE_KEY in metadata


def _copy_file(src: Path, dst: Path) -> Path:
    """Copy bytes only: the commit sets the mode (0o644 capped by the source's)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _stage_files(
    src: Path, stage: Path, platform: str, proto, record: dict, sidecar: Path | None
) -> tuple[list[Path], list[Path]]:
    """Write the version folder's model files into `stage`; returns (staged files, their sources)."""
    files, sources = [], [src]
    if platform == "openvino":
        from .triton_openvino import stage_ir_files

        return stage_ir_files(src, stage, sidecar, _copy_file)
    if platform == "tensorrt_plan":
        files.append(_copy_file(src, stage / "model.plan"))
        if sidecar:
            files.append(_copy_file(sidecar, stage / "model.plan.json"))
            sources.append(sidecar)
        return files, sources
    from graph_passes.preprocess import PreprocessPassError, external_data_locations

    try:
        locations = external_data_locations(proto)
    except PreprocessPassError as e:
        raise DeployError(f"{src}: {e}") from e
    if any(not r.get("already_applied") for r in record.values()):
        # the deployed graph differs from the source: write the rewritten proto (weights stay external)
        import onnx

        onnx.save(proto, str(stage / "model.onnx"))
        files.append(stage / "model.onnx")
    else:
        files.append(_copy_file(src, stage / "model.onnx"))  # byte-identical to the source
    for loc in locations:
        data = src.parent / loc
        if not data.is_file():
            raise DeployError(
                f"{src} refers to external data {data}, which is missing; keep the .data beside the .onnx"
            )
        files.append(_copy_file(data, stage / loc))
        sources.append(data)
    return files, sources


# ------------------------------------------------------------------------------------ deployment options


@dataclass(frozen=True)
class TritonOptions:
    """Where and how to deploy; validated on construction (before any export work starts)."""

    repo: Path
    model_name: str | None = None  # default: the DINOv2 model name, '_itae' appended when ITAE is on
    max_batch: int | None = None  # default: the engine profile's max, else 8; 0: no batching
    instance_kind: str | None = None  # default: KIND_CPU for --fast-path models, else KIND_GPU
    instances: int = 1
    platform: str | None = None  # default: from the file suffix

    def __post_init__(self) -> None:
        object.__setattr__(self, "repo", Path(self.repo))
        if self.repo.exists() and not self.repo.is_dir():
            raise UsageError(f"--triton-repo {self.repo} is a file; give a folder (created if missing)")
        if self.model_name is not None and not _NAME_RE.match(self.model_name):
            raise UsageError(f"--model-name {self.model_name!r}: use letters, digits, '_', '-', '.' "
                             "(a folder name: no path separators, spaces or newlines)")
        if self.instance_kind is not None and self.instance_kind not in INSTANCE_KINDS:
            raise UsageError(f"--instance-kind {self.instance_kind!r}: choose one of {', '.join(INSTANCE_KINDS)}")
        if isinstance(self.instances, bool) or not isinstance(self.instances, int) or self.instances < 1:
            raise UsageError(f"--instances must be an integer >= 1, got {self.instances!r}")
        mb = self.max_batch
        if mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 0):
            raise UsageError(f"--max-batch must be an integer >= 0 (0: no batching), got {mb!r}")
        if self.platform is not None and self.platform not in PLATFORMS:
            raise UsageError(f"--platform {self.platform!r}: choose one of {', '.join(PLATFORMS)}")
        _check_writable(self.repo)


def _check_writable(repo: Path) -> None:
    """Refuse a repository folder that cannot be created or written, before any export work."""
    here = repo
    while not here.exists() and here != here.parent:
        here = here.parent
    if not here.is_dir() or not os.access(here, os.W_OK | os.X_OK):
        raise OutputError(f"--triton-repo {repo} cannot be written ({here} is not a writable folder); choose a "
                          "writable --triton-repo")


def default_instance_kind(meta: dict[str, Any] | None) -> str:
    """KIND_CPU for an `itae-export --fast-path` model (int8 / fused: ONNX Runtime CPU paths), else
    KIND_GPU. meta: itae-export's run metadata or _meta_from_model's."""
    meta = meta or {}
    return "KIND_CPU" if meta.get("fast_path") or meta.get("openvino") else "KIND_GPU"


def default_model_name(meta: dict[str, Any] | None, model_path: str | Path) -> str:
    meta = meta or {}
    base = str(meta.get("model") or Path(model_path).stem)
    if meta.get("itae"):
        base += "_itae"
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", base).lstrip(".-") or "model"
    return name


def deploy(model_path: str | Path, opts: TritonOptions, *, graph_options: GraphOptions | None = None,
           meta: dict[str, Any] | None = None) -> TritonRepoResult:
    """Add `model_path` (ONNX or engine) as a new version of `opts.repo/NAME`.

    For an ONNX path, graph options not yet applied are applied in the deployed copy; for an engine
    they must already be in it (checked where the engine's IO shows it). meta: the export's RunInfo
    record, else what the artifact itself records (ONNX metadata / engine sidecar).
    """
    path = Path(model_path)
    meta = meta if meta is not None else (meta_from_model(path) or None)
    return write_triton_repo(
        path, opts.repo,
        model_name=opts.model_name or default_model_name(meta, path),
        max_batch=opts.max_batch, platform=opts.platform,
        instance_kind=opts.instance_kind or default_instance_kind(meta),
        instance_count=opts.instances, graph_options=graph_options or GraphOptions(), meta=meta,
    )  # fmt: skip


def meta_from_model(path: Path) -> dict[str, Any]:
    """Model name, image size and ITAE settings recorded by itae-export (ONNX metadata / engine sidecar)."""
    meta: dict[str, Any] = {}
    try:
        if path.suffix == ".onnx" and path.is_file():
            import onnx

            from graph_passes import metadata as md

            proto = onnx.load(str(path), load_external_data=False)
            meta["onnx_metadata"] = md.metadata_dict(proto)
            art = md.read_metadata(proto)
            if art.model:
                meta.update(model=art.model, img_size=art.img_size, itae=art.itae, dynamic_size=art.dynamic_size)
            if art.fast_path:
                meta["fast_path"] = art.fast_path
        elif path.suffix == ".xml":
            from .ov_runner import read_sidecar

            side = read_sidecar(path) or {}
            meta = {k: side[k] for k in ("model", "img_size", "itae") if k in side}
            meta["openvino"] = {"precision": side.get("precision")}
        elif (sidecar := find_engine_sidecar(path)) is not None:
            raw = json.loads(sidecar.read_text())
            meta = {k: raw[k] for k in ("model", "img_size", "itae", "dynamic_size") if k in raw}
    except (OSError, ValueError, DecodeError):  # PassError (bad metadata) is a ValueError
        return {}  # unreadable: write_triton_repo reports the file itself
    return meta
