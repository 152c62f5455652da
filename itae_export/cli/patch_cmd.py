"""itae-patch and itae-inspect: argparse -> itae_export.patch() / itae_export.inspect()."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..patching import CHECKS
from .common import add_itae_args, itae_config_from_args, make_parser, run_command


def patch_parser() -> argparse.ArgumentParser:
    p = make_parser("itae-patch", "Apply ITAE to the final attention block of a DINOv2 ONNX graph exported "
                    "elsewhere. The input is never modified; weights are not loaded.")
    p.add_argument("input", metavar="IN.onnx", help="the ONNX graph to patch (its .data file beside it)")
    p.add_argument("--out", required=True, metavar="OUT.onnx", help="where to write the patched graph")
    p.add_argument("--num-prefix-tokens", type=int, help="CLS + register tokens (default: read from the graph)")
    p.add_argument("--copy-weights", action="store_true",
                   help="copy external weights next to OUT (default: reference them in place when OUT is in the "
                   "same folder)")
    p.add_argument("--check", choices=CHECKS, default="auto",
                   help="run original and patched graphs in ONNX Runtime on random inputs (auto: models under 2 GB)")
    p.add_argument("--seed", type=int, default=0, help="seed of the check's random inputs")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    add_itae_args(p)
    return p


def _patch(args: argparse.Namespace) -> int:
    from ..patching import patch

    patch(Path(args.input), Path(args.out), itae=itae_config_from_args(args), num_prefix_tokens=args.num_prefix_tokens,
          copy_weights=args.copy_weights, check=args.check, seed=args.seed, force=args.force)
    return 0


def patch_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-patch", patch_parser(), _patch, argv)


def inspect_parser() -> argparse.ArgumentParser:
    p = make_parser("itae-inspect", "Dry run: print what the ITAE pass would match and insert, or which block "
                    "already holds ITAE.")
    p.add_argument("input", metavar="IN.onnx", help="the ONNX graph to inspect")
    p.add_argument("--num-prefix-tokens", type=int, help="CLS + register tokens (default: read from the graph)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_itae_args(p)
    return p


def _size_text(rep: dict) -> str:
    """"224", or the dynamic dims and their bounds."""
    if rep.get("img_size"):
        return str(rep["img_size"])
    inp = rep.get("input") or {}
    text = "dynamic"
    if inp:
        text += f" (input {inp['name']} [{', '.join(str(d) for d in inp['dims'])}]"
        d = rep.get("dynamic_size")
        if d:
            text += f"; H and W multiples of {d.get('multiple', 14)} from {d.get('min')} to {d.get('max')}"
        text += ")"
    return text


def format_inspection(path: str, rep: dict) -> list[str]:
    if rep["already_patched"]:
        ap = rep["already_patched"]
        where = ap if isinstance(ap, str) else json.dumps(ap, sort_keys=True)
        return [f"{path}: already patched: {where}", f"  opset {rep['opset']}, image size {_size_text(rep)}"]
    ops = ", ".join(f"{k} x{v}" for k, v in sorted(rep["would_insert"].items()))
    lines = [
        f"{path}: opset {rep['opset']}, {rep['attention_blocks']} attention blocks",
        f"  embedding size: {rep.get('embed_dim', 'unknown')}, heads: {rep.get('num_heads', 'unknown')}, "
        f"image size: {_size_text(rep)}",
        f"  prefix tokens: {rep['num_prefix_tokens']} (registers: {rep.get('registers', 'unknown')})",
        f"  final attention: Softmax {rep['softmax']}, QK MatMul {rep['qk_matmul']}, PV MatMul {rep['pv_matmul']}",
        f"  q/k/v: {rep['qkv_projection']} projection {sorted(set(rep['projections'].values()))}; "
        f"scale on {', '.join(rep['scale_on'])}",
    ]
    lines += [f"  rejected candidate: {r}" for r in rep.get("rejected_candidates", [])]
    lines.append(f"  would insert {rep['would_insert_nodes']} nodes: {ops}")
    return lines


def _inspect(args: argparse.Namespace) -> int:
    from ..patching import inspect

    res = inspect(Path(args.input), itae=itae_config_from_args(args), num_prefix_tokens=args.num_prefix_tokens)
    if args.json:
        print(json.dumps(res.to_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(format_inspection(args.input, res.report)))
    return 0


def inspect_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-inspect", inspect_parser(), _inspect, argv)
