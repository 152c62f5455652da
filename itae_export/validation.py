"""Parity of any artifact against PyTorch, or against another artifact (`itae-validate`, `validate()`).

    resolve_artifact      .onnx | .engine/.plan (+ X.engine.json) | Triton model or version folder
      -> check_weights    the weights given against the identity the artifact records (refused before
                          any work unless force)
      -> make_inputs      real images (itae_export.data.Preprocess) or seeded random inputs
      -> subject runner   ONNX Runtime (with the ITAE flag tensor as an extra output) or TensorRT
      -> reference        PyTorch, built as the export built it (models.build_model / demo.demo_model
                          + reference.ITAEReference and graph_options.reference_batch), or --against
      -> checks           max_abs, cos_min, flagged_agreement, kmeans_ari (>= 20 images)

The result is a ValidationReport: true when every check passed, readable as text, convertible to a
dict (JSON) and to JUnit XML. Nothing here writes a file; the CLI writes the reports it is asked for
(itae_export.outputs.write_text_atomic). Tolerances: itae_export.parity.ONNX_TOLERANCES and
engine.PARITY_TOLERANCES; their reasons are in docs/validate.md.
"""

from __future__ import annotations

import json
import math
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graph_passes import metadata as md

from .errors import DataError, ModelError, ParityError, UsageError
from .graph_options import l2_normalise, normalise_pixels
from .jsonable import jsonable

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
MIN_KMEANS_IMAGES = 20  # k-means agreement is computed from this many images on
MAX_RANDOM = 4096
RUN_BATCH = 8
CHECK_NAMES = ("max_abs", "cos_min", "flagged_agreement", "kmeans_ari")
_SEEDED = re.compile(r"^(random|demo-artifacts)\(seed=(\d+)\)$")
_SHA = re.compile(r"\b([0-9a-f]{64})\b")
WEIGHTS_SHA256_KEY = md.WEIGHTS_SHA256  # written by itae-export when --weights names a file or folder


# ---------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Check:
    """One figure against its limit. status: passed | failed | skipped (not measurable here)."""

    name: str
    value: float | None
    limit: float | None
    op: str  # "<=" or ">="
    status: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status != "failed"

    def describe(self) -> str:
        if self.status == "skipped":
            return f"{self.name}: skipped ({self.detail})" if self.detail else f"{self.name}: skipped"
        detail = f" ({self.detail})" if self.detail else ""
        if self.limit is None:
            return f"{self.name} {_fmt(self.value)} (not checked): passed{detail}"
        if self.status == "passed":
            return f"{self.name} {_fmt(self.value)} {self.op} {self.limit:g}: passed{detail}"
        if self.value is None:
            return f"{self.name} FAILED{detail}"
        side = "above the limit" if self.op == "<=" else "below the limit"
        return f"{self.name} {_fmt(self.value)} {side} {self.limit:g}: FAILED{detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "limit": self.limit, "op": self.op, "status": self.status,
                "detail": self.detail}


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if math.isfinite(v) and 1e-3 <= abs(v) <= 1:
        return f"{v:.7f}"
    return f"{v:.3g}"


@dataclass
class ValidationReport:
    """What validate() found. `bool(report)`: every check passed (skipped ones do not fail)."""

    artifact: str
    kind: str  # onnx | engine | triton-onnx | triton-engine
    reference: str  # "pytorch" or the --against artifact
    model: str | None
    img_size: int | None
    precision: str  # the tolerance row: fp32 | fused | int8 | fp16 | engine-fp32 | ...
    tolerance: dict[str, float | None]
    weights: str | None
    inputs: str
    images: int
    checks: list[Check] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    per_image: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def check(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check {name!r}; the report has {[c.name for c in self.checks]}")

    def failure_message(self) -> str:
        """One sentence naming every failed figure (empty when the report passed)."""
        if self.passed:
            return ""
        what = "; ".join(c.describe() for c in self.failed)
        against = "PyTorch" if self.reference == "pytorch" else self.reference
        return f"parity failed: {self.artifact} disagrees with {against} ({what})"

    def to_dict(self) -> dict[str, Any]:
        return _finite({
            "artifact": self.artifact, "kind": self.kind, "reference": self.reference, "model": self.model,
            "img_size": self.img_size, "precision": self.precision, "tolerance": self.tolerance,
            "weights": self.weights, "inputs": self.inputs, "images": self.images, "passed": self.passed,
            "checks": [c.to_dict() for c in self.checks], "figures": jsonable(self.figures),
            "per_image": jsonable(self.per_image), "notes": list(self.notes), "seconds": self.seconds,
        })

    def __str__(self) -> str:
        against = ("the PyTorch " + ("ITAE reference" if self.figures.get("itae") else "model")
                   if self.reference == "pytorch" else self.reference)
        lines = [f"{self.artifact} ({self.kind}, {self.precision} tolerance) vs {against}: {self.model or '?'} at "
                 f"{self.img_size or '?'} px, weights {self.weights or 'not recorded'}",
                 f"  inputs: {self.inputs}"]
        f = self.figures
        if "cos_min" in f:
            lines.append(f"  max abs diff {_fmt(f['max_abs'])}, mean abs diff {_fmt(f['mean_abs'])}, cosine min "
                         f"{f['cos_min']:.7f} / mean {f['cos_mean']:.7f} over {f['rows']} rows")
        if f.get("flagged_reference") is not None:
            lines.append(f"  flagged tokens: reference {f['flagged_reference']}, artifact "
                         f"{f.get('flagged_artifact', 'n/a')} (of {f.get('patch_tokens', '?')} patch tokens)")
        bad = [p for p in self.per_image if p.get("same") is False]
        for p in bad[:10]:
            lines.append(f"  image {p['index']} ({p['name']}): flagged {p['flagged_reference']} in the reference, "
                         f"{p['flagged_artifact']} in the artifact, {p['differ']} tokens differ")
        if len(bad) > 10:
            lines.append(f"  ... and {len(bad) - 10} more images whose flagged sets differ")
        lines += ["  " + c.describe() for c in self.checks]
        lines += [f"  note: {n}" for n in self.notes]
        n_failed = len(self.failed)
        n_skipped = sum(c.status == "skipped" for c in self.checks)
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {len(self.checks)} checks, {n_failed} failed, "
                     f"{n_skipped} skipped ({self.seconds:.1f} s)")
        return "\n".join(lines)

    def junit_xml(self) -> str:
        """JUnit XML: one <testcase> per check (failure / skipped elements as JUnit readers expect)."""
        suite = ET.Element("testsuite", {
            "name": "itae-validate", "tests": str(len(self.checks)), "failures": str(len(self.failed)),
            "errors": "0", "skipped": str(sum(c.status == "skipped" for c in self.checks)),
            "time": f"{self.seconds:.3f}"})
        props = ET.SubElement(suite, "properties")
        for key in ("artifact", "kind", "reference", "model", "img_size", "precision", "weights", "inputs"):
            ET.SubElement(props, "property", {"name": key, "value": str(getattr(self, key))})
        classname = "itae-validate." + re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.artifact).name or "artifact")
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", {"classname": classname, "name": c.name, "time": "0"})
            if c.status == "failed":
                ET.SubElement(case, "failure", {"message": c.describe(), "type": "ParityError"}).text = c.describe()
            elif c.status == "skipped":
                ET.SubElement(case, "skipped", {"message": c.detail or "not measurable"})
            ET.SubElement(case, "system-out").text = c.describe()
        ET.SubElement(suite, "system-out").text = str(self)
        root = ET.Element("testsuites", {"name": "itae-validate", "tests": suite.get("tests", "0"),
                                         "failures": suite.get("failures", "0"), "errors": "0"})
        root.append(suite)
        ET.indent(root)
        return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    def raise_for_failure(self) -> ValidationReport:
        """ParityError (exit 3) naming the failed figures; the report itself when it passed."""
        if not self.passed:
            raise ParityError(self.failure_message())
        return self


def _finite(obj: Any) -> Any:
    """Strict JSON: a non-finite float becomes its string ("inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


# -------------------------------------------------------------------------------------- artifacts
@dataclass
class Artifact:
    """A model file as read, with what it (its metadata, sidecar or Triton provenance) records."""

    path: Path  # the model file: .onnx, or the engine
    kind: str  # onnx | engine | triton-onnx | triton-engine
    label: str  # as the user named it
    model: str | None = None
    img_size: int | None = None
    num_prefix_tokens: int | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    itae: dict | None = None
    itae_structural: bool = False  # ITAE nodes found in the graph (ONNX)
    fast_path: str | None = None
    uint8: dict | None = None  # the recorded uint8 NHWC input pass (mean, std, ...)
    uint8_guessed: bool = False
    l2: dict | None = None
    precision: str = "fp32"
    depth: int | None = None  # attention blocks in the graph
    has_metadata: bool = False
    proto: Any = None  # onnx.ModelProto without external data (ONNX)
    flag_tensor: str | None = None
    input_name: str | None = None
    input_float16: bool = False
    dynamic_size: dict | None = None  # {"min", "max", "multiple"} of a --dynamic-size export
    fixed_batch: int | None = None
    engine_batch: int | None = None
    sidecar: dict | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def is_engine(self) -> bool:
        return self.kind.endswith("engine")

    @property
    def takes_uint8(self) -> bool:
        return self.uint8 is not None


def resolve_artifact(path: str | Path, flag: str = "ARTIFACT", *, precision: str | None = None) -> Artifact:
    """Read an .onnx file, an engine (+ its JSON sidecar) or a Triton model / version folder."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p} does not exist; give an .onnx file, an engine (.engine/.plan) or a Triton "
                         "model folder (REPO/NAME or REPO/NAME/VERSION)")
    if p.is_dir():
        return _read_triton(p, flag, precision)
    if p.suffix == ".onnx":
        return _read_onnx(p, "onnx", str(p), None, flag)
    if p.suffix in ENGINE_SUFFIXES:
        return _read_engine(p, "engine", str(p), None, flag, precision)
    if p.suffix == ".xml":
        return _read_openvino(p, flag)
    raise UsageError(f"{flag} {p}: use an .onnx file, an engine (.engine/.plan), an OpenVINO IR (.xml) or a Triton "
                     "model folder")


def _read_json(path: Path, what: str) -> dict:
    from .safe_io import read_json_object

    return read_json_object(path, what, "rewrite or remove it")


def _read_triton(p: Path, flag: str, precision: str | None) -> Artifact:
    from .triton import PROVENANCE_FILE

    version = p
    if not p.name.isdigit():
        versions = sorted((int(d.name) for d in p.iterdir() if d.is_dir() and d.name.isdigit()), reverse=True)
        if not versions:
            raise UsageError(f"{flag} {p} is a folder with no numbered version folder; give a Triton model folder "
                             "(REPO/NAME), a version folder (REPO/NAME/3) or a model file")
        version = p / str(versions[0])
    prov_path = version / PROVENANCE_FILE
    prov = _read_json(prov_path, "Triton provenance file") if prov_path.is_file() else None
    label = f"{p} (Triton version {version.name})" if version != p else f"{p} (Triton version folder)"
    onnx_file, plan = version / "model.onnx", version / "model.plan"
    if onnx_file.is_file():
        art = _read_onnx(onnx_file, "triton-onnx", label, prov, flag)
        if plan.is_file():
            art.notes.append(f"{version} holds model.onnx and model.plan; validated model.onnx")
    elif plan.is_file():
        art = _read_engine(plan, "triton-engine", label, prov, flag, precision)
    else:
        raise UsageError(f"{flag} {version} holds neither model.onnx nor model.plan; give a Triton version folder "
                         "written by itae-triton / itae-export --triton-repo")
    if prov is None:
        art.notes.append(f"{version} has no {PROVENANCE_FILE}; using what the model file records")
    return art


def _fill_from(art: Artifact, rec: dict | None) -> None:
    """Fields the model itself does not record, from a sidecar's or provenance file's record."""
    if not rec:
        return
    for key in ("model", "img_size", "num_prefix_tokens", "weights"):
        if getattr(art, key) is None and rec.get(key) is not None:
            setattr(art, key, rec[key])
    if art.itae is None and isinstance(rec.get("itae"), dict):
        art.itae = rec["itae"]
    digest = rec.get("weights_digest")
    sha = rec.get("weights_sha256") or (digest.get("sha256") if isinstance(digest, dict) else None)
    if art.weights_sha256 is None and isinstance(sha, str):
        art.weights_sha256 = sha.lower()


def _read_onnx(path: Path, kind: str, label: str, prov: dict | None, flag: str) -> Artifact:
    from graph_passes.anchor import attention_layout
    from graph_passes.errors import PassError
    from graph_passes.match import infer_num_prefix_tokens
    from graph_passes.metadata import read_metadata

    from .safe_io import load_onnx_checked

    proto = load_onnx_checked(path, flag)
    try:
        meta = read_metadata(proto)
    except PassError as e:
        raise UsageError(f"{flag} {path}: {e}") from None
    art = Artifact(path=path, kind=kind, label=label, proto=proto, model=meta.model, img_size=meta.img_size,
                   num_prefix_tokens=meta.num_prefix_tokens, weights=meta.weights, itae=meta.itae,
                   fast_path=meta.fast_path, uint8=meta.uint8_nhwc_input, l2=meta.l2_normalize,
                   has_metadata=meta.model is not None, dynamic_size=meta.dynamic_size)
    sha = meta.extra.get(WEIGHTS_SHA256_KEY)
    art.weights_sha256 = sha.lower() if sha else _sha_in(meta.weights)
    if prov is not None:
        _fill_from(art, prov.get("meta") if isinstance(prov.get("meta"), dict) else None)
    try:
        if art.num_prefix_tokens is None:
            art.num_prefix_tokens = infer_num_prefix_tokens(proto)
        art.depth = attention_layout(proto).num_blocks or None
        art.flag_tensor = _find_flag_tensor(proto, art)
    except PassError as e:
        art.notes.append(f"graph structure not fully recognised ({e})")
    _onnx_io(art)
    if art.fast_path == "int8-dynamic":
        art.precision = "int8"
    elif art.fast_path == "fp32-fused-attention":
        art.precision = "fused"
    elif art.input_float16 or (art.uint8 or {}).get("graph_dtype") == "float16":
        art.precision = "fp16"
    return art


def _sha_in(label: str | None) -> str | None:
    m = _SHA.search(label.lower()) if label else None
    return m.group(1) if m else None


def _onnx_io(art: Artifact) -> None:
    from onnx import TensorProto

    g = art.proto.graph
    inits = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1:
        raise UsageError(f"{art.path} has {len(inputs)} graph inputs ({[i.name for i in inputs]}); itae-validate "
                         "expects one image input")
    vi = inputs[0]
    art.input_name = vi.name
    tt = vi.type.tensor_type
    art.input_float16 = tt.elem_type == TensorProto.FLOAT16
    if tt.elem_type == TensorProto.UINT8 and art.uint8 is None:
        raise UsageError(f"{art.path} takes uint8 pixels but records no {'itae_export.uint8_nhwc_input'} pass (mean, "
                         "std); itae-validate cannot tell how it normalises them")
    dims = list(tt.shape.dim)
    if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
        art.fixed_batch = int(dims[0].dim_value)
    spatial = [d.dim_value for d in (dims[1:3] if art.uint8 else dims[2:4]) if d.HasField("dim_value")]
    if len(spatial) == 2 and spatial[0] == spatial[1] and spatial[0] > 0:
        if art.img_size is None:
            art.img_size = int(spatial[0])
        elif art.img_size != spatial[0]:
            raise UsageError(f"{art.path} records img_size {art.img_size} but its input is {spatial[0]} px; the "
                             "metadata is wrong: re-export it")


def _find_flag_tensor(proto, art: Artifact) -> str | None:
    """The output of the ITAE norm comparison (Greater/Less on the token lengths), found by structure."""
    from graph_passes.detect import _norm_of, already_patched
    from graph_passes.graph import GraphIndex

    ix = GraphIndex(proto)
    info = already_patched(proto, ix)
    if info is None:
        return None
    if info.site is None:
        art.notes.append(f"the metadata records ITAE but no ITAE nodes were found by structure ({info})")
        return None
    art.itae_structural = True
    site = info.site
    for node in proto.graph.node:
        if node.op_type == site.comparison and len(node.input) == 2 \
                and any(_norm_of(ix, i) == site.norm_source for i in node.input):
            return node.output[0]
    art.notes.append("ITAE nodes found, but not their norm comparison: flagged-set agreement is not measured")
    return None


def _read_engine(path: Path, kind: str, label: str, prov: dict | None, flag: str, precision: str | None) -> Artifact:
    from .engine import PRECISIONS
    from .triton import find_engine_sidecar

    art = Artifact(path=path, kind=kind, label=label)
    sidecar_path = find_engine_sidecar(path)
    side = _read_json(sidecar_path, "engine sidecar") if sidecar_path is not None else None
    if side is None and prov and prov.get("engine_sidecar") and Path(prov["engine_sidecar"]).is_file():
        sidecar_path = Path(prov["engine_sidecar"])
        side = _read_json(sidecar_path, "engine sidecar")
    art.sidecar = side
    if side is not None:
        _fill_from(art, side)
        _fill_from(art, side.get("export") if isinstance(side.get("export"), dict) else None)
        art.has_metadata = art.model is not None
        prof = side.get("batch_profile") or {}
        if prof.get("max"):
            art.engine_batch = int(prof["max"][0])
            shape = list(prof["max"])
            art.input_name = prof.get("input")
        else:
            shape = []
        src = _source_onnx(path, sidecar_path, side, prov)
        if src is not None:
            try:
                s = _read_onnx(src, "onnx", str(src), None, "engine source ONNX")
            except UsageError as e:
                art.notes.append(f"the ONNX it was built from is not readable ({e})")
            else:
                for key in ("model", "img_size", "num_prefix_tokens", "weights", "weights_sha256", "uint8", "l2",
                            "depth", "input_name"):
                    if getattr(art, key) is None:
                        setattr(art, key, getattr(s, key))
                if art.itae is None and s.itae is not None:
                    art.itae = s.itae
                art.has_metadata = art.has_metadata or s.has_metadata
        else:
            art.notes.append("the ONNX the engine was built from is not beside it: weights identity, input format "
                             "and depth come from the sidecar alone")
            if len(shape) == 4 and shape[-1] == 3 and shape[1] != 3:
                art.uint8, art.uint8_guessed = {}, True
                art.notes.append("input looks like uint8 NHWC (profile shape); ImageNet mean/std assumed")
            passes = (side.get("export") or {}).get("pass") or {}
            blocks = (passes.get("matched") or {}).get("attention_blocks")
            if isinstance(blocks, int):
                art.depth = blocks
        prec = side.get("precision") or precision
    else:
        prec = precision
        art.notes.append(f"no sidecar {path.name}.json beside the engine")
    if prec not in PRECISIONS:
        raise UsageError(f"{flag} {path}: the engine's precision is not recorded (no sidecar {path.name}.json); pass "
                         f"--precision {'|'.join(PRECISIONS)}")
    if precision is not None and side is not None and side.get("precision") not in (None, precision):
        raise UsageError(f"--precision {precision}: the sidecar of {path} records {side.get('precision')}; drop "
                         "--precision")
    art.precision = "engine-" + prec
    return art


def _read_openvino(path: Path, flag: str) -> Artifact:
    """An OpenVINO IR from itae-export: its files checked, its facts from the sidecar and the source ONNX."""
    from .openvino_target import PRECISIONS
    from .ov_runner import check_ir_files, read_sidecar
    from .safe_io import sibling_file

    check_ir_files(path, flag)
    side = read_sidecar(path)
    if side is None or side.get("precision") not in PRECISIONS:
        raise UsageError(f"{flag} {path}: no itae-export sidecar {path.name}.json recording its precision beside it; "
                         f"re-export with itae-export MODEL --out {path.name}")
    art = Artifact(path=path, kind="openvino", label=str(path), sidecar=side)
    _fill_from(art, side)
    _fill_from(art, side.get("export") if isinstance(side.get("export"), dict) else None)
    art.has_metadata = art.model is not None
    src = sibling_file(path.parent, side["onnx"], f"{flag} {path}: its sidecar") if side.get("onnx") else None
    if src is not None and src.is_file():
        s = _read_onnx(src, "onnx", str(src), None, "the IR's source ONNX")
        for key in ("model", "img_size", "num_prefix_tokens", "weights", "weights_sha256", "depth", "input_name",
                    "flag_tensor"):
            if getattr(art, key) is None:
                setattr(art, key, getattr(s, key))
    else:
        art.notes.append("the ONNX the IR came from is not beside it: no flagged-token check")
    art.precision = "openvino-" + side["precision"]
    return art


class _OpenVinoSubject:
    """The IR compiled with its sidecar's compile_config; the ITAE flags as an extra output (by the
    source ONNX's tensor name, which OpenVINO keeps)."""

    def __init__(self, art: Artifact, want_flags: bool):
        from .ov_runner import import_openvino, sidecar_compile_config

        ov = import_openvino()
        core = ov.Core()
        model = core.read_model(str(art.path), str(art.path.with_suffix(".bin")))
        self.flags = bool(want_flags and art.flag_tensor)
        if self.flags:
            try:
                model.add_outputs([art.flag_tensor])
            except RuntimeError:  # the tensor did not survive conversion: no flag check
                self.flags = False
        self.compiled = core.compile_model(model, "CPU", sidecar_compile_config(art.sidecar or {}, art.path))
        self.art = art

    def run(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        feed = float_inputs(self.art, inputs)
        req = self.compiled.create_infer_request()
        embs, flags = [], []
        for i in range(0, len(feed), RUN_BATCH):
            res = req.infer({0: feed[i:i + RUN_BATCH]})
            embs.append(np.array(res[self.compiled.outputs[0]], dtype=np.float32))
            if self.flags:
                flags.append(np.array(res[self.compiled.outputs[-1]]).astype(bool))
        return np.concatenate(embs), (np.concatenate(flags) if flags else None)


def _source_onnx(engine: Path, sidecar: Path | None, side: dict, prov: dict | None) -> Path | None:
    rel = (side.get("onnx") or {}).get("file") if isinstance(side.get("onnx"), dict) else None
    cands = []
    if rel and sidecar is not None:
        cands.append(sidecar.parent / rel)
    if prov and prov.get("engine_sidecar") and rel:
        cands.append(Path(prov["engine_sidecar"]).parent / rel)
    for c in cands:
        if c.suffix == ".onnx" and c.is_file():
            return c.resolve()
    return None


# --------------------------------------------------------------------------------- identity, model
@dataclass(frozen=True)
class Weights:
    """Which weights the PyTorch reference is built from."""

    kind: str  # random | demo | file | cache
    seed: int = 0
    path: Path | None = None

    @property
    def label(self) -> str:
        if self.kind == "random":
            return f"random(seed={self.seed})"
        if self.kind == "demo":
            return f"demo-artifacts(seed={self.seed})"
        return self.path.name if self.path is not None else "cache"


def _recorded_weights(label: str) -> Weights | None:
    m = _SEEDED.match(label.strip())
    if m:
        return Weights("random" if m.group(1) == "random" else "demo", int(m.group(2)))
    if label.strip() == "cache":
        return Weights("cache")
    return None


def check_weights(art: Artifact, given: Weights | None, *, force: bool, notes: list[str]) -> Weights:
    """The weights to build the reference from: `given`, checked against the recorded identity (ModelError,
    exit 2, unless force), or the recorded identity itself when it can be rebuilt (seeded random, demo, cache)."""
    rec_label = art.weights
    where = art.label
    if given is None:
        if rec_label is None:
            raise UsageError(f"{where} records no weights identity; pass --weights FILE, --random-weights "
                             "[--seed N] or --demo-artifacts")
        rec = _recorded_weights(rec_label)
        if rec is None:
            raise UsageError(f"{where} was exported from the weights file {rec_label!r}; pass --weights PATH to "
                             "that file")
        notes.append(f"weights: {rec.label}, as recorded")
        return rec
    if rec_label is None:
        notes.append(f"weights: {where} records no weights identity, so {given.label} is not checked")
        return given
    why = _weights_mismatch(rec_label, art.weights_sha256, given)
    if why is None:
        return given
    if not force:
        raise ModelError(f"weights mismatch: {why}; nothing was compared; pass the weights it was exported from, "
                         "or --force to compare anyway")
    notes.append(f"weights mismatch ignored (--force): {why}")
    return given


def _weights_mismatch(rec_label: str, rec_sha: str | None, given: Weights) -> str | None:
    rec = _recorded_weights(rec_label)
    if rec is not None and rec.kind in ("random", "demo"):
        if given.kind == rec.kind and given.seed == rec.seed:
            return None
        return f"the artifact records weights {rec.label} but {given.label} was given"
    if given.kind != "file" or given.path is None:
        return f"the artifact records weights {rec_label!r} but {given.label} was given"
    if rec_sha is not None:
        from .embed import weights_digest

        got = weights_digest(given.path)["sha256"]
        if got == rec_sha:
            return None
        return (f"the artifact records weights {rec_label!r} with sha256 {rec_sha[:12]}..., but {given.path} has "
                f"sha256 {got[:12]}...")
    if rec is not None:  # "cache": exported from the hub / HF caches; a file name cannot be checked
        return None
    name = given.path.name
    if rec_label == name or rec_label.startswith(name + " "):  # "W.pth" or "W.pth (sha256=...)"
        return None
    return f"the artifact records weights {rec_label!r} but {given.path.name!r} was given"


@dataclass
class Plan:
    """Everything validate() resolved before any heavy work."""

    model: str | None
    img_size: int | None
    num_prefix: int | None
    depth: int | None
    itae: Any  # ITAEConfig | None
    weights: Weights | None
    tolerance: dict[str, float | None]


def _resolve_model(art: Artifact, model: str | None, img_size: int | None) -> tuple[str, int]:
    from .catalogue import CATALOGUE

    if model is not None and art.model is not None and model != art.model:
        raise UsageError(f"--model {model}: {art.label} records model {art.model}; drop --model")
    if img_size is not None and art.img_size is not None and img_size != art.img_size:
        raise UsageError(f"--img-size {img_size}: {art.label} records/takes {art.img_size} px; drop --img-size")
    name = art.model or model
    size = art.img_size if art.img_size is not None else img_size
    if name is None or (size is None):
        missing = " and ".join(f for f, v in (("--model", name), ("--img-size", size)) if v is None)
        raise UsageError(f"{art.label} has no itae-export metadata (model name, image size); pass {missing} to say "
                         "what it is")
    if name not in CATALOGUE:
        raise UsageError(f"model {name!r} is not in the catalogue; choose one of {', '.join(CATALOGUE)}")
    return name, int(size)


def _plan_reference(art: Artifact, model: str | None, img_size: int | None, weights: Weights | None) -> Plan:
    from graph_passes.config import ConfigError, ITAEConfig

    from .catalogue import CATALOGUE
    from .settings import check_img_size

    name, size = _resolve_model(art, model, img_size)
    spec = CATALOGUE[name]
    check_img_size(size, heads=spec.num_heads, batch=RUN_BATCH)
    prefix = 1 + spec.num_registers
    if art.num_prefix_tokens is not None and art.num_prefix_tokens != prefix:
        raise UsageError(f"{art.label} has {art.num_prefix_tokens} prefix tokens but {name} has {prefix} (CLS + "
                         f"{spec.num_registers} registers); check the model name")
    depth = art.depth if art.depth is not None and art.depth < spec.depth else None
    if art.depth is not None and art.depth > spec.depth:
        raise UsageError(f"{art.label} has {art.depth} attention blocks, more than {name}'s {spec.depth}; check the "
                         "model name")
    if depth is not None and weights is not None and weights.kind not in ("random", "demo"):
        raise ModelError(f"{art.label} has {art.depth} of {name}'s {spec.depth} blocks: a reduced-depth test model, "
                         "which only seeded random weights can rebuild")
    cfg = None
    if art.itae is not None:
        try:
            cfg = ITAEConfig.from_dict(art.itae, source=f"{art.label}'s recorded ITAE settings")
        except ConfigError as e:
            raise UsageError(str(e)) from None
    elif art.itae_structural:
        raise UsageError(f"{art.label} holds ITAE nodes but records no ITAE settings (itae.settings), so the PyTorch "
                         "reference cannot be rebuilt; compare it with --against another artifact instead")
    return Plan(name, size, prefix, depth, cfg, weights, tolerance_of(art))


def tolerance_of(art: Artifact) -> dict[str, float | None]:
    from .parity import tolerance_for

    return tolerance_for(art.precision)


# ------------------------------------------------------------------------------------------ inputs
@dataclass
class Inputs:
    x: np.ndarray | None  # float32 [N,3,S,S], ImageNet-normalised (None: random uint8, normalised per side)
    pixels: np.ndarray | None  # uint8 [N,S,S,3]
    names: list[str]
    source: str
    random: bool = False

    def __len__(self) -> int:
        return len(self.names)


def list_images(folder: str | Path) -> list[Path]:
    from .data import IMAGE_EXTENSIONS

    d = Path(folder)
    if not d.exists():
        raise DataError(f"--images {d} does not exist; give a folder of images")
    if not d.is_dir():
        raise DataError(f"--images {d} is not a folder; give a folder of images")
    try:
        files = sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    except OSError as e:
        raise DataError(f"--images {d} cannot be read ({e.strerror or e}); check its permissions") from None
    if not files:
        raise DataError(f"--images {d} holds no images ({', '.join(IMAGE_EXTENSIONS)}); give a folder of images")
    return files


def load_images(files: list[Path], img_size: int, folder: str | Path) -> Inputs:
    """Decode (safe_io.open_image_rgb) and crop like DINOv2's evaluation (data.Preprocess): uint8 pixels;
    x is Preprocess's own normalisation."""
    from .data import Preprocess
    from .safe_io import open_image_rgb

    prep = Preprocess(img_size=img_size)
    pixels, xs = [], []
    for f in files:
        img = open_image_rgb(f)
        pixels.append(np.asarray(prep.crop_image(img), dtype=np.uint8))
        xs.append(prep(img))
    names = [str(f.relative_to(folder)) for f in files]
    return Inputs(np.stack(xs).astype(np.float32), np.stack(pixels), names, f"{len(files)} images from {folder}")


def random_inputs(n: int, img_size: int, seed: int, uint8: bool) -> Inputs:
    """graph_options.reference_batch's inputs: uint8 [N,S,S,3] pixels or float32 normal [N,3,S,S]."""
    rng = np.random.default_rng(seed)
    names = [f"random[{i}]" for i in range(n)]
    if uint8:
        px = rng.integers(0, 256, size=(n, img_size, img_size, 3), dtype=np.uint8)
        return Inputs(None, px, names, f"{n} random uint8 images (seed {seed})", random=True)
    x = rng.standard_normal((n, 3, img_size, img_size)).astype(np.float32)
    return Inputs(x, None, names, f"{n} random normal inputs (seed {seed})", random=True)


def _mean_std(art: Artifact) -> tuple[tuple, tuple]:
    from .data import IMAGENET_MEAN, IMAGENET_STD

    rec = art.uint8 or {}
    return tuple(rec.get("mean") or IMAGENET_MEAN), tuple(rec.get("std") or IMAGENET_STD)


def float_inputs(art: Artifact, inputs: Inputs) -> np.ndarray:
    """The ImageNet-normalised float batch a float artifact (or PyTorch) gets for `inputs`."""
    if inputs.x is not None and (inputs.pixels is None or not art.takes_uint8):
        return inputs.x
    assert inputs.pixels is not None
    return normalise_pixels(inputs.pixels, *_mean_std(art))


# ----------------------------------------------------------------------------------------- runners
class _OnnxSubject:
    """ONNX Runtime on the artifact; with the ITAE comparison as an extra output in an in-memory copy of
    the graph (the file is never changed; weights are read from its folder)."""

    def __init__(self, art: Artifact, want_flags: bool):
        import onnxruntime as ort
        from onnx import TensorProto, helper

        from .fastpath import _inline_small_external

        self.art = art
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.flag_name = art.flag_tensor if want_flags else None
        try:
            if self.flag_name is None:
                self.session = ort.InferenceSession(str(art.path), opts, providers=["CPUExecutionProvider"])
            else:
                import onnx

                copy = onnx.ModelProto()
                copy.CopyFrom(art.proto)
                _inline_small_external(copy, art.path.parent)
                copy.graph.output.append(helper.make_tensor_value_info(self.flag_name, TensorProto.BOOL, None))
                opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                              str(art.path.parent.resolve()))
                self.session = ort.InferenceSession(copy.SerializeToString(), opts,
                                                    providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
            raise UsageError(f"ONNX Runtime cannot load {art.path} ({type(e).__name__}: {str(e)[:300]})") from None
        self.output = self.session.get_outputs()[0].name
        self.batch = art.fixed_batch or RUN_BATCH

    def run(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        feed = inputs.pixels if self.art.takes_uint8 else float_inputs(self.art, inputs)
        assert feed is not None
        if self.art.input_float16:
            feed = feed.astype(np.float16)
        names = [self.output] + ([self.flag_name] if self.flag_name else [])
        embs, flags = [], []
        for i in range(0, len(feed), self.batch):
            chunk = feed[i:i + self.batch]
            pad = self.batch - len(chunk) if self.art.fixed_batch else 0
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            try:
                outs = self.session.run(names, {self.art.input_name: chunk})
            except Exception as e:  # noqa: BLE001
                raise UsageError(f"ONNX Runtime failed on {self.art.path} ({type(e).__name__}: {str(e)[:300]})") \
                    from None
            n = len(chunk) - pad
            embs.append(np.asarray(outs[0])[:n])
            if self.flag_name:
                flags.append(np.asarray(outs[1])[:n])
        return np.concatenate(embs).astype(np.float32), (np.concatenate(flags) if flags else None)


class _EngineSubject:
    """A TensorRT engine through engine._make_engine_runner (TensorRT Python, else trtexec; else EngineError)."""

    def __init__(self, art: Artifact):
        from . import engine as eng

        s = art.img_size or 0
        name = art.input_name or "pixel_values"
        spec = eng.InputSpec(name, 3, s, s, None, ())
        self.art = art
        self.fn, self.runner = eng._make_engine_runner(art.path, spec, "auto", eng.find_trtexec())
        self.batch = max(1, min(art.engine_batch or RUN_BATCH, 32))

    def run(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        from .runtime import run_batched

        feed = inputs.pixels if self.art.takes_uint8 else float_inputs(self.art, inputs)
        assert feed is not None
        return run_batched(self.fn, feed, self.batch).astype(np.float32), None


def make_subject(art: Artifact, want_flags: bool):
    if art.kind == "openvino":
        return _OpenVinoSubject(art, want_flags)
    if art.is_engine:
        return _EngineSubject(art)
    return _OnnxSubject(art, want_flags)


# --------------------------------------------------------------------------------------- reference
def pytorch_reference(art: Artifact, plan: Plan, inputs: Inputs, *, input_seed: int, want_flags: bool,
                      extra: dict[str, np.ndarray] | None = None):
    """(embeddings, ITAE flags [N, 1|H, T] or None, {size: embeddings} of `extra`) of the PyTorch model
    built as the export built it. `extra`: float inputs at other sizes (a dynamic-size artifact; the
    model then interpolates its position embedding per input, as the official code does)."""
    import torch

    from .graph_options import GraphOptions, reference_batch
    from .reference import ITAEReference, last_block_stats
    from .runtime import run_batched

    w = plan.weights
    assert w is not None and plan.model is not None and plan.img_size is not None
    with torch.no_grad():
        if w.kind == "demo":
            from .demo import demo_model

            model = demo_model(plan.model, img_size=plan.img_size, seed=w.seed, depth=plan.depth)
        else:
            from .models import build_model

            model = build_model(plan.model, weights=w.path, random_weights=w.kind == "random", seed=w.seed,
                                img_size=plan.img_size, depth=plan.depth)
        if art.dynamic_size is not None:
            model.pos_mode = "official"
        reference = (ITAEReference(model, plan.itae) if plan.itae is not None else model).eval()

        def run(a: np.ndarray) -> np.ndarray:
            return reference(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))).numpy()

        seen: list[np.ndarray] = []

        def batched(a: np.ndarray) -> np.ndarray:
            seen.append(a)
            return run_batched(run, a, RUN_BATCH)

        if inputs.random:  # the export's own parity inputs and graph-option preprocessing
            mean, std = _mean_std(art)
            opts = GraphOptions(input_format="uint8-nhwc" if art.takes_uint8 else None,
                                l2_normalize=art.l2 is not None, mean=mean, std=std)
            given, out = reference_batch(opts, batched, batch=len(inputs), height=plan.img_size,
                                         width=plan.img_size, seed=input_seed)
            mine = inputs.pixels if art.takes_uint8 else inputs.x
            if mine is None or not np.array_equal(given, mine):  # one generator: a guard against drift
                raise RuntimeError("itae-validate's random inputs differ from graph_options.reference_batch's")
            x = seen[-1]
        else:
            x = float_inputs(art, inputs)
            out = batched(x)
            if art.l2 is not None:
                out = l2_normalise(out)
        flags = None
        if want_flags and plan.itae is not None:
            parts = [last_block_stats(model, torch.from_numpy(x[i:i + RUN_BATCH]), plan.itae)["flagged"]
                     for i in range(0, len(x), RUN_BATCH)]
            flags = np.concatenate(parts).astype(bool)
        sized = {k: run_batched(run, v, RUN_BATCH) for k, v in (extra or {}).items()}
        if art.l2 is not None:
            sized = {k: l2_normalise(v) for k, v in sized.items()}
    return np.asarray(out, dtype=np.float32), flags, sized


# ----------------------------------------------------------------------------------------- checks
def flag_agreement(ref: np.ndarray, other: np.ndarray, prefix: int, names: list[str]) -> tuple[float, list[dict], dict]:
    """Per image: is the set of flagged patch tokens the same? ref/other: [N, ..., T] bool (any layout whose
    last axis is the token axis; per-head scopes keep one row per head)."""
    n, t = ref.shape[0], ref.shape[-1]
    a = ref.reshape(n, -1, t)[..., prefix:].astype(bool)
    b = other.reshape(other.shape[0], -1, other.shape[-1])[..., prefix:].astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"flag layouts differ: {a.shape} vs {b.shape}")
    per: list[dict[str, Any]] = []
    for i in range(n):
        ra, rb = a[i].any(axis=0), b[i].any(axis=0)
        per.append({"index": i, "name": names[i], "same": bool(np.array_equal(a[i], b[i])),
                    "flagged_reference": int(ra.sum()), "flagged_artifact": int(rb.sum()),
                    "differ": int((a[i] != b[i]).any(axis=0).sum())})
    same = sum(p["same"] for p in per)
    totals = {"flagged_reference": int(sum(p["flagged_reference"] for p in per)),
              "flagged_artifact": int(sum(p["flagged_artifact"] for p in per)),
              "patch_tokens": int(n * (t - prefix)), "images_same": int(same)}
    return same / n, per, totals


def kmeans_check(ref: np.ndarray, other: np.ndarray, seed: int) -> tuple[Check, dict]:
    """k-means (k = min(10, N // 5)) on both sets: passed when the assignments agree (ARI >= 0.95, the fast
    path's target); skipped when k-means on the reference disagrees with itself across seeds as much
    (fastpath.verdict: no stable cluster structure, the ARI cannot measure the artifact)."""
    from .fastpath import TARGET_ARI, kmeans_agreement

    k = max(2, min(10, len(ref) // 5))
    agree = kmeans_agreement(ref, other, k=k, seed=seed)
    figs = {"k": k, **{key: agree[key] for key in ("assignment_ari", "seed_ari", "shared_init_ari")}}
    ari = agree["assignment_ari"]
    if ari >= TARGET_ARI:
        return Check("kmeans_ari", ari, TARGET_ARI, ">=", "passed", f"k={k}"), figs
    if agree["seed_ari"] < TARGET_ARI:
        return Check("kmeans_ari", ari, TARGET_ARI, ">=", "skipped",
                     f"not measurable: k-means on the reference itself gives ARI {agree['seed_ari']:.3f} between "
                     f"seeds {seed} and {seed + 1} (k={k}; no stable clusters in these inputs)"), figs
    return Check("kmeans_ari", ari, TARGET_ARI, ">=", "failed", f"k={k}; reference seed-to-seed ARI "
                 f"{agree['seed_ari']:.3f}"), figs


def _limit_check(name: str, value: float, limit: float | None, op: str, what: str = "") -> Check:
    if limit is None:
        return Check(name, value, None, op, "passed", what or "reported only at this precision")
    ok = value <= limit if op == "<=" else value >= limit
    ok = ok and math.isfinite(value)
    return Check(name, value, limit, op, "passed" if ok else "failed", what)


# ------------------------------------------------------------------------------------------- main
@dataclass(frozen=True)
class ValidateRequest:
    """validate()'s arguments, checked on construction (before any file is read beyond a stat)."""

    artifact: Path
    weights: Path | None = None
    random_weights: bool = False
    demo_artifacts: bool = False
    seed: int = 0
    images: Path | None = None
    n_random: int = 8
    input_seed: int = 0
    atol: float | None = None
    cos_min: float | None = None
    flag_agreement_min: float | None = None
    against: Path | None = None
    force: bool = False
    model: str | None = None
    img_size: int | None = None
    precision: str | None = None

    def __post_init__(self) -> None:
        from .engine import PRECISIONS
        from .settings import check_int

        for name in ("artifact", "weights", "images", "against"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        given = [f for f, on in (("--weights", self.weights is not None), ("--random-weights", self.random_weights),
                                 ("--demo-artifacts", self.demo_artifacts)) if on]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} exclude each other; give one")
        if self.against is not None and given:
            raise UsageError(f"--against compares two artifacts without PyTorch; drop {given[0]}")
        check_int(self.seed, "--seed", lo=0, hi=2**32 - 1)
        check_int(self.input_seed, "--input-seed", lo=0, hi=2**32 - 1)
        check_int(self.n_random, "--random", lo=1, hi=MAX_RANDOM)
        if self.img_size is not None:
            check_int(self.img_size, "--img-size", lo=14, hi=1792)
        for flag, v, lo, hi in (("--atol", self.atol, 0.0, math.inf), ("--cos-min", self.cos_min, -1.0, 1.0),
                                ("--flag-agreement-min", self.flag_agreement_min, 0.0, 1.0)):
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not lo <= v <= hi:
                raise UsageError(f"{flag} must be a number in [{lo}, {hi}], got {v!r}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision!r}: choose one of {', '.join(PRECISIONS)} (engines only)")
        if self.weights is not None and not self.weights.exists():
            raise UsageError(f"--weights {self.weights} does not exist")

    def given_weights(self) -> Weights | None:
        if self.weights is not None:
            return Weights("file", path=self.weights)
        if self.random_weights:
            return Weights("random", self.seed)
        if self.demo_artifacts:
            return Weights("demo", self.seed)
        return None


def run_validation(req: ValidateRequest) -> ValidationReport:
    """Resolve, refuse what cannot be compared, run, compare; returns the report (never raises ParityError)."""
    t0 = time.perf_counter()
    notes: list[str] = []
    art = resolve_artifact(req.artifact, precision=req.precision)
    other = resolve_artifact(req.against, "--against", precision=req.precision) if req.against is not None else None
    if other is not None and other.path.resolve() == art.path.resolve():
        raise UsageError(f"--against {req.against} is the artifact itself; give another artifact")
    inputs_files = list_images(req.images) if req.images is not None else None
    if other is None:
        weights = check_weights(art, req.given_weights(), force=req.force, notes=notes)
        plan = _plan_reference(art, req.model, req.img_size, weights)
    else:
        plan = _plan_against(art, other, req, notes)
    tol = dict(plan.tolerance)
    for key, v in (("max_abs", req.atol), ("cos_min", req.cos_min), ("flag_agreement", req.flag_agreement_min)):
        if v is not None:
            tol[key] = float(v)
    assert plan.img_size is not None
    uint8 = art.takes_uint8 or (other is not None and other.takes_uint8)
    if inputs_files is not None:
        assert req.images is not None
        inputs = load_images(inputs_files, plan.img_size, req.images)
    else:
        inputs = random_inputs(req.n_random, plan.img_size, req.input_seed, uint8)
    subject = make_subject(art, True)  # engines: EngineError (exit 4) before PyTorch is touched
    reference_runner = make_subject(other, True) if other is not None else None
    if other is None:
        from .api import require_torch

        require_torch()
    got, got_flags = subject.run(inputs)
    extra: dict[str, np.ndarray] = {}
    if reference_runner is not None:
        assert other is not None
        ref, ref_flags = reference_runner.run(inputs)
        if (art.l2 is None) != (other.l2 is None):  # one side L2-normalises: compare unit vectors
            ref, got = l2_normalise(ref), l2_normalise(got)
            notes.append("one artifact L2-normalises its output: both compared as unit vectors")
        reference = str(other.label)
    else:
        extra = _other_sizes(art, plan, req, notes)
        ref, ref_flags, ref_sized = pytorch_reference(art, plan, inputs, input_seed=req.input_seed,
                                                      want_flags=got_flags is not None, extra=extra)
        reference = "pytorch"
    report = ValidationReport(
        artifact=art.label, kind=art.kind, reference=reference, model=plan.model, img_size=plan.img_size,
        precision=art.precision if other is None else f"{art.precision} vs {other.precision}", tolerance=tol,
        weights=plan.weights.label if plan.weights is not None else art.weights, inputs=inputs.source,
        images=len(inputs), notes=notes + art.notes + (other.notes if other is not None else []))
    report.figures["itae"] = plan.itae.to_dict() if plan.itae is not None else None
    _compare_into(report, ref, got, ref_flags, got_flags, plan, inputs, tol, req, art)
    if other is None and extra:
        _compare_sizes(report, subject, extra, ref_sized, tol)
    report.seconds = time.perf_counter() - t0
    return report


def _other_sizes(art: Artifact, plan: Plan, req: ValidateRequest, notes: list[str]) -> dict[str, np.ndarray]:
    """Random float inputs at a dynamic-size artifact's other validation sizes (min, non-square, max:
    dynamic_size.SizeBounds.validation_sizes), keyed "HxW"; none for fixed-size or uint8 artifacts."""
    from .dynamic_size import SizeBounds

    if art.dynamic_size is None or plan.img_size is None:
        return {}
    if art.takes_uint8:
        notes.append("dynamic-size uint8 artifact: checked at its img_size only")
        return {}
    bounds = SizeBounds.from_metadata(art.dynamic_size)
    n = max(1, min(4, req.n_random))
    rng = np.random.default_rng(req.input_seed + 1)
    return {f"{h}x{w}": rng.standard_normal((n, 3, h, w)).astype(np.float32)
            for h, w in bounds.validation_sizes(plan.img_size) if (h, w) != (plan.img_size, plan.img_size)}


def _compare_sizes(report: ValidationReport, subject, extra: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                   tol: dict) -> None:
    """max_abs / cos_min checks at each other size of a dynamic-size artifact (figures under by_size)."""
    from .parity import compare

    by_size = report.figures.setdefault("by_size", {})
    for size, x in extra.items():
        names = [f"random[{i}]@{size}" for i in range(len(x))]
        got, _ = subject.run(Inputs(x, None, names, f"random normal inputs at {size}", random=True))
        parity = compare(ref[size], got)
        by_size[size] = parity.to_dict()
        report.checks.append(_limit_check(f"max_abs@{size}", parity.max_abs, tol.get("max_abs"), "<="))
        report.checks.append(_limit_check(f"cos_min@{size}", parity.cos_min, tol.get("cos_min"), ">="))


def _plan_against(art: Artifact, other: Artifact, req: ValidateRequest, notes: list[str]) -> Plan:
    """Two artifacts of the same model, size and weights (refused otherwise unless force for weights)."""
    from .parity import loosest

    for a in (art, other):
        if a.img_size is None and req.img_size is None:
            raise UsageError(f"{a.label} records no image size; pass --img-size")
    size_a = art.img_size or req.img_size
    size_b = other.img_size or req.img_size
    if size_a != size_b:
        raise UsageError(f"{art.label} takes {size_a} px but --against {other.label} takes {size_b} px; they cannot "
                         "get the same inputs")
    if art.model and other.model and art.model != other.model:
        raise UsageError(f"{art.label} is {art.model} but --against {other.label} is {other.model}")
    if art.weights and other.weights and art.weights != other.weights:
        why = f"{art.label} records weights {art.weights!r} but --against {other.label} records {other.weights!r}"
        if not req.force:
            raise ModelError(f"weights mismatch: {why}; nothing was compared; pass --force to compare anyway")
        notes.append(f"weights mismatch ignored (--force): {why}")
    if (art.itae is None) != (other.itae is None) or (art.itae and other.itae and art.itae != other.itae):
        notes.append(f"ITAE settings differ: {art.itae} vs {other.itae} (the comparison measures that difference)")
    tol = loosest(tolerance_of(art), tolerance_of(other))
    if not (art.flag_tensor and other.flag_tensor):
        tol["flag_agreement"] = None
    return Plan(art.model or other.model or req.model, size_a, art.num_prefix_tokens or other.num_prefix_tokens,
                None, None, None, tol)


def _compare_into(report: ValidationReport, ref: np.ndarray, got: np.ndarray, ref_flags, got_flags, plan: Plan,
                  inputs: Inputs, tol: dict, req: ValidateRequest, art: Artifact) -> None:
    from .parity import compare

    try:
        parity = compare(ref, got)
    except ValueError as e:
        raise ParityError(f"parity failed: {report.artifact}: output {e}") from None
    report.figures.update(parity.to_dict())
    report.checks.append(_limit_check("max_abs", parity.max_abs, tol.get("max_abs"), "<="))
    report.checks.append(_limit_check("cos_min", parity.cos_min, tol.get("cos_min"), ">="))
    report.checks.append(_flag_check(report, ref_flags, got_flags, plan, inputs, tol, art))
    if len(inputs) >= MIN_KMEANS_IMAGES:
        if np.all(np.isfinite(got)):
            check, figs = kmeans_check(ref, got, seed=0)
        else:
            check, figs = Check("kmeans_ari", None, 0.95, ">=", "failed", "non-finite outputs"), {}
        report.checks.append(check)
        report.figures["kmeans"] = figs
    else:
        report.notes.append(f"k-means agreement not computed: it needs at least {MIN_KMEANS_IMAGES} images "
                            f"(--images DIR or --random {MIN_KMEANS_IMAGES})")


def _flag_check(report: ValidationReport, ref_flags, got_flags, plan: Plan, inputs: Inputs, tol: dict,
                art: Artifact) -> Check:
    limit = tol.get("flag_agreement")
    if ref_flags is None or got_flags is None:
        if report.reference == "pytorch" and plan.itae is None:
            why = "the artifact has no ITAE"
        elif art.is_engine:
            why = "an engine does not expose the ITAE flag tensor"
        else:
            why = "the ITAE flag tensor is not available on both sides"
        return Check("flagged_agreement", None, limit, ">=", "skipped", why)
    try:
        agree, per, totals = flag_agreement(ref_flags, got_flags, plan.num_prefix or 1, inputs.names)
    except ValueError as e:
        return Check("flagged_agreement", None, limit, ">=", "skipped", str(e))
    report.per_image = per
    report.figures.update(totals)
    report.figures["flagged_agreement"] = agree
    what = f"{totals['images_same']}/{len(per)} images flag the same tokens"
    if limit is None:
        return Check("flagged_agreement", agree, None, ">=", "passed", what + "; reported only")
    return _limit_check("flagged_agreement", agree, limit, ">=", what)


def validate(artifact: str | Path, *, weights: str | Path | None = None, random_weights: bool = False,
             seed: int = 0, demo_artifacts: bool = False, images: str | Path | None = None, n_random: int = 8,
             input_seed: int = 0, atol: float | None = None, cos_min: float | None = None,
             flag_agreement_min: float | None = None, against: str | Path | None = None, force: bool = False,
             model: str | None = None, img_size: int | None = None, precision: str | None = None) -> ValidationReport:
    """Parity of `artifact` (.onnx, .engine/.plan, or a Triton model / version folder) against the PyTorch
    reference rebuilt from its metadata, or against another artifact (`against`, no PyTorch).

    Weights: by default the recorded identity (seeded random, demo, cache); `weights` / `random_weights`
    + `seed` / `demo_artifacts` are checked against it (ModelError unless `force`). Inputs: the images in
    `images` or `n_random` seeded random inputs. Returns a ValidationReport (false when a check failed);
    raises an ItaeError (UsageError, ModelError, DataError: exit 2; EngineError: exit 4) when it cannot
    compare at all.
    """
    def opt(p: str | Path | None) -> Path | None:
        return Path(p) if p is not None else None

    req = ValidateRequest(artifact=Path(artifact), weights=opt(weights), random_weights=random_weights,
                          demo_artifacts=demo_artifacts, seed=seed, images=opt(images), n_random=n_random,
                          input_seed=input_seed, atol=atol, cos_min=cos_min, flag_agreement_min=flag_agreement_min,
                          against=opt(against), force=force, model=model, img_size=img_size, precision=precision)
    return run_validation(req)


__all__ = ["Check", "ValidateRequest", "ValidationReport", "resolve_artifact", "run_validation", "validate"]
