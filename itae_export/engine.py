"""TensorRT engines for the (ITAE-patched) ONNX: `itae-export MODEL --out model.engine`.

What this module does, and why
------------------------------
* Options (`EngineOptions`) are plain Python and validated before anything heavy is imported, so a
  bad `--min-batch/--opt-batch/--max-batch`, `--workspace` or `--precision` is a UsageError on any
  machine.
* The batch profile follows trtexec's min/opt/max convention; the input name and C,H,W are read from
  the ONNX itself (`read_input_spec`), never assumed.
* The equivalent trtexec command is ALWAYS written next to the ONNX as `build_engine.sh`, so an
  engine can be built on another machine (an NVIDIA GPU with TensorRT, e.g. an NGC TensorRT
  container) from the files this command leaves behind, even when this machine has no GPU.
* Building: TensorRT's Python API when `tensorrt` imports (parse_from_file, so external weight
  files next to the ONNX are found), else `trtexec` from PATH with the same settings. With neither,
  or without a GPU, the command stops with one EngineError sentence (exit code 4) that names what is
  missing, how to install it and the script to run.
* Mixed precision: fp16 (default where the GPU and TensorRT support it) and bf16 engines keep
  LayerNorm (INormalizationLayer in TensorRT 10), Softmax, reductions and every layer made from an
  ONNX node named "itae/..." (the ITAE graph pass names all its nodes so) in float32, through
  per-layer precision constraints: `layer.precision` and `set_output_type` plus
  BuilderFlag.OBEY_PRECISION_CONSTRAINTS (trtexec: `--precisionConstraints=obey
  --layerPrecisions=...:fp32 --layerOutputTypes=...:fp32`). Why: the ITAE artifact test compares
  token norms (sums of ~D squares) with a threshold; in fp16 those sums lose digits or overflow
  (65504) and the artifact set can change, which changes the attention and so the clustering
  feature. LayerNorm variance and softmax exponent sums have the same range problem. Matmuls stay
  in fp16/bf16, where the speed is.
* fp32 engines disable TF32 (unless `--allow-tf32`), because parity with PyTorch is the point of
  an fp32 engine and TF32 matmuls carry only a 10-bit mantissa.
* A timing cache (`--timing-cache PATH`) is loaded before and saved after every build, so repeated
  builds (fp32 and fp16, or several models on one GPU) skip re-timing tactics.
* `--strongly-typed` builds a strongly typed network: precision then comes from the ONNX tensor
  types (TensorRT ignores builder precision flags), so it is accepted with fp32 only here.
* After the build the engine is run on the CLI's reference batch and compared with the PyTorch
  reference outputs; the figures go into a JSON sidecar next to the engine (`model.engine.json`).

TensorRT versions
-----------------
Targets the TensorRT 10.x Python API (tensor-name I/O, execute_async_v3, set_memory_pool_limit,
parse_from_file, layer metadata "[ONNX Layer: name]") and 11.x. TensorRT 11 removed weak typing
(BuilderFlag.FP16/BF16/OBEY_PRECISION_CONSTRAINTS, trtexec --fp16/--bf16/--precisionConstraints):
there fp32 engines build as in 10.x, the default precision falls back to fp32, and an explicit
fp16/bf16 request stops with an EngineError that points to ModelOpt AutoCast (convert the ONNX to
mixed precision, then build it with --strongly-typed). None of this has been run on a GPU yet.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # mypy checks the TensorRT calls against tensorrt-stubs; never imported at run time
    import tensorrt

from graph_passes.graph import external_locations

from .errors import EngineError, ParityError, UsageError
from .hashing import sha256_file
from .jsonable import jsonable
from .outputs import OutputTransaction
from .parity import compare
from .results import RunInfo
from .runtime import run_batched

PRECISIONS = ("fp32", "fp16", "bf16")
BUILDERS = ("auto", "python", "trtexec")
SCRIPT_NAME = "build_engine.sh"
ITAE_PREFIX = "itae/"
DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH = 1, 8, 32
DEFAULT_WORKSPACE_MIB = 4096
# ONNX ops kept in float32 in fp16/bf16 engines (TensorRT: NORMALIZATION, SOFTMAX, REDUCE layers).
FP32_ONNX_OPS = frozenset(
    {
        "LayerNormalization",
        "Softmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceMax",
        "ReduceMin",
    }
)
# Engine-vs-PyTorch parity the build must reach (cosine per row; max abs only for fp32, where the
# outputs of the final LayerNorm are O(1) and fp32 accumulation-order noise stays far below 1e-3).
PARITY_TOLERANCES: dict[str, dict[str, float | None]] = {
    "fp32": {"cos_min": 0.99999, "max_abs": 1e-3},
    "fp16": {"cos_min": 0.999, "max_abs": None},
    "bf16": {"cos_min": 0.995, "max_abs": None},
}
INSTALL_HINT = 'pip install -e ".[trt]" on a machine with an NVIDIA GPU, or use an NGC TensorRT container'
_FLOAT_ONNX_TYPES = frozenset({1, 10, 11, 16})  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_SPEC_UNSAFE = re.compile(r"[,:\s'\"]")  # names trtexec's layer spec grammar cannot carry


# --------------------------------------------------------------------------------------------
# (a) options
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineOptions:
    """Engine build settings; validated on construction (UsageError names the flag)."""

    precision: str | None = None  # None: fp16 where the GPU and TensorRT support it, else fp32
    min_batch: int = DEFAULT_MIN_BATCH
    opt_batch: int = DEFAULT_OPT_BATCH
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: Path | None = None
    strongly_typed: bool = False
    allow_tf32: bool = False
    precision_constraints: bool = True  # keep LayerNorm/Softmax/Reduce/itae/* in fp32 (fp16/bf16)
    builder: str = "auto"
    # full input shapes (B, C, H, W) of the profile, trtexec's --minShapes/--optShapes/--maxShapes;
    # None: the batch flags above with the ONNX's H and W (a dynamic-size ONNX: its recorded bounds)
    min_shape: tuple[int, ...] | None = None
    opt_shape: tuple[int, ...] | None = None
    max_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self._check_shapes()
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r} is not valid; choose one of {', '.join(PRECISIONS)}")
        for flag, value in (
            ("--min-batch", self.min_batch),
            ("--opt-batch", self.opt_batch),
            ("--max-batch", self.max_batch),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{flag} must be an integer >= 1, got {value!r}")
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise UsageError(
                f"batch profile must satisfy --min-batch <= --opt-batch <= --max-batch, got "
                f"{self.min_batch} / {self.opt_batch} / {self.max_batch}"
            )
        ws = self.workspace_mib
        if isinstance(ws, bool) or not isinstance(ws, int) or ws <= 0:
            raise UsageError(f"--workspace must be a positive number of MiB, got {ws!r}")
        if self.builder not in BUILDERS:
            raise UsageError(f"--engine-builder {self.builder!r} is not valid; choose one of {', '.join(BUILDERS)}")
        if self.strongly_typed and self.precision in ("fp16", "bf16"):
            raise UsageError(
                f"--strongly-typed takes precision from the ONNX tensor types, so --precision {self.precision} "
                "has no effect; drop --strongly-typed, or convert the ONNX to mixed precision first "
                "(ModelOpt AutoCast) and build it with --strongly-typed and no --precision"
            )
        if self.timing_cache is not None:
            tc = Path(self.timing_cache)
            if tc.exists() and tc.is_dir():
                raise UsageError(f"--timing-cache {tc} is a directory; give a file path")
            object.__setattr__(self, "timing_cache", tc)

    def _check_shapes(self) -> None:
        given = {f: v for f, v in (("--min-shape", self.min_shape), ("--opt-shape", self.opt_shape),
                                   ("--max-shape", self.max_shape)) if v is not None}
        if not given:
            return
        if len(given) != 3:
            raise UsageError("give all three of --min-shape, --opt-shape and --max-shape (trtexec's convention), "
                             "or none")
        for flag, shape in given.items():
            if len(shape) != 4 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
                raise UsageError(f"{flag} must be four positive integers BxCxHxW, e.g. 1x3x224x224, got {shape!r}")
        mn, opt, mx = self.min_shape, self.opt_shape, self.max_shape
        assert mn is not None and opt is not None and mx is not None
        if any(not a <= b <= c for a, b, c in zip(mn, opt, mx, strict=True)):
            raise UsageError(f"the profile must satisfy min <= opt <= max in every dim, got "
                             f"{_shape_text(mn)} / {_shape_text(opt)} / {_shape_text(mx)}")
        batches = (mn[0], opt[0], mx[0])
        defaults = (DEFAULT_MIN_BATCH, DEFAULT_OPT_BATCH, DEFAULT_MAX_BATCH)
        flags = (self.min_batch, self.opt_batch, self.max_batch)
        if flags != defaults and flags != batches:
            raise UsageError("--min-shape/--opt-shape/--max-shape already set the batch; drop --min-batch/--opt-batch/"
                             "--max-batch")
        object.__setattr__(self, "min_batch", mn[0])
        object.__setattr__(self, "opt_batch", opt[0])
        object.__setattr__(self, "max_batch", mx[0])


def _shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def parse_shape(text: str, flag: str) -> tuple[int, ...]:
    """trtexec's shape spec "1x3x224x224", optionally "name:1x3x224x224" -> (1, 3, 224, 224)."""
    body = text.rsplit(":", 1)[-1]
    try:
        return tuple(int(d) for d in body.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: give BxCxHxW, e.g. 8x3x224x224") from None


# --------------------------------------------------------------------------------------------
# (b) profile shapes from the ONNX input
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    name: str
    channels: int
    height: int | None  # None: dynamic (a --dynamic-size export; `sizes` bounds it)
    width: int | None
    batch: int | str | None  # fixed batch, symbolic name, or None (unknown)
    output_names: tuple[str, ...] = ()
    sizes: dict | None = None  # the recorded {"min", "max", "multiple"} of a dynamic-size ONNX
    opt_size: int | None = None  # the recorded img_size: the profile's default opt H and W

    @property
    def dynamic_hw(self) -> bool:
        return self.height is None or self.width is None


def _load_onnx_header(onnx_path: Path):
    import onnx

    if not onnx_path.is_file():
        raise EngineError(f"ONNX file {onnx_path} does not exist; export it first (itae-export MODEL --out model.onnx)")
    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any protobuf/IO failure means the same thing here
        raise EngineError(f"cannot read ONNX file {onnx_path} ({e}); re-export it") from e


def read_input_spec(onnx_path: str | Path) -> InputSpec:
    """The image input of the ONNX: its name, C, H, W (must be static) and batch dimension."""
    onnx_path = Path(onnx_path)
    model = _load_onnx_header(onnx_path)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise EngineError(
            f"{onnx_path} has {len(inputs)} graph inputs ({[i.name for i in inputs]}); the engine builder expects one "
            "image input [B,3,H,W]"
        )
    vi = inputs[0]
    dims = vi.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise EngineError(f"input {vi.name!r} of {onnx_path} has rank {len(dims)}; expected [B,C,H,W]")
    from graph_passes import metadata as md

    chw: list[int | None] = []
    for axis, d in zip("CHW", dims[1:], strict=True):
        if d.HasField("dim_value") and d.dim_value > 0:
            chw.append(int(d.dim_value))
        elif axis == "C":
            raise EngineError(f"input {vi.name!r} of {onnx_path} has a dynamic channel dimension; expected [B,3,H,W]")
        else:
            chw.append(None)
    sizes = opt = None
    if None in chw:
        sizes, opt = md.metadata_field(model, "dynamic_size"), md.metadata_field(model, "img_size")
        if sizes is None:
            raise EngineError(
                f"input {vi.name!r} of {onnx_path} has a dynamic H or W but no recorded size bounds; export with "
                "itae-export --dynamic-size (or a fixed --img-size) so the engine profile can be built")
    b = dims[0]
    batch: int | str | None
    if b.HasField("dim_value") and b.dim_value > 0:
        batch = int(b.dim_value)
    elif b.HasField("dim_param") and b.dim_param:
        batch = b.dim_param
    else:
        batch = None
    outs = tuple(o.name for o in model.graph.output)
    assert chw[0] is not None
    return InputSpec(vi.name, chw[0], chw[1], chw[2], batch, outs, sizes=sizes, opt_size=opt)  # type: ignore[arg-type]


def profile_shapes(spec: InputSpec, options: EngineOptions) -> dict[str, tuple[int, int, int, int]]:
    """min/opt/max input shapes for the optimization profile (trtexec convention): the options'
    full shapes, else the batch flags with the ONNX's H and W (dynamic: the recorded bounds, opt at
    the recorded img_size). Checked against the ONNX: fixed dims must match, dynamic H and W must be
    multiples of the patch size within the recorded bounds."""
    if isinstance(spec.batch, int) and not (options.min_batch == options.opt_batch == options.max_batch == spec.batch):
        raise UsageError(
            f"the ONNX input {spec.name!r} has a fixed batch of {spec.batch}; pass --min-batch/--opt-batch/--max-batch "
            f"{spec.batch} or re-export with a dynamic batch"
        )
    shapes: dict[str, tuple[int, ...]]
    if options.min_shape is not None and options.opt_shape is not None and options.max_shape is not None:
        shapes = {"min": options.min_shape, "opt": options.opt_shape, "max": options.max_shape}
    elif spec.height is not None and spec.width is not None:
        chw = (spec.channels, spec.height, spec.width)
        shapes = {"min": (options.min_batch, *chw), "opt": (options.opt_batch, *chw), "max": (options.max_batch, *chw)}
    else:
        sizes = spec.sizes or {}
        lo, hi = int(sizes["min"]), int(sizes["max"])
        opt = spec.opt_size if spec.opt_size and lo <= spec.opt_size <= hi else lo
        c = spec.channels
        shapes = {"min": (options.min_batch, c, lo, lo), "opt": (options.opt_batch, c, opt, opt),
                  "max": (options.max_batch, c, hi, hi)}
    for key, shape in shapes.items():
        _check_profile_shape(spec, key, shape)
    return shapes  # type: ignore[return-value]


def _check_profile_shape(spec: InputSpec, key: str, shape: tuple[int, ...]) -> None:
    flag = f"--{key}-shape"
    fixed = {1: spec.channels, 2: spec.height, 3: spec.width}
    for axis, want in fixed.items():
        if want is not None and shape[axis] != want:
            raise UsageError(f"{flag} {_shape_text(shape)}: the ONNX input {spec.name!r} has a fixed "
                             f"{'CHW'[axis - 1]} of {want}; use {want} there (or export with --dynamic-size)")
    if spec.dynamic_hw and spec.sizes:
        lo, hi, mult = int(spec.sizes["min"]), int(spec.sizes["max"]), int(spec.sizes.get("multiple", 14))
        for s in shape[2:]:
            if not lo <= s <= hi or s % mult:
                raise UsageError(f"{flag} {_shape_text(shape)}: the ONNX takes heights and widths that are "
                                 f"multiples of {mult} from {lo} to {hi}")


def fp32_onnx_nodes(onnx_path: str | Path) -> list[dict[str, Any]]:
    """ONNX nodes to keep in float32: LayerNorm/Softmax/Reduce* and every node named "itae/...".

    Each entry: {"name", "op", "float_outputs": True/False/None (unknown), "n_outputs"}. Output
    types come from ONNX shape inference on the graph without its weights (cheap for ViT-g too).
    """
    import onnx

    model = _load_onnx_header(Path(onnx_path))
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is only a hint for which names to list
        inferred = model
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in (*g.value_info, *g.output, *g.input):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    out: list[dict[str, Any]] = []
    for node in model.graph.node:
        is_itae = node.name.startswith(ITAE_PREFIX)
        if not (is_itae or node.op_type in FP32_ONNX_OPS):
            continue
        outs = [o for o in node.output if o]
        known = [types.get(o) for o in outs]
        if node.op_type in ("LayerNormalization", "Softmax"):
            float_outputs: bool | None = True
        elif known and all(t is not None and t != 0 for t in known):
            float_outputs = all(t in _FLOAT_ONNX_TYPES for t in known)
        else:
            float_outputs = None
        out.append({"name": node.name, "op": node.op_type, "float_outputs": float_outputs, "n_outputs": len(outs)})
    return out


# --------------------------------------------------------------------------------------------
# (c) trtexec command and build script
# --------------------------------------------------------------------------------------------
def _shape_spec(name: str, shape: Sequence[int]) -> str:
    return f"{name}:{'x'.join(str(int(s)) for s in shape)}"


def trtexec_layer_specs(nodes: Iterable[dict[str, Any]]) -> tuple[list[str], list[str], list[str]]:
    """(layerPrecisions entries, layerOutputTypes entries, names skipped) for the fp32 islands.

    trtexec applies an exact layer name unconditionally, so only nodes known to produce float
    tensors are listed by name; "itae/*" (one wildcard, TensorRT 10.x) covers the rest of the pass's
    layers, and trtexec skips the int/bool ones a wildcard matches. Names the spec grammar cannot
    carry (',' ':' whitespace quotes) are skipped and reported.
    """
    precisions: list[str] = []
    output_types: list[str] = []
    skipped: list[str] = []
    has_itae = False
    for n in nodes:
        name = n["name"]
        has_itae = has_itae or name.startswith(ITAE_PREFIX)
        if not name or n["float_outputs"] is not True:
            continue
        if _SPEC_UNSAFE.search(name):
            skipped.append(name)
            continue
        precisions.append(f"{name}:fp32")
        if n.get("n_outputs", 1) == 1:
            output_types.append(f"{name}:fp32")
    if has_itae:
        precisions.append(f"{ITAE_PREFIX}*:fp32")
    return precisions, output_types, skipped


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    spec: InputSpec,
    options: EngineOptions,
    precision: str,
    fp32_nodes: Sequence[dict[str, Any]] = (),
    *,
    trtexec: str = "trtexec",
    skip_inference: bool = True,
) -> list[str]:
    """The trtexec argv equivalent to build_engine() with these options (TensorRT 10.x flags)."""
    shapes = profile_shapes(spec, options)
    cmd = [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--minShapes={_shape_spec(spec.name, shapes['min'])}",
        f"--optShapes={_shape_spec(spec.name, shapes['opt'])}",
        f"--maxShapes={_shape_spec(spec.name, shapes['max'])}",
        f"--memPoolSize=workspace:{int(options.workspace_mib)}M",
    ]
    if options.strongly_typed:
        cmd.append("--stronglyTyped")
    if precision == "fp16":
        cmd.append("--fp16")
    elif precision == "bf16":
        cmd.append("--bf16")
    elif precision == "fp32" and not options.allow_tf32:
        cmd.append("--noTF32")
    if precision in ("fp16", "bf16") and options.precision_constraints and not options.strongly_typed:
        precs, outs, _ = trtexec_layer_specs(fp32_nodes)
        if precs:
            cmd.append("--precisionConstraints=obey")
            cmd.append("--layerPrecisions=" + ",".join(precs))
            if outs:
                cmd.append("--layerOutputTypes=" + ",".join(outs))
    if options.timing_cache is not None:
        cmd.append(f"--timingCacheFile={options.timing_cache}")
    if skip_inference:
        cmd.append("--skipInference")
    return cmd


def _rel(path: Path, start: Path) -> str:
    try:
        return os.path.relpath(Path(path).resolve(), start.resolve())
    except ValueError:  # other drive (Windows)
        return str(Path(path).resolve())


def build_script_text(
    onnx_path: Path,
    engine_path: Path,
    spec: InputSpec,
    options: EngineOptions,
    precision: str,
    fp32_nodes: Sequence[dict[str, Any]],
    model: str | None = None,
) -> str:
    """A bash script that builds the engine with trtexec; paths are relative to the script's folder."""
    here = onnx_path.parent
    rel_opts = options
    if options.timing_cache is not None:
        rel_opts = EngineOptions(**{**asdict(options), "timing_cache": Path(_rel(options.timing_cache, here))})
    cmd = trtexec_command(
        _rel(onnx_path, here), _rel(engine_path, here), spec, rel_opts, precision, fp32_nodes, trtexec="$TRTEXEC"
    )
    _, _, skipped = trtexec_layer_specs(fp32_nodes)
    shapes = profile_shapes(spec, options)
    lines = [
        "#!/usr/bin/env bash",
        f"# Build the TensorRT engine {engine_path.name} from {onnx_path.name} with trtexec.",
        f"# Written by itae-export on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        + (f" for model {model}" if model else "") + ".",
        "# Needs an NVIDIA GPU and TensorRT 10.x trtexec (an NGC container nvcr.io/nvidia/tensorrt:<yy.mm>-py3",
        '# has it at /usr/src/tensorrt/bin/trtexec; or pip install -e ".[trt]" and set TRTEXEC=...).',
        "# Engines are specific to the GPU model and TensorRT version they were built with.",
        f"# Input {spec.name}: profile min/opt/max = {_shape_text(shapes['min'])} / {_shape_text(shapes['opt'])} / "
        f"{_shape_text(shapes['max'])} (BxCxHxW); workspace {options.workspace_mib} MiB.",
    ]
    if precision in ("fp16", "bf16"):
        lines += [
            f"# Precision {precision}; LayerNorm, Softmax, reductions and the ITAE nodes (itae/*) are pinned to fp32",
            "# with --precisionConstraints=obey, because the ITAE norm test and softmax/LayerNorm sums need fp32 range.",
            "# TensorRT 11 removed --fp16/--bf16/--precisionConstraints (strong typing only): there convert the ONNX",
            "# with ModelOpt AutoCast and build it with --stronglyTyped, or build an fp32 engine.",
        ]
        if skipped:
            lines.append(f"# Layer names not expressible in trtexec's spec (left to TensorRT): {', '.join(skipped)}")
    elif precision == "fp32":
        lines.append("# Precision fp32 without TF32 (--noTF32) so the engine matches PyTorch closely." if not options.allow_tf32
                     else "# Precision fp32 with TF32 matmuls allowed.")
    lines += [
        "# Drop --skipInference to also time the engine.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-trtexec}"',
        'if ! command -v "$TRTEXEC" >/dev/null 2>&1; then',
        '  echo "trtexec not found: install TensorRT (or run inside an NGC TensorRT container), or set TRTEXEC=/path/to/trtexec" >&2',
        "  exit 4",
        "fi",
    ]
    if precision in ("fp16", "bf16"):
        flag = f"--{precision}"
        lines += [
            'help_text="$("$TRTEXEC" --help 2>&1 || true)"',
            f'case "$help_text" in *"{flag} "*) ;; *)',
            f'  echo "this trtexec has no {flag} (TensorRT 11+ builds strongly typed networks only): build fp32, or convert '
            'the ONNX with ModelOpt AutoCast and use --stronglyTyped" >&2',
            "  exit 4 ;;",
            "esac",
        ]
    # trtexec does not create folders for the engine or the timing cache.
    dirs = sorted({os.path.dirname(_rel(engine_path, here))}
                  | ({os.path.dirname(_rel(options.timing_cache, here))} if options.timing_cache else set()))
    dirs = [d for d in dirs if d and d != "."]
    if dirs:
        lines.append("mkdir -p " + " ".join(shlex.quote(d) for d in dirs))
    quoted = [c if c == "$TRTEXEC" else shlex.quote(c) for c in cmd]
    lines.append('"$TRTEXEC" \\')
    for i, arg in enumerate(quoted[1:]):
        lines.append(f"  {arg}" + (" \\" if i < len(quoted) - 2 else ""))
    lines.append(f'echo "engine written: $(pwd)/{_rel(engine_path, here)}"')
    return "\n".join(lines) + "\n"


def script_precision(options: EngineOptions) -> str:
    """The precision the build script uses: the requested one, else fp16 unless this machine's GPU
    and TensorRT tell otherwise (the script is meant for a GPU machine)."""
    if options.strongly_typed:
        return "fp32"
    if options.precision is not None:
        return options.precision
    gpu = gpu_info()
    if gpu is None:
        return "fp16"
    trt, _ = import_tensorrt()
    return resolve_precision(options, trt, gpu)[0]


def stage_build_script(staged_onnx: Path, final_onnx: Path, final_engine: Path, options: EngineOptions,
                       script: Path) -> Path:
    """Write the trtexec build script for `final_onnx` -> `final_engine` at `script` (a staged path;
    the script refers to the final paths, relative to the ONNX's folder). The layers pinned to fp32
    are read from the staged ONNX."""
    spec = read_input_spec(staged_onnx)
    profile_shapes(spec, options)  # validates the profile against a fixed-batch ONNX
    precision = script_precision(options)
    fp32_nodes = fp32_onnx_nodes(staged_onnx) if precision in ("fp16", "bf16") else []
    text = build_script_text(final_onnx, final_engine, spec, options, precision, fp32_nodes)
    script.write_text(text)
    script.chmod(0o755)
    return script


# --------------------------------------------------------------------------------------------
# environment: TensorRT, trtexec, GPU
# --------------------------------------------------------------------------------------------
def import_tensorrt() -> tuple[Any | None, str | None]:
    """(tensorrt module, None) or (None, why it cannot be imported)."""
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as e:
        return None, str(e) or "not installed"
    except OSError as e:  # broken install: shared libraries missing
        return None, str(e)
    if not hasattr(trt, "Builder"):  # e.g. only tensorrt-stubs installed: a namespace package of .pyi files
        return None, "the installed tensorrt package has no Builder (only type stubs?)"
    return trt, None


def tensorrt_version(trt: Any) -> str:
    return str(getattr(trt, "__version__", "unknown"))


def _trt_major(trt: Any) -> int:
    m = re.match(r"(\d+)", tensorrt_version(trt))
    return int(m.group(1)) if m else 0


def supports_weak_typing(trt: Any) -> bool:
    """TensorRT 10.x: builder precision flags exist. 11.x removed them (strong typing only)."""
    return hasattr(trt.BuilderFlag, "FP16") and hasattr(trt.BuilderFlag, "OBEY_PRECISION_CONSTRAINTS")


def find_trtexec() -> str | None:
    env = os.environ.get("TRTEXEC")
    if env and Path(env).is_file() and os.access(env, os.X_OK):
        return env
    found = shutil.which("trtexec")
    if found:
        return found
    default = Path("/usr/src/tensorrt/bin/trtexec")  # NGC TensorRT containers
    return str(default) if default.is_file() and os.access(default, os.X_OK) else None


def gpu_info() -> dict[str, str] | None:
    """{'name', 'compute_capability'} of GPU 0, or None when no NVIDIA GPU is visible.

    nvidia-smi first (no CUDA context), then torch.cuda if torch is importable.
    """
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30, check=False,
            )
            if r.returncode == 0 and r.stdout.strip():
                name, _, cc = r.stdout.strip().splitlines()[0].rpartition(",")
                if name.strip():
                    return {"name": name.strip(), "compute_capability": cc.strip()}
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return {"name": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - a broken torch/CUDA install means "no usable GPU" here
        pass
    return None


def _cc_tuple(gpu: dict[str, str] | None) -> tuple[int, int] | None:
    if not gpu:
        return None
    m = re.match(r"(\d+)\.(\d+)", gpu.get("compute_capability", ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def resolve_precision(
    options: EngineOptions, trt: Any | None, gpu: dict[str, str] | None, *, fast_fp16: bool | None = None
) -> tuple[str, str]:
    """(precision, why). Default: fp16 where the GPU (compute capability >= 6.0, or the builder's
    platform_has_fast_fp16 where that still exists) and TensorRT (weak typing: 10.x) support it,
    else fp32; fp32 with --strongly-typed (the ONNX types decide)."""
    cc = _cc_tuple(gpu)
    weak = trt is None or supports_weak_typing(trt)  # trtexec path: the script checks its own flags
    if options.strongly_typed:
        return "fp32", "strongly typed: precision from the ONNX tensor types"
    if options.precision is not None:
        if options.precision != "fp32" and not weak:
            raise EngineError(
                f"TensorRT {tensorrt_version(trt)} builds strongly typed networks only (no --precision {options.precision} "
                "builder flag since 11.x); build with --precision fp32, or convert the ONNX to mixed precision with "
                "ModelOpt AutoCast (python -m modelopt.onnx.autocast --onnx_path model.onnx) and build that with "
                "--strongly-typed"
            )
        if options.precision == "bf16" and cc is not None and cc < (8, 0):
            raise EngineError(
                f"--precision bf16 needs a GPU of compute capability >= 8.0 (Ampere or newer); "
                f"{gpu['name'] if gpu else 'this GPU'} is {cc[0]}.{cc[1]}: use --precision fp16 or fp32"
            )
        return options.precision, "requested"
    if not weak:
        return "fp32", f"TensorRT {tensorrt_version(trt)} has no weak typing; fp32 by default"
    ok = (cc is None or cc >= (6, 0)) and fast_fp16 is not False
    return ("fp16", "default: GPU supports fast fp16") if ok else ("fp32", "default: GPU lacks fast fp16")


def _builder_fast_fp16(builder: tensorrt.Builder) -> bool | None:
    # platform_has_fast_fp16 is deprecated in 10.x and gone in 11.x; ask only where it exists.
    try:
        return bool(builder.platform_has_fast_fp16) if hasattr(builder, "platform_has_fast_fp16") else None
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------
# (d) building with the TensorRT Python API
# --------------------------------------------------------------------------------------------
@dataclass
class EngineBuildResult:
    engine_path: Path
    precision: str
    builder: str  # "tensorrt-python" | "trtexec"
    tensorrt_version: str
    input_name: str
    profile: dict[str, list[int]]
    strongly_typed: bool
    tf32: bool
    fp32_layers: list[str] = field(default_factory=list)
    timing_cache: str | None = None
    timing_cache_reused: bool = False
    build_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["engine_path"] = str(self.engine_path)
        return d


def _make_logger(trt: Any, sink: list[str]) -> Any:
    base = getattr(trt, "ILogger", None)
    if base is None:
        return trt.Logger(trt.Logger.WARNING)

    class _Logger(base):  # type: ignore[misc, valid-type]
        """Forward warnings/errors to stderr and keep them for error messages."""

        def __init__(self) -> None:
            super().__init__()

        def log(self, severity: Any, msg: str) -> None:
            sev = getattr(trt.ILogger, "Severity", trt.ILogger)
            if severity in (getattr(sev, "INTERNAL_ERROR", None), getattr(sev, "ERROR", None)):
                sink.append(f"[E] {msg}")
                print(f"TensorRT error: {msg}", file=sys.stderr)
            elif severity == getattr(sev, "WARNING", None):
                sink.append(f"[W] {msg}")

    return _Logger()


def _format_parser_error(err: Any) -> str:
    def call(name: str) -> Any:
        fn = getattr(err, name, None)
        try:
            return fn() if callable(fn) else fn
        except Exception:  # noqa: BLE001
            return None

    node, name, op, desc = call("node"), call("node_name"), call("node_operator"), call("desc")
    where = f"node {node}" if node is not None and node != -1 else "graph"
    if name:
        where += f" {name!r}"
    if op:
        where += f" (op {op})"
    return f"{where}: {desc or err}"


def _onnx_name_of(layer: Any) -> str:
    """The ONNX node a TensorRT layer came from: metadata '[ONNX Layer: X]' (10.x), else its name."""
    meta = getattr(layer, "metadata", None) or ""
    m = re.search(r"\[ONNX Layer: ([^\]]+)\]", str(meta))
    return m.group(1) if m else str(getattr(layer, "name", ""))


def apply_fp32_constraints(trt: Any, network: tensorrt.INetworkDefinition, fp32_node_names: Iterable[str] = ()) -> list[str]:
    """Pin LayerNorm (NORMALIZATION), SOFTMAX, REDUCE layers and the layers of ONNX nodes named
    'itae/...' (or listed) to float32: layer.precision and set_output_type on every float output.
    Layers with non-float outputs (shapes, indices, masks) and constants are left alone."""
    names = set(fp32_node_names)
    float_types = {trt.float32, trt.float16}
    if hasattr(trt, "bfloat16"):
        float_types.add(trt.bfloat16)
    lt = trt.LayerType
    kinds = {getattr(lt, k) for k in ("NORMALIZATION", "SOFTMAX", "REDUCE") if hasattr(lt, k)}
    skip_kinds = {getattr(lt, k) for k in ("CONSTANT", "SHAPE", "ASSERTION") if hasattr(lt, k)}
    pinned: list[str] = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        src = _onnx_name_of(layer)
        wanted = layer.type in kinds or src.startswith(ITAE_PREFIX) or src in names
        if not wanted or layer.type in skip_kinds:
            continue
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not outs or any(o is None or o.dtype not in float_types for o in outs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned.append(layer.name)
    return pinned


def _load_timing_cache(trt: Any, config: tensorrt.IBuilderConfig, path: Path | None, warnings: list[str]) -> bool:
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    ok = config.set_timing_cache(cache, False)
    if ok is False and data:
        warnings.append(f"timing cache {path} was made on another GPU/TensorRT; starting a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
        return False
    return bool(data)


def _save_timing_cache(path: Path, data: bytes, warnings: list[str]) -> None:
    """Replace the timing cache through an output transaction (mode 0o644, never wider than the cache
    it replaces). Another build writing the same cache at the same moment wins; this one says so."""
    from .errors import OutputBusyError

    try:
        with OutputTransaction(path, force=True, flag="--timing-cache") as tx:
            staged = tx.stage_path()
            staged.write_bytes(data)
            tx.add(staged, source=path if path.is_file() else None)
            tx.commit()
    except OutputBusyError:
        warnings.append(f"timing cache {path} was being written by another build; left as that build writes it")


def _parse_network(trt: Any, builder: tensorrt.Builder, logger: tensorrt.ILogger, onnx_path: Path,
                   options: EngineOptions) -> tuple[tensorrt.INetworkDefinition, tensorrt.OnnxParser]:
    flags = 0
    if options.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so external weight files next to the ONNX are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = [_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineError(
            f"TensorRT {tensorrt_version(trt)} could not parse {onnx_path} ({len(errors)} error(s)): "
            + "; ".join(errors)
            + ". Check that its external data files sit next to it and that every op is supported by this TensorRT."
        )
    return network, parser  # the parser owns the weights the network refers to: keep it alive


def _make_config(trt: Any, builder: tensorrt.Builder, network: tensorrt.INetworkDefinition, options: EngineOptions,
                 precision: str, fp32_nodes: list[dict[str, Any]], spec: InputSpec,
                 shapes: dict[str, tuple[int, int, int, int]]) -> tuple[tensorrt.IBuilderConfig, bool, list[str]]:
    """Builder config: workspace, precision flags (TF32 off for exact fp32), fp32 pins, the profile."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mib) << 20)
    tf32 = True
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    if precision == "fp32" and not options.allow_tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
        tf32 = False
    pinned: list[str] = []
    if precision in ("fp16", "bf16") and options.precision_constraints and not options.strongly_typed:
        pinned = apply_fp32_constraints(trt, network, [n["name"] for n in fp32_nodes])
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    profile = builder.create_optimization_profile()
    # pybind11 converts tuples to trt.Dims (TensorRT's own samples pass tuples); the stubs say Dims
    profile.set_shape(spec.name, shapes["min"], shapes["opt"], shapes["max"])  # type: ignore[arg-type]
    config.add_optimization_profile(profile)
    return config, tf32, pinned


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    options: EngineOptions,
    meta: dict[str, Any] | None = None,
    *,
    gpu: dict[str, str] | None = None,
) -> EngineBuildResult:
    """Build a serialized engine with TensorRT's Python API (10.x / 11.x) and write it to `engine_path`.

    The caller stages: build_engine_artifact passes a path inside its output transaction's staging
    folder (committed with the sidecar); nothing is written at `engine_path` when the build fails. The
    timing cache (a user file read and updated across builds) is replaced through its own transaction."""
    del meta  # the build itself does not depend on the model description
    trt, why = import_tensorrt()
    if trt is None:
        raise EngineError(f"the tensorrt Python package cannot be imported ({why}); {INSTALL_HINT}")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    spec = read_input_spec(onnx_path)
    shapes = profile_shapes(spec, options)
    log: list[str] = []
    warnings: list[str] = []
    t0 = time.perf_counter()
    logger = _make_logger(trt, log)
    builder = trt.Builder(logger)
    if builder is None:
        raise EngineError("TensorRT could not create a builder (no usable CUDA device?); check nvidia-smi and the driver")
    precision, _ = resolve_precision(options, trt, gpu, fast_fp16=_builder_fast_fp16(builder))
    fp32_nodes = fp32_onnx_nodes(onnx_path) if precision in ("fp16", "bf16") else []
    network, _parser = _parse_network(trt, builder, logger, onnx_path, options)
    config, tf32, pinned = _make_config(trt, builder, network, options, precision, fp32_nodes, spec, shapes)
    reused = _load_timing_cache(trt, config, options.timing_cache, warnings)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = [m for m in log if m.startswith("[E]")][-5:]
        raise EngineError(
            f"TensorRT failed to build an engine from {onnx_path} ({precision}, batch "
            f"{options.min_batch}..{options.max_batch})"
            + (": " + " | ".join(errs) if errs else "")
            + "; try a larger --workspace, a smaller --max-batch, or --precision fp32"
        )
    with open(engine_path, "wb") as f:
        f.write(serialized)
    if options.timing_cache is not None:
        cache = config.get_timing_cache()
        if cache is not None:
            _save_timing_cache(options.timing_cache, bytes(cache.serialize()), warnings)
    return EngineBuildResult(
        engine_path=engine_path, precision=precision, builder="tensorrt-python",
        tensorrt_version=tensorrt_version(trt), input_name=spec.name,
        profile={k: list(v) for k, v in shapes.items()}, strongly_typed=options.strongly_typed, tf32=tf32,
        fp32_layers=pinned, timing_cache=str(options.timing_cache) if options.timing_cache else None,
        timing_cache_reused=reused, build_seconds=round(time.perf_counter() - t0, 3),
        warnings=warnings + [m for m in log if m.startswith("[W]")][-10:],
    )


def _trtexec_version(output: str) -> str:
    m = re.search(r"TensorRT v(\d+)", output)
    if not m:
        return "unknown"
    n = int(m.group(1))
    return f"{n // 10000}.{(n // 100) % 100}.{n % 100}"


def build_engine_trtexec(
    onnx_path: str | Path,
    engine_path: str | Path,
    options: EngineOptions,
    *,
    trtexec: str,
    gpu: dict[str, str] | None = None,
) -> EngineBuildResult:
    """Build with trtexec (same settings as the script), writing the engine to `engine_path` (the
    caller stages: build_engine_artifact passes a path inside its transaction's staging folder; a failed
    build removes what trtexec left there). trtexec reads and updates the timing cache itself."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    spec = read_input_spec(onnx_path)
    shapes = profile_shapes(spec, options)
    precision, _ = resolve_precision(options, None, gpu)
    fp32_nodes = fp32_onnx_nodes(onnx_path) if precision in ("fp16", "bf16") else []
    reused = bool(options.timing_cache and Path(options.timing_cache).is_file())
    t0 = time.perf_counter()
    cmd = trtexec_command(onnx_path, engine_path, spec, options, precision, fp32_nodes, trtexec=trtexec)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise EngineError(f"cannot run {trtexec} ({e}); check the TensorRT install or set TRTEXEC") from e
    out = (r.stdout or "") + (r.stderr or "")
    if r.returncode != 0 or not engine_path.is_file() or engine_path.stat().st_size == 0:
        engine_path.unlink(missing_ok=True)  # never leave a partial engine behind
        errs = [ln.strip() for ln in out.splitlines() if "[E]" in ln or "Error" in ln][-6:]
        raise EngineError(
            f"trtexec failed to build {engine_path.name} (exit {r.returncode})"
            + (": " + " | ".join(errs) if errs else "")
            + f"; command: {shlex.join(cmd)}"
        )
    pinned = trtexec_layer_specs(fp32_nodes)[0] if precision in ("fp16", "bf16") and options.precision_constraints else []
    return EngineBuildResult(
        engine_path=engine_path,
        precision=precision,
        builder="trtexec",
        tensorrt_version=_trtexec_version(out),
        input_name=spec.name,
        profile={k: list(v) for k, v in shapes.items()},
        strongly_typed=options.strongly_typed,
        tf32=not (precision == "fp32" and not options.allow_tf32),
        fp32_layers=[p.rsplit(":", 1)[0] for p in pinned],
        timing_cache=str(options.timing_cache) if options.timing_cache else None,
        timing_cache_reused=reused,
        build_seconds=round(time.perf_counter() - t0, 3),
    )


def run_engine_trtexec(trtexec: str, engine_path: Path, spec: InputSpec, x: np.ndarray) -> np.ndarray:
    """Run an engine on x with trtexec (--loadInputs / --exportOutput); for hosts without the
    tensorrt Python package. One batch per call."""
    # keep the input's dtype: uint8 for graphs built with --input-format uint8-nhwc
    x = np.ascontiguousarray(x if x.dtype == np.uint8 else x.astype(np.float32))
    with tempfile.TemporaryDirectory(prefix="itae-trtexec-") as d:
        inp, outp = Path(d) / "input.bin", Path(d) / "output.json"
        x.tofile(inp)
        cmd = [
            trtexec, f"--loadEngine={engine_path}", f"--shapes={_shape_spec(spec.name, x.shape)}",
            f"--loadInputs={spec.name}:{inp}", f"--exportOutput={outp}",
            "--iterations=1", "--warmUp=0", "--duration=0", "--avgRuns=1",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0 or not outp.is_file():
            raise EngineError(f"trtexec could not run {engine_path} (exit {r.returncode}); command: {shlex.join(cmd)}")
        data = json.loads(outp.read_text())
    entries = data if isinstance(data, list) else data.get("outputs", [])
    wanted = [e for e in entries if not spec.output_names or e.get("name") in spec.output_names] or entries
    if not wanted:
        raise EngineError(f"trtexec wrote no outputs for {engine_path}")
    e = wanted[0]
    dims = [int(v) for v in str(e.get("dimensions", "")).split("x") if v]
    return np.asarray(e["values"], dtype=np.float32).reshape(dims or (x.shape[0], -1))


# --------------------------------------------------------------------------------------------
# parity and sidecar
# --------------------------------------------------------------------------------------------
def parity_ok(figures: dict[str, float], precision: str) -> bool:
    tol = PARITY_TOLERANCES[precision]
    ok = math.isfinite(figures.get("cos_min", float("nan"))) and figures["cos_min"] >= float(tol["cos_min"] or 0)
    if tol.get("max_abs") is not None:
        max_abs = tol["max_abs"]
        ok = ok and max_abs is not None and figures.get("max_abs", float("inf")) <= float(max_abs)
    return bool(ok)


def _external_data_files(onnx_path: Path) -> list[Path]:
    return [onnx_path.parent / n for n in external_locations(_load_onnx_header(onnx_path))]


def write_sidecar(engine_path: str | Path, data: dict[str, Any]) -> Path:
    """Write `<engine_path>.json` (sorted keys, numpy scalars and Paths converted; arrays left out).

    The caller stages: build_engine_artifact passes the engine's staged path, so the sidecar is staged
    beside it and committed with it in one output transaction."""
    path = Path(str(engine_path) + ".json")
    path.write_text(json.dumps(jsonable(data), indent=2, sort_keys=True, allow_nan=True) + "\n")
    return path


def sidecar_data(
    result: EngineBuildResult,
    onnx_path: Path,
    options: EngineOptions,
    meta: dict[str, Any],
    gpu: dict[str, str] | None,
    parity: dict[str, Any] | None,
    *,
    engine_name: str | None = None,
    engine_dir: Path | None = None,
) -> dict[str, Any]:
    """The sidecar record; engine_name/engine_dir: where the engine will live once committed (the
    file itself may still be staged)."""
    engine_path = result.engine_path
    engine_dir = engine_dir or engine_path.parent
    external = {p.name: sha256_file(p) for p in _external_data_files(onnx_path) if p.is_file()}
    skip = {"reference_inputs", "reference_outputs"}
    export_meta = {k: v for k, v in meta.items() if k not in skip and not isinstance(v, np.ndarray)}
    itae = meta.get("itae")
    if itae is None and meta.get("itae_settings") is not None:
        itae = meta["itae_settings"]
    return {
        "format": "itae-export.engine.v1",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": {"file": engine_name or engine_path.name, "bytes": engine_path.stat().st_size, "sha256": sha256_file(engine_path)},
        "model": meta.get("model") or meta.get("model_name"),
        "img_size": meta.get("img_size"),
        "num_prefix_tokens": meta.get("num_prefix_tokens"),
        "itae": itae,
        "precision": result.precision,
        "precision_requested": options.precision or "auto",
        "strongly_typed": result.strongly_typed,
        "tf32": result.tf32,
        "fp32_layers": {"count": len(result.fp32_layers), "names": result.fp32_layers,
                        "rule": "NORMALIZATION, SOFTMAX, REDUCE layers and ONNX nodes named itae/*"},
        "batch_profile": {"input": result.input_name, **result.profile},
        "workspace_mib": options.workspace_mib,
        "timing_cache": {"path": result.timing_cache, "reused": result.timing_cache_reused},
        "builder": result.builder,
        "build_seconds": result.build_seconds,
        "tensorrt_version": result.tensorrt_version,
        "gpu": gpu,
        "onnx": {"file": _rel(onnx_path, engine_dir), "sha256": sha256_file(onnx_path),
                 "external_data_sha256": external},
        "build_script": SCRIPT_NAME,
        "parity": parity,
        "export": export_meta,
        "warnings": result.warnings,
    }


# --------------------------------------------------------------------------------------------
# (f) CLI hook
# --------------------------------------------------------------------------------------------
def _missing_message(engine_path: Path, script: Path, trt_why: str | None, have_trtexec: bool,
                     gpu: dict[str, str] | None) -> str:
    missing = []
    if trt_why is not None and not have_trtexec:
        missing.append("TensorRT (the tensorrt Python package does not import and trtexec is not on PATH)")
    if gpu is None:
        missing.append("NVIDIA GPU (nvidia-smi and torch.cuda find none)")
    return (
        f"cannot build {engine_path.name}: this machine has no {' and no '.join(missing)}; "
        f"{INSTALL_HINT}, then run {script} (the ONNX next to it is already written)"
    )


def _make_engine_runner(engine_path: Path, spec: InputSpec, builder: str, trtexec: str | None) -> tuple[Any, str]:
    trt, _ = import_tensorrt()
    if trt is not None:
        from .trt_runner import TrtRunner

        return TrtRunner(engine_path).run, "tensorrt-python"
    if trtexec is not None:
        return (lambda x: run_engine_trtexec(trtexec, engine_path, spec, x)), "trtexec"
    raise EngineError(f"no TensorRT runtime to run {engine_path} for the parity check; {INSTALL_HINT}")


def _engine_parity(engine_path: Path, spec: InputSpec, result: EngineBuildResult, options: EngineOptions,
                   trtexec: str | None, run: RunInfo) -> dict[str, Any]:
    if run.reference_inputs is None or run.reference_outputs is None:
        return {"ok": None, "reason": "no reference batch was passed to the engine builder"}
    runner, runner_name = _make_engine_runner(engine_path, spec, result.builder, trtexec)
    ref_in = np.asarray(run.reference_inputs)
    x = ref_in if ref_in.dtype == np.uint8 else ref_in.astype(np.float32)
    figures = compare(np.asarray(run.reference_outputs), run_batched(runner, x, options.max_batch)).to_dict()
    ok = parity_ok(figures, result.precision)
    by_size = {}
    for size, (xs, ys) in run.reference_by_size.items():  # a dynamic-size engine: every validated size
        by_size[size] = compare(np.asarray(ys), run_batched(runner, np.asarray(xs, np.float32), options.max_batch)).to_dict()
        ok = ok and parity_ok(by_size[size], result.precision)
    return {**figures, "runner": runner_name, "batch": int(len(ref_in)), "reference": "pytorch",
            "tolerance": PARITY_TOLERANCES[result.precision], "ok": ok, **({"by_size": by_size} if by_size else {})}


def _find_builders(options: EngineOptions) -> tuple[Any, str | None, str | None]:
    """(tensorrt module or None, why not, trtexec path or None) as --engine-builder allows."""
    trt, trt_why = import_tensorrt()
    trtexec = find_trtexec()
    if options.builder == "python" and trt is None:
        trtexec = None  # python requested: trtexec does not count
    if options.builder == "trtexec":
        trt, trt_why = None, trt_why or "not requested (--engine-builder trtexec)"
    return trt, trt_why, trtexec


def build_engine_artifact(onnx_path: str | Path, engine_out: str | Path, options: EngineOptions, run: RunInfo,
                          txn: OutputTransaction) -> dict[str, Any]:
    """Build `engine_out` from the committed `onnx_path` inside the output transaction `txn`, check it
    against the PyTorch reference in `run`, and commit the engine with its JSON sidecar.

    Raises EngineError (no TensorRT / no GPU / build failure; exit 4; nothing of the engine is
    written) or ParityError (exit 3; engine and sidecar are kept for inspection).
    """
    onnx_path, engine_out = Path(onnx_path), Path(engine_out)
    spec = read_input_spec(onnx_path)
    profile_shapes(spec, options)
    trt, trt_why, trtexec = _find_builders(options)
    gpu = gpu_info()
    script = onnx_path.parent / SCRIPT_NAME
    if gpu is None or (trt is None and trtexec is None):
        raise EngineError(_missing_message(engine_out, script, trt_why if trt is None else None,
                                           trtexec is not None, gpu))
    staged = txn.stage_path(engine_out)
    meta = run.to_dict()
    if trt is not None:
        result = build_engine(onnx_path, staged, options, meta, gpu=gpu)
    else:
        assert trtexec is not None
        result = build_engine_trtexec(onnx_path, staged, options, trtexec=trtexec, gpu=gpu)
    parity = _engine_parity(staged, spec, result, options, trtexec, run)
    sidecar = write_sidecar(staged, sidecar_data(result, onnx_path, options, meta, gpu, parity,
                                                 engine_name=engine_out.name, engine_dir=engine_out.parent))
    txn.add(staged, engine_out)
    txn.add(sidecar, Path(str(engine_out) + ".json"))
    txn.commit()
    summary = {"engine": str(engine_out), "sidecar": str(engine_out) + ".json", "build_script": str(script),
               "precision": result.precision, "builder": result.builder,
               "tensorrt_version": result.tensorrt_version, "gpu": gpu, "batch_profile": result.profile,
               "fp32_layers": len(result.fp32_layers), "parity": parity}
    if parity.get("ok") is False:
        tol = PARITY_TOLERANCES[result.precision]
        raise ParityError(
            f"the {result.precision} engine {engine_out} disagrees with PyTorch (cos_min {parity['cos_min']:.6f}, "
            f"max_abs {parity['max_abs']:.3g}; needs cos_min >= {tol['cos_min']}"
            + (f", max_abs <= {tol['max_abs']}" if tol.get("max_abs") is not None else "")
            + f"); figures are in {engine_out}.json; try --precision fp32 or keep the precision constraints on"
        )
    return summary
