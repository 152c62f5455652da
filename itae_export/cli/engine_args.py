"""The TensorRT flags of itae-export (trtexec's conventions) -> engine.EngineOptions."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engine import (
    BUILDERS,
    DEFAULT_MAX_BATCH,
    DEFAULT_MIN_BATCH,
    DEFAULT_OPT_BATCH,
    DEFAULT_WORKSPACE_MIB,
    PRECISIONS,
    SCRIPT_NAME,
    EngineOptions,
    parse_shape,
)
from ..openvino_target import PRECISIONS as OV_PRECISIONS

_ENGINE_DESTS = ("precision", "min_batch", "opt_batch", "min_shape", "opt_shape", "max_shape", "workspace", "timing_cache", "strongly_typed",
                 "allow_tf32", "no_precision_constraints", "engine_builder")


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "TensorRT engine (--out *.engine)",
        f"Build a TensorRT engine from the exported ONNX and check it against PyTorch. A trtexec script "
        f"({SCRIPT_NAME}) is always written next to the ONNX.")
    g.add_argument("--precision", choices=sorted(set(PRECISIONS) | set(OV_PRECISIONS)), default=None,
                   help="engine precision (default: fp16 where the GPU and TensorRT support it, else fp32); "
                   "LayerNorm, Softmax, reductions and ITAE nodes stay fp32 in fp16/bf16 engines. For an "
                   "OpenVINO --out *.xml: fp32, bf16 (default) or int8")
    g.add_argument("--min-batch", type=int, default=None, help=f"smallest batch of the profile (default {DEFAULT_MIN_BATCH})")
    g.add_argument("--opt-batch", type=int, default=None, help=f"batch TensorRT tunes for (default {DEFAULT_OPT_BATCH})")
    g.add_argument("--max-batch", type=int, default=None,
                   help=f"largest batch of the engine profile (default {DEFAULT_MAX_BATCH}); with --triton-repo also "
                   "Triton's max_batch_size (default: the engine's profile max, else 8; 0: no batching)")
    for key, example in (("min", "1x3x112x112"), ("opt", "8x3x224x224"), ("max", "32x3x518x518")):
        g.add_argument(f"--{key}-shape", default=None, metavar="BxCxHxW",
                       help=f"{key} input shape of the profile, trtexec's convention (e.g. {example}); all three or "
                       "none. Default: the batch flags with the ONNX's H and W (--dynamic-size: its --min-size, "
                       "--img-size and --max-size)")
    g.add_argument("--workspace", type=int, default=None, metavar="MIB",
                   help=f"builder workspace memory pool in MiB (default {DEFAULT_WORKSPACE_MIB})")
    g.add_argument("--timing-cache", type=Path, default=None, metavar="PATH",
                   help="timing cache file, loaded before and saved after the build (reused across builds)")
    g.add_argument("--strongly-typed", action="store_true",
                   help="build a strongly typed network (precision from the ONNX tensor types)")
    g.add_argument("--allow-tf32", action="store_true", help="allow TF32 matmuls in fp32 engines (off: exact fp32)")
    g.add_argument("--no-precision-constraints", action="store_true",
                   help="let TensorRT choose fp16/bf16 for LayerNorm, Softmax and the ITAE nodes too")
    g.add_argument("--engine-builder", choices=BUILDERS, default=None,
                   help="build with TensorRT's Python API, trtexec, or whichever is available (default auto)")


def engine_flags_given(args: argparse.Namespace) -> list[str]:
    """Engine-only flags that were set (--max-batch is shared with Triton and not listed)."""
    return ["--" + d.replace("_", "-") for d in _ENGINE_DESTS if getattr(args, d, None) not in (None, False)]


def engine_options_from_args(args: argparse.Namespace) -> EngineOptions:
    def get(name: str, default):
        value = getattr(args, name, None)
        return default if value is None else value

    return EngineOptions(
        precision=args.precision,
        min_batch=get("min_batch", DEFAULT_MIN_BATCH),
        opt_batch=get("opt_batch", DEFAULT_OPT_BATCH),
        max_batch=get("max_batch", DEFAULT_MAX_BATCH),
        workspace_mib=get("workspace", DEFAULT_WORKSPACE_MIB),
        timing_cache=args.timing_cache,
        strongly_typed=bool(args.strongly_typed),
        allow_tf32=bool(args.allow_tf32),
        precision_constraints=not args.no_precision_constraints,
        builder=get("engine_builder", "auto"),
        **{f"{k}_shape": parse_shape(getattr(args, f"{k}_shape"), f"--{k}-shape")
           for k in ("min", "opt", "max") if getattr(args, f"{k}_shape", None)},
    )
