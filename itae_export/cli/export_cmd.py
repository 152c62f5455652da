"""itae-export: argparse -> ExportRequest -> itae_export.export()."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..dynamic_size import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE, SizeBounds
from ..errors import UsageError
from ..openvino_target import OV_SUFFIX
from ..pipeline import ENGINE_SUFFIXES, FAST_PATHS, INT8_WEIGHTS, ExportRequest
from ..settings import EXPORTERS
from .common import add_itae_args, given_itae_flags, itae_config_from_args, make_parser, run_command
from .engine_args import add_engine_args, engine_flags_given, engine_options_from_args
from .openvino_args import add_openvino_args, openvino_options_from_args
from .triton_args import (
    add_graph_option_args,
    add_triton_args,
    graph_options_from_args,
    triton_options_from_args,
)


def export_parser() -> argparse.ArgumentParser:
    from ..catalogue import CATALOGUE

    p = make_parser("itae-export", "Export a DINOv2 model to ONNX with ITAE in its final attention block, "
                    "validate it against PyTorch, and optionally build a TensorRT engine (--out x.engine), a "
                    "CPU fast path or a Triton model version.")
    p.add_argument("model", choices=list(CATALOGUE), metavar="MODEL", help=f"one of: {', '.join(CATALOGUE)}")
    g = p.add_argument_group("model and output")
    g.add_argument("--out", required=True,
                   help="output .onnx, .engine/.plan to build a TensorRT engine, or .xml for OpenVINO IR (CPU)")
    g.add_argument("--weights", help="local weights: official .pth, timm .safetensors, or a Hugging Face transformers folder (config.json + model.safetensors) (default: search the torch hub and Hugging Face caches)")
    g.add_argument("--random-weights", action="store_true", help="seeded random weights (smoke tests)")
    g.add_argument("--demo-artifacts", action="store_true",
                   help="the synthetic demo model: seeded random weights edited so that a few background tokens "
                   "become high-norm artifacts that ITAE flags (see docs/method.md); implies --random-weights")
    g.add_argument("--seed", type=int, default=0, help="seed for --random-weights and the validation inputs")
    g.add_argument("--img-size", type=int, default=224, help="input size in pixels, a multiple of 14")
    g.add_argument("--dynamic-size", action="store_true",
                   help="one graph for any H x W (multiples of 14 within --min-size/--max-size, square or not), "
                   "the position embedding interpolated in the graph by the official rule; --img-size is then the "
                   "size it is tuned and checked at first (docs/dynamic-size.md)")
    g.add_argument("--min-size", type=int, default=None, metavar="N",
                   help=f"with --dynamic-size: smallest height/width in pixels (default {DEFAULT_MIN_SIZE})")
    g.add_argument("--max-size", type=int, default=None, metavar="N",
                   help=f"with --dynamic-size: largest height/width in pixels (default {DEFAULT_MAX_SIZE})")
    g.add_argument("--force", action="store_true", help="overwrite existing outputs")
    g.add_argument("--depth", type=int, help=argparse.SUPPRESS)  # reduced-depth random models for tests
    g = p.add_argument_group("export and validation")
    g.add_argument("--exporter", choices=EXPORTERS, default="dynamo", help="torch ONNX exporter")
    g.add_argument("--opset", type=int, help="ONNX opset (default 18 for dynamo, 17 for torchscript)")
    g.add_argument("--no-itae", action="store_true", help="export the unmodified baseline")
    g.add_argument("--validate-batch", type=int, default=4, help="random images used for the parity check")
    g.add_argument("--skip-validation", action="store_true", help="do not compare against PyTorch")
    g.add_argument("--no-optimize", action="store_true",
                   help="keep the graph as exported and ITAE-patched: by default k^T becomes one Transpose and the "
                   "final block's projection, MLP and norm run on the CLS row only (the same function, less work; "
                   "docs/performance.md)")
    add_itae_args(p)
    g = p.add_argument_group(
        "fast CPU path (ONNX Runtime)",
        "--fast-path int8: dynamic int8 MatMuls outside the final block (ITAE and the final block stay fp32). "
        "--fast-path fused: exact fp32 with the non-final attention fused into MultiHeadAttention. --out gets "
        "the fast model, <stem>.fp32.onnx the portable fp32 one.")
    g.add_argument("--fast-path", choices=FAST_PATHS, default="none", help="CPU fast path")
    g.add_argument("--int8-weights", choices=INT8_WEIGHTS, default=None,
                   help="with --fast-path int8: one weight scale per output column or per matrix (default per-channel)")
    g.add_argument("--fast-path-eval-images", type=int, default=200, metavar="N",
                   help="sklearn digits images for the accuracy report of the fast path or of an OpenVINO --out *.xml")
    add_engine_args(p)
    add_openvino_args(p)
    add_graph_option_args(p)
    add_triton_args(p)
    return p


def request_from_args(args: argparse.Namespace) -> ExportRequest:
    """Every flag checked and combined before any work starts."""
    if args.no_itae and given_itae_flags(args):
        raise UsageError(f"--no-itae exports the baseline; drop {', '.join(given_itae_flags(args))} or --no-itae")
    if args.int8_weights is not None and args.fast_path != "int8":
        raise UsageError(f"--int8-weights applies to --fast-path int8 only (got --fast-path {args.fast_path})")
    sizes = [f for f, v in (("--min-size", args.min_size), ("--max-size", args.max_size)) if v is not None]
    if sizes and not args.dynamic_size:
        raise UsageError(f"{' and '.join(sizes)} bound a --dynamic-size export; add --dynamic-size or drop them")
    dynamic = None
    if args.dynamic_size:
        dynamic = SizeBounds(args.min_size if args.min_size is not None else DEFAULT_MIN_SIZE,
                             args.max_size if args.max_size is not None else DEFAULT_MAX_SIZE)
    is_engine = Path(args.out).suffix in ENGINE_SUFFIXES
    is_openvino = Path(args.out).suffix == OV_SUFFIX
    engine_flags = [f for f in engine_flags_given(args) if not (is_openvino and f == "--precision")]
    if engine_flags and not is_engine:
        raise UsageError(f"{', '.join(engine_flags)} apply to an .engine/.plan --out only (--precision also to an "
                         f"OpenVINO .xml); drop them or use --out {Path(args.out).with_suffix('.engine').name}")
    return ExportRequest(
        model=args.model, out=Path(args.out), weights=Path(args.weights) if args.weights else None,
        random_weights=args.random_weights or args.demo_artifacts, seed=args.seed, img_size=args.img_size,
        itae=None if args.no_itae else itae_config_from_args(args), exporter=args.exporter, opset=args.opset,
        validate=not args.skip_validation, validate_batch=args.validate_batch, force=args.force,
        fast_path=args.fast_path, int8_weights=args.int8_weights or "per-channel",
        fast_path_eval_images=args.fast_path_eval_images, graph_options=graph_options_from_args(args),
        engine=engine_options_from_args(args) if is_engine else None,
        triton=triton_options_from_args(args), depth=args.depth,
        settings=Path(args.settings) if args.settings else None, demo_artifacts=args.demo_artifacts,
        dynamic_size=dynamic,
        openvino=openvino_options_from_args(args, is_openvino), optimize=not args.no_optimize,
    )


def _export(args: argparse.Namespace) -> int:
    from ..api import require_torch
    from ..pipeline import run_export

    req = request_from_args(args)
    require_torch()
    run_export(req)
    return 0


def export_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-export", export_parser(), _export, argv)
