"""OpenVINO IR for the CPU: `itae-export MODEL --out model.xml [--precision fp32|bf16|int8]`.

The export runs as for a .onnx (ONNX, ITAE pass, ONNX Runtime parity); then the validated ITAE ONNX
is converted to OpenVINO IR (model.xml + model.bin, weights kept f32: never OpenVINO's default fp16
weight compression) and checked against the fp32 PyTorch ITAE reference with the fast paths'
accuracy report (itae_export.fastpath.accuracy_report). The IR, its sidecar model.xml.json and the
.onnx it came from are committed together; below the gate (GATES) nothing is written.

Precisions
----------
* fp32: compiled with INFERENCE_PRECISION_HINT=f32 (OpenVINO's CPU default is bf16 on CPUs that
  have it, so an fp32 IR says so explicitly), and every layer carries the keep-precision attribute
  below, so the IR stays fp32 where the hint cannot be given (Triton's OpenVINO backend knows
  HINT_BF16=YES but no f32 hint).
* bf16: compiled with INFERENCE_PRECISION_HINT=bf16, and *f32 islands* in the IR: every layer of the
  ITAE subgraph, of the final transformer block (graph_passes.final_block) and every LayerNorm and
  Softmax carries the runtime attribute DisablePrecisionConversion (value "dynamic:f16,bf16"), which
  the CPU plugin reads as "keep the original precision" when it lowers the rest to bf16. The CPU
  plugin replaces SoftMax-8 by SoftMax-1 and the new node loses the attribute, so kept Softmax
  layers are written as SoftMax-1 (same axis, counted from the front). The matrix multiplies of
  the earlier blocks (most of the FLOPs) run in bf16.
* int8: NNCF post-training quantization (nncf.quantize, ModelType.TRANSFORMER) calibrated on
  CALIBRATION_IMAGES images (the bundled digits unless --calibration-data DIR). Our recipe differs
  from NNCF's defaults in what it leaves in float (the ignored scope, FLOAT_TYPES_INT8):
  - the final block and every itae/* node (the ITAE decision is taken on float norms);
  - the patch embedding Convolution: quantizing the input pixels to 256 levels was the largest
    single error (ViT-L/14, digits: centred cosine 0.853 -> 0.896, cosine 0.99977 -> 0.99986);
  - the attention itself (ScaledDotProductAttention: Q K^T, softmax, P V), which then runs as
    OpenVINO's fused bf16 attention instead of an int8 one fed by quantize/reorder chains on q and
    k: faster and more accurate (centred cosine 0.896 -> 0.909);
  the matrix multiplies of the projections and MLPs of every other block (about 95% of the work)
  are int8. The layers left in float are compiled with the bf16 hint where the CPU has bf16 (else
  f32), with ITAE, LayerNorm and Softmax kept f32.

All three precisions are converted from the graph with the export's exact optimizations
(graph_passes.optimize, which the export applies to the committed .onnx too): k^T of the non-final
attention blocks as one Transpose of k, which OpenVINO folds into its fused attention (no copy of
k), and the final block's projection, MLP and final norm on the CLS row only, which removes three
quarters of the final block's matrix-multiply work.

Default precision (DEFAULT_PRECISION): bf16, the fastest one that meets the accurate-default
targets (cosine >= 0.99999 on the validation images, flagged tokens identical to f32); int8 is
faster but is an explicit choice because its error is two orders of magnitude larger.
"""

from __future__ import annotations

import logging
import os
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError, MissingDependencyError, ParityError, UsageError
from .ov_runner import INSTALL_HINT, OpenVinoRunner, import_openvino

log = logging.getLogger("itae_export")

PRECISIONS = ("fp32", "bf16", "int8")
DEFAULT_PRECISION = "bf16"
OV_SUFFIX = ".xml"
CALIBRATION_IMAGES = 32
# op types int8 leaves in float: the patch embedding and the attention (see the module docstring)
FLOAT_TYPES_INT8 = ("Convolution", "ScaledDotProductAttention")
KEEP_ATTRIBUTE = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16,bf16"}
F32_ONNX_OPS = ("LayerNormalization", "Softmax")
ISLAND_RULES = {
    "fp32": "every layer keeps f32",
    "bf16": "the final block (and all after it), itae/* layers, LayerNorm and Softmax keep f32 under the bf16 hint",
    "int8": "itae/* layers, LayerNorm and Softmax keep f32; the final block, the patch embedding and the attention "
            "are not quantized and run in the hint",
}
# The export refuses to write an IR below these: the minimum cosine to the fp32 PyTorch ITAE reference
# over the validation images (random normal pixels) and over the digits, and for int8 the centred
# cosine on the digits. int8 is held to its bound on in-distribution images (the digits, the default
# calibration set); the random validation images lie outside any calibration range, so they get a
# looser bound that still catches a broken quantization.
GATES: dict[str, dict[str, float]] = {
    "fp32": {"validation_cos_min": 0.99999, "digits_cos_min": 0.99999},
    "bf16": {"validation_cos_min": 0.9999, "digits_cos_min": 0.9999},
    "int8": {"validation_cos_min": 0.99, "digits_cos_min": 0.999, "digits_centered_cos_min": 0.9},
}


@dataclass(frozen=True)
class OpenVinoOptions:
    """How to build the IR; validated on construction (before any export work)."""

    precision: str | None = None  # None: DEFAULT_PRECISION
    calibration_data: Path | None = None  # an ImageFolder for int8 (default: the bundled digits)
    calibration_images: int = CALIBRATION_IMAGES

    def __post_init__(self) -> None:
        from .settings import check_choice, check_int

        if self.precision is None:
            object.__setattr__(self, "precision", DEFAULT_PRECISION)
        check_choice(self.precision, "--precision", PRECISIONS)
        check_int(self.calibration_images, "--calibration-images", lo=1, hi=1797)
        if self.calibration_data is not None:
            object.__setattr__(self, "calibration_data", Path(self.calibration_data))
            if self.precision != "int8":
                raise UsageError(f"--calibration-data calibrates int8 only; add --precision int8 or drop it "
                                 f"(got --precision {self.precision})")
            calibration_dataset(self.calibration_data)  # refuses a folder without images now

    @property
    def compile_config(self) -> dict[str, str]:
        return compile_config(self.precision or DEFAULT_PRECISION)


def has_bf16() -> bool:
    ov = import_openvino()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_config(precision: str) -> dict[str, str]:
    """The exact properties for openvino.Core().compile_model(model, "CPU", compile_config)."""
    if precision == "fp32":
        return {"INFERENCE_PRECISION_HINT": "f32"}
    if precision == "bf16":
        return {"INFERENCE_PRECISION_HINT": "bf16"}
    return {"INFERENCE_PRECISION_HINT": "bf16" if has_bf16() else "f32"}


def calibration_dataset(folder: Path):
    """The ImageFolder behind --calibration-data, refused in one sentence when it has no images."""
    from .data import load_imagefolder

    if not folder.is_dir():
        raise DataError(f"--calibration-data {folder} is not a folder; give an ImageFolder (class sub-folders "
                        "of images)")
    try:
        return load_imagefolder(folder)
    except DataError as e:
        raise DataError(f"--calibration-data {folder}: {e}") from None


def calibration_inputs(opts: OpenVinoOptions, img_size: int) -> np.ndarray:
    """Preprocessed calibration images [N,3,S,S]: the ImageFolder's (seeded subset) or the digits'."""
    from .data import Preprocess
    from .fastpath import digits_eval_inputs

    n = opts.calibration_images
    if opts.calibration_data is None:
        return digits_eval_inputs(img_size, n, seed=1)[0]  # another subset than the accuracy report's (seed 0)
    ds = calibration_dataset(opts.calibration_data).subset(n, seed=1)
    prep = Preprocess(img_size=img_size)
    return np.stack([prep(ds.load(i)) for i in range(len(ds))]).astype(np.float32)


# ------------------------------------------------------------------------------------ f32 islands
def _anonymous(op) -> bool:
    return all(not out.get_names() for out in op.outputs())


def _consumers(op) -> list:
    return [t.get_node() for out in op.outputs() for t in out.get_target_inputs()]


@dataclass(frozen=True)
class Islands:
    """Layer names of an ov.Model converted from an ITAE ONNX (see f32_island_names)."""

    final_block: set[str]  # the final transformer block and everything downstream of it
    core: set[str]  # ITAE, every LayerNorm and Softmax (with the pieces of their decompositions)

    @property
    def bf16_keep(self) -> set[str]:
        return self.final_block | self.core


def _with_anonymous_producers(ops: list, keep: dict) -> dict:
    """`keep` plus the ops whose outputs have no tensor name (pieces of one decomposed ONNX node,
    e.g. LayerNorm's MVN and scale) and whose consumers are all kept."""
    keep = dict(keep)
    for op in reversed(ops):  # consumers come first: one pass keeps chains of anonymous producers
        cons = [c for c in _consumers(op) if c.get_type_name() != "Result"]
        if id(op) not in keep and _anonymous(op) and cons and all(id(c) in keep for c in cons):
            keep[id(op)] = op
    return keep


def f32_island_names(model, onnx_proto) -> Islands:
    """The layers of an ov.Model converted from `onnx_proto` that stay f32 under a bf16 hint.

    Seeds are the ops named like (or producing a tensor of) an ONNX node of the final block
    (graph_passes.final_block), of the ITAE subgraph, or a LayerNormalization / Softmax. The final
    block grows to everything downstream of it; both sets then take in the anonymous pieces of the
    decomposed nodes they hold."""
    from graph_passes.final_block import final_block_nodes

    fb = final_block_nodes(onnx_proto)
    nodes = [n for n in onnx_proto.graph.node if n.name.startswith("itae/") or n.op_type in F32_ONNX_OPS]
    names = {n.name for n in nodes}
    tensors = {o for n in nodes for o in n.output}
    fb_tensors = {o for n in onnx_proto.graph.node if n.name in fb for o in n.output}
    skip = ("Constant", "Parameter", "Result")
    ops = [o for o in model.get_ordered_ops() if o.get_type_name() not in skip]

    def named(op, ns, ts) -> bool:
        return op.get_friendly_name() in ns or any(out.get_names() & ts for out in op.outputs())

    final = {id(o): o for o in ops if named(o, fb, fb_tensors)}
    for op in ops:  # topological order: one pass closes the final block downstream
        if id(op) not in final and any(id(p.get_node()) in final for p in op.input_values()):
            final[id(op)] = op
    core = _with_anonymous_producers(ops, {id(o): o for o in ops if named(o, names, tensors)})
    final = {k: v for k, v in _with_anonymous_producers(ops, final | core).items() if k not in core or k in final}
    return Islands({o.get_friendly_name() for o in final.values()}, {o.get_friendly_name() for o in core.values()})


def mark_f32_islands(xml_path: Path, keep: set[str]) -> int:
    """Add DisablePrecisionConversion to the kept layers of the IR at `xml_path` (rewritten in place,
    in the staging folder), SoftMax-8 written as SoftMax-1; returns how many layers were marked."""
    tree = ET.parse(xml_path)  # our own freshly written file
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") not in keep or layer.get("type") in ("Const", "Parameter", "Result"):
            continue
        if layer.get("type") == "SoftMax" and layer.get("version") == "opset8":
            _as_softmax1(layer)
        rt = layer.find("rt_info")
        if rt is None:
            rt = ET.SubElement(layer, "rt_info")
        if not any(a.get("name") == KEEP_ATTRIBUTE["name"] for a in rt.iter("attribute")):
            ET.SubElement(rt, "attribute", dict(KEEP_ATTRIBUTE))
        marked += 1
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return marked


def _as_softmax1(layer: ET.Element) -> None:
    data = layer.find("data")
    port = layer.find("input/port")
    rank = len(port.findall("dim")) if port is not None else 0
    axis = int(data.get("axis", "1")) if data is not None else 1
    if data is None or rank == 0 or not -rank <= axis < rank:
        return  # unknown rank: left as SoftMax-8 (then it runs in the inference precision)
    data.set("axis", str(axis % rank))
    layer.set("version", "opset1")


# ------------------------------------------------------------------------------------ conversion
def quantize_int8(model, x_calib: np.ndarray, ignored: set[str]):
    """nncf.quantize (TRANSFORMER) of an ov.Model on calibration images, `ignored` layers and itae/*
    left in float."""
    try:
        import nncf
    except ImportError as e:
        raise MissingDependencyError(f"int8 needs NNCF ({e}); run {INSTALL_HINT}") from e
    nncf.set_log_level(logging.WARNING)  # its INFO lines list every node it leaves out; the scope is ours
    data = nncf.Dataset([x_calib[i : i + 1] for i in range(len(x_calib))])
    scope = nncf.IgnoredScope(names=sorted(ignored), patterns=["itae/.*"], types=list(FLOAT_TYPES_INT8), validate=False)
    return nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER, ignored_scope=scope,
                         subset_size=len(x_calib))


def _convert_optimized(ov, onnx_path: Path, optimize: bool):
    """ov.convert_model of the ITAE ONNX with the export's graph optimizations (graph_passes.optimize:
    k^T as one Transpose, the final block's tail on the CLS row; the same function): (ov.Model, the
    ONNX proto it came from, {pass: record}). An ONNX the export optimized already is converted as it
    is (the records come from its metadata); otherwise the optimized graph is written beside
    `onnx_path` (its external data resolves there) and removed after the conversion.
    optimize=False (--no-optimize) converts the ONNX as it is."""
    import onnx

    from graph_passes.optimize import optimize as optimize_graph

    proto = onnx.load(str(onnx_path), load_external_data=False)
    if not optimize:
        return ov.convert_model(str(onnx_path)), proto, {}
    proto, res = optimize_graph(proto)
    for line in res.summary().splitlines():
        log.info(f"  {line}")
    if not res.changed:
        return ov.convert_model(str(onnx_path)), proto, res.records
    tmp = onnx_path.with_name(f".{onnx_path.stem}.optimized.{os.getpid()}.onnx")
    try:
        onnx.save(proto, str(tmp))
        model = ov.convert_model(str(tmp))
    finally:
        tmp.unlink(missing_ok=True)
    return model, proto, res.records


def convert_to_ir(onnx_path: Path, xml_out: Path, opts: OpenVinoOptions, img_size: int, *,
                  optimize: bool = True) -> dict[str, Any]:
    """Write the IR (xml + bin) of `onnx_path` at `xml_out` for opts.precision; returns what was done.
    optimize: convert the graph with the export's optimizations (_convert_optimized)."""
    ov = import_openvino()
    t0 = time.perf_counter()
    model, proto, rewrites = _convert_optimized(ov, onnx_path, optimize)
    islands = f32_island_names(model, proto)
    keep = islands.bf16_keep
    info: dict[str, Any] = {"convert_seconds": 0.0, "f32_layers": 0, "final_block_layers": len(islands.final_block),
                            "output_rows": rewrites.get("output_rows"), "k_transpose": rewrites.get("k_transpose")}
    if opts.precision == "int8":
        x = calibration_inputs(opts, img_size)
        tq = time.perf_counter()
        model = quantize_int8(model, x, islands.final_block)
        keep = islands.core  # the final block stays out of int8 but runs in the float hint (see the docstring)
        info["calibration"] = {"images": int(len(x)), "source": str(opts.calibration_data or "digits (bundled)"),
                               "seconds": time.perf_counter() - tq}
    if opts.precision == "fp32":  # all of it: fp32 whatever the server's hint (Triton cannot set f32)
        keep = {o.get_friendly_name() for o in model.get_ordered_ops()}
    ov.save_model(model, str(xml_out), compress_to_fp16=False)
    info["f32_layers"] = mark_f32_islands(xml_out, keep)
    info["convert_seconds"] = time.perf_counter() - t0
    return info


# ------------------------------------------------------------------------------------ accuracy gate
def gate_failures(report: dict[str, Any], precision: str) -> list[str]:
    """Which gate figures the report misses (empty: the IR may be written)."""
    figures = {"validation_cos_min": report["validation"]["cos_min"], "digits_cos_min": report["digits"]["cos_min"],
               "digits_centered_cos_min": report["digits"]["centered_cos_min"]}
    return [f"{key.replace('_', ' ')} {figures[key]:.6f} < {bound}" for key, bound in GATES[precision].items()
            if not figures[key] >= bound]


def ir_accuracy(xml: Path, ref, precision: str) -> dict[str, Any]:
    """fastpath.accuracy_report of the compiled IR (validation images and digits), gated by GATES."""
    from . import fastpath as fp

    runner = OpenVinoRunner(xml, compile_config(precision))
    assert ref.digits is not None
    report = fp.accuracy_report((ref.outputs, ref.digits[1]), runner.run, ref.inputs, ref.digits[0],
                                k=fp.EVAL_K, seed=0, fast_path=f"openvino-{precision}")
    report["gate"] = {**GATES[precision], "missed": gate_failures(report, precision)}
    return report


def openvino_version() -> str:
    return str(import_openvino().__version__)


def check_gate(report: dict[str, Any], precision: str, out: Path) -> None:
    missed = report["gate"]["missed"]
    if missed:
        hint = "try --precision bf16 or fp32" if precision == "int8" else "try --precision fp32 or report a bug"
        raise ParityError(f"the OpenVINO {precision} IR {out.name} misses its accuracy gate ({'; '.join(missed)}); "
                          f"nothing was written; {hint}")


# ------------------------------------------------------------------------------------ the artifact
def ir_outputs(xml: Path) -> list[Path]:
    """The files an IR export commits beside each other: model.xml, model.bin, model.xml.json."""
    from .ov_runner import sidecar_path

    return [xml, xml.with_suffix(".bin"), sidecar_path(xml)]


def sidecar_record(xml_final: Path, staged_xml: Path, opts: OpenVinoOptions, run, report: dict[str, Any],
                   info: dict[str, Any], onnx_final: Path | None) -> dict[str, Any]:
    """The sidecar: the export record (results.RunInfo.to_dict, as engines and Triton versions carry
    it) with the IR's facts on top: precision, compile_config, accuracy, OpenVINO version."""
    import datetime as dt

    from .hashing import sha256_file

    staged_bin = staged_xml.with_suffix(".bin")
    export = run.to_dict()
    return {
        "format": "itae-export.openvino.v1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": export["model"], "img_size": export["img_size"], "num_prefix_tokens": export["num_prefix_tokens"],
        "itae": export["itae"],
        "precision": opts.precision,
        "compile_config": compile_config(opts.precision or DEFAULT_PRECISION),
        "device": "CPU",
        "ir": {"xml": xml_final.name, "bin": xml_final.with_suffix(".bin").name,
               "xml_sha256": sha256_file(staged_xml), "bin_bytes": staged_bin.stat().st_size,
               "bin_sha256": sha256_file(staged_bin)},
        "onnx": onnx_final.name if onnx_final is not None else None,
        "f32_islands": {"layers": info["f32_layers"], "final_block_layers": info["final_block_layers"],
                        "attribute": KEEP_ATTRIBUTE,
                        "rule": ISLAND_RULES[opts.precision or DEFAULT_PRECISION]},
        "conversion": info,
        "parity": report,
        "openvino_version": openvino_version(),
        "cpu_bf16": has_bf16(),
        "export": export,
    }


def build_ir_artifact(onnx_path: Path, xml_out: Path, opts: OpenVinoOptions, ref, run, txn, *,
                      onnx_final: Path | None = None, optimize: bool = True) -> dict[str, Any]:
    """Convert the (staged) ITAE ONNX into the IR in `txn`'s staging folder, check it against the
    PyTorch reference `ref` (pipeline.Reference: validation and digits outputs) and stage its sidecar;
    ParityError below the gate (the caller's transactions then commit nothing). The caller commits."""
    from . import fastpath as fp
    from .engine import write_sidecar

    staged = txn.stage_path(xml_out)
    info = convert_to_ir(onnx_path, staged, opts, run.img_size, optimize=optimize)
    report = ir_accuracy(staged, ref, opts.precision or DEFAULT_PRECISION)
    text = fp.format_report(report)
    check_gate(report, opts.precision or DEFAULT_PRECISION, xml_out)
    side = write_sidecar(staged, sidecar_record(xml_out, staged, opts, run, report, info, onnx_final))
    xml, weights, sidecar = ir_outputs(xml_out)
    txn.add(staged, xml)
    txn.add(staged.with_suffix(".bin"), weights)
    txn.add(side, sidecar)
    return {"xml": str(xml), "bin": str(weights), "sidecar": str(sidecar), "precision": opts.precision,
            "compile_config": compile_config(opts.precision or DEFAULT_PRECISION), "accuracy": report,
            "report_text": text, "f32_layers": info["f32_layers"], "openvino_version": openvino_version()}
