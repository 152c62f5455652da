"""The OpenVINO flags of itae-export (--out model.xml) -> openvino_target.OpenVinoOptions. --precision
is shared with the TensorRT engine flags (engine_args): fp32|bf16 for both, fp16 engines only, int8 IR only."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..openvino_target import CALIBRATION_IMAGES, DEFAULT_PRECISION, PRECISIONS, OpenVinoOptions


def add_openvino_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "OpenVINO IR (--out *.xml)",
        f"Convert the validated ITAE ONNX to OpenVINO IR (model.xml + model.bin + model.xml.json) for the CPU. "
        f"--precision {'|'.join(PRECISIONS)} (default {DEFAULT_PRECISION}: bf16 matmuls, the ITAE subgraph, the final "
        "block, LayerNorm and Softmax kept f32); see docs/openvino.md.")
    g.add_argument("--calibration-data", metavar="DIR", default=None,
                   help="with --precision int8: an ImageFolder (class sub-folders of images) to calibrate on "
                   "(default: the bundled sklearn digits)")
    g.add_argument("--calibration-images", type=int, default=None, metavar="N",
                   help=f"with --precision int8: calibration images (default {CALIBRATION_IMAGES})")


def openvino_options_from_args(args: argparse.Namespace, is_openvino: bool) -> OpenVinoOptions | None:
    given = [f for f, v in (("--calibration-data", args.calibration_data),
                            ("--calibration-images", args.calibration_images)) if v is not None]
    if not is_openvino:
        if given:
            raise UsageError(f"{', '.join(given)} apply to an OpenVINO --out *.xml only; drop them or write an .xml")
        return None
    if given and args.precision != "int8":
        raise UsageError(f"{', '.join(given)} calibrate int8 only; add --precision int8 or drop them")
    return OpenVinoOptions(
        precision=args.precision,
        calibration_data=Path(args.calibration_data) if args.calibration_data else None,
        calibration_images=args.calibration_images or CALIBRATION_IMAGES,
    )
