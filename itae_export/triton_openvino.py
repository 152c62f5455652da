"""An OpenVINO IR as a Triton model version (backend "openvino", KIND_CPU):

    REPO/NAME/<version>/model.xml, model.bin, model.xml.json (the sidecar; ignored by Triton)

The compile properties of the IR's sidecar become the backend's parameters, under the names the
Triton OpenVINO backend documents (triton-inference-server/openvino_backend, README "Parameters";
it refuses any other key): INFERENCE_PRECISION_HINT=bf16 -> HINT_BF16 "YES"; INFERENCE_NUM_THREADS,
NUM_STREAMS and PERFORMANCE_HINT keep their names. An f32 hint has no backend parameter: an fp32 IR
from itae-export keeps f32 through its per-layer attributes instead (itae_export.openvino_target)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import DeployError, UsageError

BACKEND = "openvino"
_PASSED_THROUGH = ("INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS", "NUM_STREAMS", "PERFORMANCE_HINT")
_OV_TO_TRITON = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "bf16": "TYPE_BF16", "f64": "TYPE_FP64",
                 "u8": "TYPE_UINT8", "i8": "TYPE_INT8", "i32": "TYPE_INT32", "i64": "TYPE_INT64",
                 "boolean": "TYPE_BOOL"}


def backend_parameters(compile_config: dict[str, Any]) -> dict[str, str]:
    """The Triton OpenVINO backend's parameters for an IR's compile_config (see the module docstring)."""
    params: dict[str, str] = {}
    for key, value in compile_config.items():
        v = str(value)
        if key == "INFERENCE_PRECISION_HINT":
            if v.lower() in ("bf16", "bfloat16"):
                params["HINT_BF16"] = "YES"
            elif v.lower() not in ("f32", "fp32", "float32"):
                raise DeployError(f"compile_config {key}={v}: the Triton OpenVINO backend can only hint bf16; "
                                  "re-export with --precision bf16 or fp32")
        elif key in _PASSED_THROUGH:
            params[key] = v
        else:
            raise DeployError(f"compile_config {key}={v} has no Triton OpenVINO backend parameter; drop it from the "
                              "sidecar's compile_config")
    return params


def ir_specs(xml: Path):
    """(inputs, outputs) TensorSpecs of an IR, read with OpenVINO (weights memory-mapped, not compiled)."""
    from .ov_runner import import_openvino
    from .triton import TensorSpec

    ov = import_openvino()
    try:
        model = ov.Core().read_model(str(xml), str(xml.with_suffix(".bin")))
    except RuntimeError as e:
        raise DeployError(f"{xml}: OpenVINO cannot read it ({str(e).splitlines()[0]})") from e

    def spec(port, kind: str):
        et = port.get_element_type().get_type_name()
        if et not in _OV_TO_TRITON:
            raise DeployError(f"OpenVINO {kind} {port.get_any_name()!r} has type {et}, which Triton cannot serve")
        dims = tuple(d.get_length() if d.is_static else -1 for d in port.get_partial_shape())
        return TensorSpec(port.get_any_name(), _OV_TO_TRITON[et], dims)

    return [spec(p, "input") for p in model.inputs], [spec(p, "output") for p in model.outputs]


def read_ir_source(src: Path, instance_kind: str, meta: dict[str, Any] | None, comments: list[str]) -> dict:
    """What triton._Source needs for an IR: its IO, sidecar, meta and the backend parameters."""
    from .ov_runner import check_ir_files, read_sidecar, sidecar_compile_config, sidecar_path

    if instance_kind != "KIND_CPU":
        raise UsageError(f"--instance-kind {instance_kind}: Triton's OpenVINO backend runs on the CPU only; use "
                         "KIND_CPU (the default for an .xml)")
    xml, _ = check_ir_files(src, "--triton-repo model")
    side = read_sidecar(xml)
    ins, outs = ir_specs(xml)
    params = backend_parameters(sidecar_compile_config(side or {}, xml))
    if side is not None:
        comments.append(f"OpenVINO IR, precision {side.get('precision')}, OpenVINO {side.get('openvino_version')}; "
                        f"compile_config {side.get('compile_config')}")
        if meta is None:
            meta = {k: side[k] for k in ("model", "img_size", "itae") if k in side}
    return {"inputs": ins, "outputs": outs, "meta": meta, "parameters": params,
            "sidecar": sidecar_path(xml) if side is not None else None}


def parameter_lines(params: dict[str, str]) -> list[str]:
    import json

    lines = []
    for k, v in sorted(params.items()):
        lines.append(f"parameters {{ key: {json.dumps(k)} value: {{ string_value: {json.dumps(v)} }} }}")
    return lines


def stage_ir_files(src: Path, stage: Path, sidecar: Path | None, copy) -> tuple[list[Path], list[Path]]:
    """model.xml, model.bin (and model.xml.json) copied into the staged version folder."""
    files = [copy(src, stage / "model.xml"), copy(src.with_suffix(".bin"), stage / "model.bin")]
    sources = [src, src.with_suffix(".bin")]
    if sidecar is not None:
        files.append(copy(sidecar, stage / "model.xml.json"))
        sources.append(sidecar)
    return files, sources
