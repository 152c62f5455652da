"""Run an OpenVINO IR written by `itae-export --out model.xml` (or any IR) on the CPU, with the compile
properties its sidecar `model.xml.json` records: OpenVinoRunner(xml).run(x) -> np.ndarray.

Reading an IR checks what OpenVINO would otherwise report obscurely: the .xml exists, its .bin
weights file lies beside it, and, where the sidecar records them, the .bin's size and the .xml's
SHA-256 match (files of two exports mixed, e.g. by a kill between the renames of an overwrite,
are refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import MissingDependencyError, ModelError, UsageError

INSTALL_HINT = "pip install 'itae-export[openvino]' (the openvino and nncf wheels)"
SIDECAR_SUFFIX = ".json"
MAX_SIDECAR_BYTES = 4 << 20
MAX_XML_BYTES = 64 << 20  # the graph file (weights are in the .bin); ViT-g/14's int8 IR is about 2 MB


def import_openvino():
    """The openvino module, or MissingDependencyError naming the pip install."""
    try:
        import openvino
    except ImportError as e:
        raise MissingDependencyError(f"OpenVINO is not installed ({e}); run {INSTALL_HINT}") from e
    return openvino


def sidecar_path(xml_path: str | Path) -> Path:
    return Path(str(xml_path) + SIDECAR_SUFFIX)


def read_sidecar(xml_path: str | Path) -> dict[str, Any] | None:
    """The JSON sidecar beside an IR (None when there is none); UsageError when it is not a JSON object."""
    from .safe_io import read_json_object

    side = sidecar_path(xml_path)
    if not side.is_file():
        return None
    return read_json_object(side, "OpenVINO sidecar", "re-export with itae-export", max_bytes=MAX_SIDECAR_BYTES)


# The compile properties a sidecar may carry: what itae-export writes (openvino_target.compile_config) and the
# CPU plugin's threading and scheduling properties a server tunes. Anything else (CACHE_DIR writes compiled
# blobs to a folder of the file's choosing) is refused: the sidecar may come from anywhere.
SIDECAR_PROPERTIES: dict[str, tuple[str, ...] | None] = {
    "INFERENCE_PRECISION_HINT": ("f32", "bf16", "f16"),
    "INFERENCE_NUM_THREADS": None, "COMPILATION_NUM_THREADS": None, "NUM_STREAMS": None,  # counts: digits
    "PERFORMANCE_HINT": ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT"),
    "ENABLE_CPU_PINNING": ("YES", "NO"), "ENABLE_HYPER_THREADING": ("YES", "NO"),
}


def sidecar_compile_config(side: dict[str, Any], xml_path: str | Path) -> dict[str, str]:
    """The sidecar's compile_config, checked: a JSON object whose keys are SIDECAR_PROPERTIES, each value
    one of the allowed strings (counts: digits; NUM_STREAMS also AUTO). UsageError naming the sidecar
    otherwise."""
    config = side.get("compile_config") or {}
    where = f"OpenVINO sidecar {sidecar_path(xml_path)}"
    if not isinstance(config, dict):
        raise UsageError(f"{where}: compile_config must be a JSON object of OpenVINO properties; re-export")
    out: dict[str, str] = {}
    for key, value in config.items():
        v = str(value)
        allowed = SIDECAR_PROPERTIES.get(key, ())
        ok = (v.isdigit() or (key == "NUM_STREAMS" and v == "AUTO")) if allowed is None else v in allowed
        if not ok or not isinstance(value, (str, int)) or isinstance(value, bool):
            raise UsageError(f"{where}: compile_config {key}={value!r} is not a property itae-export accepts from "
                             f"a sidecar (keys: {', '.join(SIDECAR_PROPERTIES)}); remove it, or pass the properties "
                             "to OpenVinoRunner yourself")
        out[key] = v
    return out


def check_ir_files(xml_path: str | Path, flag: str = "--openvino") -> tuple[Path, Path]:
    """(xml, bin) of an IR, refused in one sentence when either is missing or the .bin does not match
    the size its sidecar records."""
    xml = Path(xml_path)
    if xml.suffix != ".xml":
        raise UsageError(f"{flag} {xml}: give an OpenVINO IR .xml file (its weights in the .bin beside it)")
    if not xml.is_file():
        raise UsageError(f"{flag} {xml} does not exist; write one with itae-export MODEL --out {xml.name}")
    if xml.stat().st_size > MAX_XML_BYTES:
        raise UsageError(f"{flag} {xml} has {xml.stat().st_size} bytes, more than the {MAX_XML_BYTES >> 20} MB an IR "
                         "graph file needs (its weights belong in the .bin); give the IR itae-export wrote")
    weights = xml.with_suffix(".bin")
    if not weights.is_file():
        raise UsageError(f"{flag} {xml}: its weights file {weights.name} is missing beside it; copy the .xml and "
                         "the .bin together, or re-export")
    ir = ((read_sidecar(xml) or {}).get("ir") or {})
    want = ir.get("bin_bytes")
    if isinstance(want, int) and weights.stat().st_size != want:
        raise ModelError(f"{flag} {xml}: {weights.name} has {weights.stat().st_size} bytes but the sidecar "
                         f"{sidecar_path(xml).name} records {want}: the .bin belongs to another export; re-export")
    if isinstance(ir.get("xml_sha256"), str):
        from .hashing import sha256_file

        if sha256_file(xml) != ir["xml_sha256"]:
            raise ModelError(f"{flag} {xml} is not the .xml its sidecar {sidecar_path(xml).name} describes (another "
                             "export, or one killed between its renames); re-export")
    return xml, weights


class OpenVinoRunner:
    """An IR compiled for the CPU with `compile_config` (default: the sidecar's, else OpenVINO's defaults)."""

    def __init__(self, xml_path: str | Path, compile_config: dict[str, str] | None = None, *,
                 threads: int | None = None, flag: str = "--openvino"):
        ov = import_openvino()
        xml, weights = check_ir_files(xml_path, flag)
        side = read_sidecar(xml) or {}
        config = sidecar_compile_config(side, xml) if compile_config is None else dict(compile_config)
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        core = ov.Core()
        try:
            model = core.read_model(str(xml), str(weights))
            self.compiled = core.compile_model(model, "CPU", config)
        except RuntimeError as e:  # OpenVINO reports unreadable IR and bad properties as RuntimeError
            raise ModelError(f"{flag} {xml}: OpenVINO cannot load it ({str(e).splitlines()[0]}); re-export") from e
        self.path, self.compile_config = xml, config
        self.request = self.compiled.create_infer_request()
        self.output = self.compiled.output(0)
        export = side.get("export") if isinstance(side.get("export"), dict) else {}
        self.dynamic_size = export.get("dynamic_size") if isinstance(export.get("dynamic_size"), dict) else None

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.dynamic_size is not None and x.ndim == 4:
            # OpenVINO does not check Gather indices: the graph's size gate gives NaN; say why instead
            from .dynamic_size import SizeBounds
            from .runtime import size_sentence

            b = SizeBounds.from_metadata(self.dynamic_size)
            if not b.contains(int(x.shape[2]), int(x.shape[3])):
                raise UsageError(size_sentence(b.min_size, b.max_size, b.multiple, x.shape))
        res = self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(res[self.output], dtype=np.float32, copy=True)
