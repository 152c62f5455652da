"""The model itae-embed runs: which backend a file needs (by suffix), whether it is an itae-export
artifact, the preprocessing its recorded settings ask for, and one digest that names it.

    .onnx            ONNX Runtime; metadata_props (graph_passes.metadata) say img_size and input format
    .engine / .plan  TensorRT (runtime.make_runner("tensorrt")); the builder's sidecar <engine>.json
    .xml             OpenVINO IR (runtime.make_runner("openvino")); the sidecar <model>.xml.json
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UsageError

SUFFIX_BACKENDS = {".onnx": "onnxruntime", ".engine": "tensorrt", ".plan": "tensorrt", ".xml": "openvino"}


def backend_for(path: str | Path) -> str:
    """The runtime backend of a model file, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_BACKENDS:
        raise UsageError(f"--model {path}: unknown model type {suffix or '(no suffix)'!r}; give an itae-export "
                         f"artifact ({', '.join(SUFFIX_BACKENDS)})")
    return SUFFIX_BACKENDS[suffix]


@dataclass(frozen=True)
class CollectionModel:
    """What itae-embed needs to know about --model (picklable: it travels to every Ray actor)."""

    path: str
    backend: str  # onnxruntime | tensorrt | openvino
    img_size: int
    input_format: str  # float32-nchw | uint8-nhwc
    digest: str  # sha256 over the model's files (an output folder belongs to one digest)
    name: str | None  # the DINOv2 model it was exported from
    itae: dict | None  # the ITAE settings it records (None: baseline)
    files: tuple[dict, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def _not_artifact(path: Path, why: str) -> UsageError:
    return UsageError(f"--model {path} is not an itae-export artifact ({why}); export one with itae-export "
                      "(or patch an ONNX with itae-patch) and pass that")


def _combined(files: list[dict]) -> str:
    listing = "".join(f"{d['sha256']}  {Path(d['path']).name}\n" for d in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def resolve_model(path: str | Path, img_size: int | None = None) -> CollectionModel:
    """Check --model and describe it; `img_size` is needed only when the artifact records none."""
    p = Path(path).absolute()
    backend = backend_for(p)
    if not p.is_file():
        raise UsageError(f"--model {p} does not exist or is not a file; give the path of an itae-export artifact")
    if backend == "onnxruntime":
        return _onnx_model(p, img_size)
    return _sidecar_model(p, backend, img_size)


def _onnx_model(p: Path, img_size: int | None) -> CollectionModel:
    from graph_passes import metadata as md
    from graph_passes.errors import PassError

    from .embed import onnx_identity

    ident = onnx_identity(p)  # checked load: external data inside the folder, present
    import onnx

    try:
        meta = md.read_metadata(onnx.load(str(p), load_external_data=False))
    except PassError as e:
        raise _not_artifact(p, str(e)) from None
    if meta.model is None and meta.img_size is None and meta.itae is None:
        raise _not_artifact(p, "its metadata has no itae_export entries")
    size = _image_size(p, meta.img_size, img_size, getattr(meta, "dynamic_size", None))
    fmt = "uint8-nhwc" if meta.input_format == "uint8-nhwc" else "float32-nchw"
    files = tuple(ident["files"])
    return CollectionModel(str(p), "onnxruntime", size, fmt, _combined(list(files)), meta.model, meta.itae, files)


def _within(size: int, bounds: dict | None) -> bool:
    """A dynamic-size artifact's {"min", "max", "multiple"} bounds admit `size`."""
    try:
        return bounds is not None and bounds["min"] <= size <= bounds["max"] and size % bounds["multiple"] == 0
    except (KeyError, TypeError, ZeroDivisionError):
        return False


def _image_size(p: Path, recorded: int | None, given: int | None, dynamic: dict | None = None) -> int:
    """The preprocessing size: the recorded one, or --img-size where the artifact records none or takes
    dynamic sizes that admit it."""
    if given is not None and _within(given, dynamic):
        return given
    if recorded is not None and given is not None and recorded != given:
        raise UsageError(f"--img-size {given} differs from the {recorded} px that --model {p} was exported for; "
                         "drop --img-size")
    size = recorded if recorded is not None else given
    if size is None:
        raise UsageError(f"--model {p} records no image size; pass --img-size PX (the size it was exported for)")
    return size


def _sidecar_model(p: Path, backend: str, img_size: int | None) -> CollectionModel:
    """Engines and OpenVINO IR: their identity lives in the sidecar JSON the builder writes beside them."""
    from .embed import file_digest

    side = Path(str(p) + ".json")
    if not side.is_file():
        raise _not_artifact(p, f"no sidecar {side.name} beside it, which itae-export writes")
    try:
        data = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _not_artifact(p, f"sidecar {side.name} is not readable JSON: {type(e).__name__}") from None
    if not isinstance(data, dict) or not any(k in data for k in ("model", "img_size", "itae")):
        raise _not_artifact(p, f"sidecar {side.name} records no model, img_size or itae entry")
    recorded = data.get("img_size")
    if recorded is not None and (isinstance(recorded, bool) or not isinstance(recorded, int) or recorded < 1):
        raise _not_artifact(p, f"sidecar {side.name} has img_size {recorded!r}, not a positive integer")
    size = _image_size(p, recorded, img_size)
    export: dict = data["export"] if isinstance(data.get("export"), dict) else {}
    uint8 = data.get("input_format") == "uint8-nhwc" or export.get("uint8_nhwc_input") is not None
    fmt = "uint8-nhwc" if uint8 else "float32-nchw"
    files = (file_digest(p), file_digest(side))
    return CollectionModel(str(p), backend, size, fmt, _combined(list(files)), data.get("model"), data.get("itae"),
                           files)


def make_model_runner(model: CollectionModel, threads: int | None = None, gpu: bool = False):
    """One runtime session for `model` (built inside each Ray actor)."""
    from .runtime import OrtRunner, make_runner

    if model.backend == "onnxruntime":
        return make_runner("ort-cuda", model.path) if gpu else OrtRunner(model.path, threads=threads)
    return make_runner(model.backend, model.path)
