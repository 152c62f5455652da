"""The deployment flags: graph options (--input-format, --l2-normalize) and Triton (--triton-repo ...)
-> graph_options.GraphOptions and triton.TritonOptions; plus `itae-triton` (deploy an existing model)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..graph_options import INPUT_FORMATS, GraphOptions
from ..triton import DEFAULT_MAX_BATCH, INSTANCE_KINDS, PLATFORMS, TritonOptions
from .common import make_parser, run_command


def add_graph_option_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("deployment graph options")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default=None,
                   help="uint8-nhwc: the graph takes raw uint8 [B,H,W,3] RGB pixels and normalises them itself "
                   "(default: float32-nchw, ImageNet-normalised [B,3,H,W])")
    g.add_argument("--l2-normalize", action="store_true",
                   help="add x / max(||x||, eps) on the embedding (unit vectors for cosine search)")


def add_triton_args(parser: argparse.ArgumentParser, *, with_max_batch: bool = False) -> None:
    g = parser.add_argument_group("Triton deployment")
    g.add_argument("--triton-repo", metavar="DIR", default=None,
                   help="add the result as a new version of a Triton model repository DIR/NAME (config.pbtxt "
                   "written if absent, kept if compatible; existing versions are never changed)")
    g.add_argument("--model-name", metavar="NAME", default=None,
                   help="Triton model name (default: the DINOv2 model name, '_itae' appended when ITAE is on)")
    if with_max_batch:
        g.add_argument("--max-batch", metavar="N", type=int, default=None,
                       help=f"Triton max_batch_size (default: the engine's profile max, else {DEFAULT_MAX_BATCH}; 0: off)")
    g.add_argument("--instance-kind", choices=INSTANCE_KINDS, default=None,
                   help="Triton instance_group kind (default KIND_GPU; KIND_CPU for a --fast-path model)")
    g.add_argument("--instances", metavar="N", type=int, default=1, help="Triton instance_group count")


def graph_options_from_args(args: argparse.Namespace) -> GraphOptions:
    return GraphOptions(args.input_format, bool(args.l2_normalize))


def triton_options_from_args(args: argparse.Namespace) -> TritonOptions | None:
    if not args.triton_repo:
        return None
    return TritonOptions(repo=Path(args.triton_repo), model_name=args.model_name, max_batch=args.max_batch,
                         instance_kind=args.instance_kind, instances=args.instances,
                         platform=getattr(args, "platform", None))


def triton_parser() -> argparse.ArgumentParser:
    p = make_parser("itae-triton", "Add an existing ONNX model or TensorRT engine to a Triton model repository.")
    p.add_argument("model", help="MODEL.onnx (its .data beside it) or MODEL.plan/.engine (JSON sidecar beside it)")
    p.add_argument("--platform", choices=PLATFORMS, default=None, help="default: from the file suffix")
    add_graph_option_args(p)
    add_triton_args(p, with_max_batch=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _deploy(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..triton import deploy

    if not args.triton_repo:
        raise UsageError("--triton-repo DIR is required")
    opts = triton_options_from_args(args)
    assert opts is not None
    res = deploy(Path(args.model), opts, graph_options=graph_options_from_args(args))
    print(json.dumps(res.to_dict(), indent=2) if args.json else res.summary())
    return 0


def triton_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-triton", triton_parser(), _deploy, argv)
