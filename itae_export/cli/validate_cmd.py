"""itae-validate: argparse -> itae_export.validation.validate() -> report text, --json, --junit-xml, exit code
(0 passed, 3 a figure failed, 2 bad input or weights that do not match the artifact, 4 no TensorRT)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..errors import UsageError
from .common import make_parser, run_command

DOC = "docs/validate.md"


def validate_parser() -> argparse.ArgumentParser:
    p = make_parser("itae-validate", "Check an artifact (ONNX, TensorRT engine, Triton model folder) number by "
                    "number against the PyTorch reference rebuilt from its metadata, or against another artifact "
                    f"(--against). Exit 0: passed; 3: a figure failed; 2: bad input. Tolerances: {DOC}.")
    p.add_argument("artifact", metavar="ARTIFACT",
                   help="an .onnx file, an engine (.engine/.plan, its X.engine.json beside it), or a Triton model "
                   "folder (REPO/NAME: its highest version) or version folder (REPO/NAME/3)")
    g = p.add_argument_group("weights (default: the identity the artifact records, where it can be rebuilt)")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="W", help="the weights file (or transformers folder) it was exported from")
    w.add_argument("--random-weights", action="store_true", help="seeded random weights (--seed)")
    w.add_argument("--demo-artifacts", action="store_true", help="the synthetic demo model (--seed)")
    g.add_argument("--seed", type=int, help="seed of --random-weights / --demo-artifacts (default 0)")
    g.add_argument("--force", action="store_true",
                   help="compare even when the weights given do not match the identity the artifact records")
    g = p.add_argument_group("inputs")
    i = g.add_mutually_exclusive_group()
    i.add_argument("--images", metavar="DIR", help="a folder of images (searched recursively), preprocessed as "
                   "DINOv2 evaluates (resize, centre crop at the recorded size)")
    i.add_argument("--random", type=int, metavar="N", help="N seeded random inputs (default 8)")
    g.add_argument("--input-seed", type=int, default=0, help="seed of the --random inputs")
    g = p.add_argument_group(f"tolerances (defaults per precision: {DOC})")
    g.add_argument("--atol", type=float, help="largest allowed absolute difference")
    g.add_argument("--cos-min", type=float, help="smallest allowed cosine similarity of an output row")
    g.add_argument("--flag-agreement-min", type=float, metavar="F",
                   help="smallest allowed fraction of images whose ITAE-flagged token set equals the reference's")
    g = p.add_argument_group("what the artifact is (when it records no itae-export metadata)")
    g.add_argument("--model", help="model name, e.g. dinov2_vits14 (prefix tokens are read from the graph)")
    g.add_argument("--img-size", type=int, help="input size in pixels")
    g.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="an engine's precision, when no sidecar says")
    g = p.add_argument_group("comparison and reports")
    g.add_argument("--against", metavar="OTHER",
                   help="compare with another artifact (same inputs to both) instead of PyTorch")
    g.add_argument("--json", metavar="FILE", help="write the report as JSON (replaced if it exists)")
    g.add_argument("--junit-xml", metavar="FILE",
                   help="write a JUnit XML report, one test case per check (replaced if it exists)")
    return p


def _check_report_paths(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """The report outputs, refused up front: a folder, the same file twice, an input."""
    outs = [(flag, Path(v)) for flag, v in (("--json", args.json), ("--junit-xml", args.junit_xml)) if v]
    if len(outs) == 2 and outs[0][1].resolve() == outs[1][1].resolve():
        raise UsageError(f"--json and --junit-xml are both {outs[0][1]}; give two files")
    inputs = [Path(p) for p in (args.artifact, args.against, args.weights) if p]
    for flag, p in outs:
        if p.is_dir():
            raise UsageError(f"{flag} {p} is a folder; give a file path")
        for inp in inputs:
            if inp.exists() and p.exists() and p.resolve() == inp.resolve():
                raise UsageError(f"{flag} {p} is an input; give another file")
    return outs


def _validate(args: argparse.Namespace) -> int:
    from ..errors import ParityError
    from ..outputs import write_text_atomic
    from ..validation import validate

    if args.seed is not None and not (args.random_weights or args.demo_artifacts):
        raise UsageError("--seed applies to --random-weights and --demo-artifacts only")
    if args.input_seed != 0 and args.images:
        raise UsageError("--input-seed applies to --random inputs, not --images")
    outs = _check_report_paths(args)
    report = validate(args.artifact, weights=args.weights, random_weights=args.random_weights,
                      demo_artifacts=args.demo_artifacts, seed=args.seed or 0, images=args.images,
                      n_random=args.random if args.random is not None else 8, input_seed=args.input_seed,
                      atol=args.atol, cos_min=args.cos_min, flag_agreement_min=args.flag_agreement_min,
                      against=args.against, force=args.force, model=args.model, img_size=args.img_size,
                      precision=args.precision)
    print(report)
    inputs = [Path(p) for p in (args.artifact, args.against) if p and Path(p).is_file()]
    for flag, path in outs:
        text = report.to_json() if flag == "--json" else report.junit_xml()
        written = write_text_atomic(path, text, force=True, inputs=inputs, flag=flag)
        print(f"wrote {written}")
    if not report:
        raise ParityError(report.failure_message())
    return 0


def validate_main(argv: Sequence[str] | None = None) -> int:
    return run_command("itae-validate", validate_parser(), _validate, argv)
