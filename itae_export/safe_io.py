"""Reading files that may be hostile: ONNX graphs (external-data locations), pickles, checkpoints,
images. Every refusal is an ItaeError naming the file and what to do."""

from __future__ import annotations

import codecs
import pickle
import re
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graph_passes.errors import UnsafeLocationError
from graph_passes.graph import check_external_data

from .errors import DataError, ModelError, UsageError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

MAX_PICKLE_BYTES = 1 << 30  # CIFAR-100's train file, the largest official batch, is 155 MB
MAX_TEXT_BYTES = 64 << 20
MAX_CHECKPOINT_BYTES = 32 << 30  # ViT-g/14 in fp32 is 4.5 GB
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP")  # no EPS (Ghostscript) or other exotic decoders
_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings is process-wide; iter_batches opens in threads


def _short(e: BaseException) -> str:
    """`Type: first line of the message`, at most 160 characters, for one-sentence errors."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _regular_file(path: Path, what: str, max_bytes: int, err: type) -> int:
    """Size of `path`, refusing a missing, non-regular, empty or oversized file."""
    if path.is_dir():
        raise err(f"{what} {path} is a directory, not a file; give the path of the file itself")
    if not path.is_file():
        raise err(f"{what} {path} does not exist or is not a regular file; check the path")
    size = path.stat().st_size
    if size == 0:
        raise err(f"{what} {path} is empty (0 bytes); replace it with an intact copy")
    if size > max_bytes:
        raise err(f"{what} {path} is {size} bytes, over the {max_bytes}-byte limit for such a file; check the path")
    return size


# ---------------------------------------------------------------------------------------------- pickles


class _NdarrayToken:
    """Stands for numpy.ndarray inside a pickle: usable only as _reconstruct's first argument, so a
    pickle cannot call ndarray(shape=...) to allocate memory it does not carry."""


_NP_RECONSTRUCT = np.zeros(0).__reduce__()[0]  # numpy.(_)core.multiarray._reconstruct


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NdarrayToken or int(np.prod(shape)) > 1:
        raise pickle.UnpicklingError("numpy _reconstruct called with arguments numpy never writes")
    return _NP_RECONSTRUCT(np.ndarray, shape, dtype)


def _latin1_encode(obj, encoding="utf-8"):
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} (numpy writes latin1)")
    return codecs.encode(obj, encoding)


def _pickle_globals() -> dict[tuple[str, str], object]:
    """The globals CIFAR's numpy pickles reference, under numpy 1.x (numpy.core) and 2.x (numpy._core)
    names; the functions are taken from numpy's own reductions so no module is imported by name."""
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    table: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): _NdarrayToken,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return table


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle references a global outside the allow-list."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"forbidden global {name}")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals of CIFAR's batch files; dict, list, bytes, str,
    int, float, tuple are native opcodes. Every other global (os.system, builtins.eval, ...) and every
    persistent id raises ForbiddenGlobal before anything is called."""

    ALLOWED = _pickle_globals()

    def find_class(self, module: str, name: str):
        obj = self.ALLOWED.get((module, name))
        if obj is None:
            raise ForbiddenGlobal(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise ForbiddenGlobal(f"persistent id {str(pid)[:40]!r}")


def _check_plain(obj, path: Path) -> None:
    """Refuse object arrays and anything that is not a dict/list/tuple of plain values or arrays."""
    stack, seen, visited = [obj], 0, set()
    while stack:
        x = stack.pop()
        seen += 1
        if seen > 10_000_000:
            raise DataError(f"{path} holds over 10 million objects; it is not a data batch file")
        if isinstance(x, (dict, list, tuple)):
            if id(x) in visited:  # shared or self-referencing containers are walked once
                continue
            visited.add(id(x))
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, (np.ndarray, np.generic)):
            if x.dtype.hasobject:
                raise DataError(f"{path} holds a numpy object array; replace it with the official file")
        elif x is not None and not isinstance(x, (bytes, str, int, float, bool)):
            raise DataError(f"{path} holds a {type(x).__name__}, not plain data; replace it")


def safe_pickle_load(path: str | Path, what: str = "readable pickle", max_bytes: int = MAX_PICKLE_BYTES):
    """Unpickle `path` (encoding="bytes", as for CIFAR's Python 2 batches) with RestrictedUnpickler,
    turning every failure (forbidden global, truncation, garbage, deep nesting, memory) into DataError."""
    p = Path(path)
    _regular_file(p, what, max_bytes, DataError)
    try:
        with open(p, "rb") as f:
            obj = RestrictedUnpickler(f, encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise DataError(
            f"{p} was refused as a {what}: it references the forbidden global {e.name}, which could run code; "
            "use the official release file"
        ) from None
    except Exception as e:  # noqa: BLE001 - pickle raises many types (RecursionError, MemoryError too)
        raise DataError(f"{p} is not a {what} ({_short(e)}); replace it with an intact copy") from None
    _check_plain(obj, p)
    return obj


def read_text_checked(path: str | Path, what: str = "text file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """UTF-8 text of a small file; a missing, huge or undecodable file is a DataError naming it."""
    p = Path(path)
    if p.is_file() and p.stat().st_size == 0:
        return ""
    _regular_file(p, what, max_bytes, DataError)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {p} is not readable UTF-8 text ({_short(e)}); replace it") from None


def read_json_object(path: str | Path, what: str, hint: str, *, err: type = UsageError,
                     max_bytes: int = MAX_TEXT_BYTES) -> dict:
    """The JSON object in a small file (a sidecar, a provenance record): a huge or undecodable file is a
    DataError (read_text_checked); invalid JSON or another JSON value is `err` naming the file, then `hint`
    (what to do)."""
    import json

    try:
        data = json.loads(read_text_checked(path, what, max_bytes))
    except json.JSONDecodeError as e:
        raise err(f"{what} {path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(data, dict):
        raise err(f"{what} {path} must hold a JSON object, not {type(data).__name__}; {hint}")
    return data


def sibling_file(folder: str | Path, name: object, what: str) -> Path:
    """The file `name` in `folder`, where a sidecar names a file beside it: a plain file name (no folder
    part, no '..', no drive), which (symlinks followed) stays in `folder`. UsageError otherwise: `what`
    says which file named it."""
    base = Path(folder)
    bad = (not isinstance(name, str) or name.strip() in ("", ".", "..") or any(c in name for c in "/\\:\x00"))
    if not bad:
        try:
            bad = (base / str(name)).resolve().parent != base.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            bad = True
    if bad:
        raise UsageError(f"{what} names {name!r} as a file beside it, but that is not a plain file name in {base} "
                         "(folders, '..' and links out of the folder are refused); re-export it")
    return base / str(name)


# ----------------------------------------------------------------------------------------------- images


def open_image_rgb(path: str | Path, max_pixels: int = MAX_IMAGE_PIXELS,
                   formats: tuple[str, ...] = IMAGE_FORMATS) -> PILImage:
    """Decode an image file to RGB, refusing more than `max_pixels` pixels (checked from the header,
    before decoding), formats outside `formats`, and corrupt, truncated or empty files (DataError)."""
    p = Path(path)
    _regular_file(p, "image", 1 << 40, DataError)
    return _decode_rgb(p, str(p), max_pixels, formats)


def open_image_bytes_rgb(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS,
                         formats: tuple[str, ...] = IMAGE_FORMATS) -> PILImage:
    """open_image_rgb for an encoded image held in memory (a Parquet image-bytes cell); `name` is what
    the messages call it."""
    import io

    if not data:
        raise DataError(f"image {name} is empty (0 bytes); replace it with an intact copy")
    return _decode_rgb(io.BytesIO(data), name, max_pixels, formats)


def _decode_rgb(source, name: str, max_pixels: int, formats: tuple[str, ...]) -> PILImage:
    from PIL import Image

    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source, formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"image {name} is too large to decode safely ({_short(e)}); resize it") from None
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError... for garbage
        raise DataError(f"image {name} is not a readable {'/'.join(formats)} image ({_short(e)}); replace it") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0 or w * h > max_pixels:
            raise DataError(f"image {name} is {w}x{h} pixels, over the {max_pixels}-pixel limit; resize it")
        try:
            return im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data
            raise DataError(f"image {name} is corrupt or truncated ({_short(e)}); replace it") from None


# ---------------------------------------------------------------------------------------------- tensors


def _torch_load(p: Path):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        if m:
            raise ModelError(
                f"weights file {p} was refused: its pickle references {m.group(1)}, which could run code; "
                "use an official DINOv2 .pth or a .safetensors file"
            ) from None
        raise


def load_tensor_file(path: str | Path, flag: str = "--weights", max_bytes: int = MAX_CHECKPOINT_BYTES):
    """The object in a .pth (torch.load weights_only=True) or .safetensors file; any reader failure
    (garbage, truncated, empty, directory, refused pickle) is one ModelError naming the file."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{flag} {p} does not exist; pass the path of a DINOv2 .pth or .safetensors file")
    _regular_file(p, f"{flag}", max_bytes, ModelError)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        return _torch_load(p)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure (MemoryError, RecursionError too) is one problem
        raise ModelError(
            f"could not read weights file {p} ({_short(e)}); pass an official DINOv2 .pth or a timm .safetensors"
        ) from None


def check_tensor_dict(sd, path: str | Path) -> dict:
    """Refuse a state dict whose keys are not strings or whose values are not finite dense tensors."""
    import torch

    if not isinstance(sd, dict) or not sd:
        raise ModelError(f"weights file {path} holds no state dict (a dict of tensors); pass a DINOv2 checkpoint")
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ModelError(f"weights file {path} has a non-string key {str(k)[:60]!r}; pass a DINOv2 checkpoint")
        if not isinstance(v, torch.Tensor):
            raise ModelError(
                f"weights file {path}: entry {k!r} is a {type(v).__name__}, not a tensor; pass a plain state dict"
            )
        if v.layout != torch.strided or v.is_meta or v.is_complex():
            raise ModelError(f"weights file {path}: tensor {k!r} is not a dense real tensor; re-save the checkpoint")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ModelError(f"weights file {path}: tensor {k!r} holds NaN or Inf values; the checkpoint is damaged")
    return sd


# ------------------------------------------------------------------------------------------------- ONNX


def load_onnx_checked(path: str | Path, flag: str = "input"):
    """Load an ONNX graph without its external weights, with clear errors for bad files, and check
    that every external-data location stays inside the model's folder."""
    return load_onnx_with_data(path, flag)[0]


def load_onnx_with_data(path: str | Path, flag: str = "input"):
    """load_onnx_checked, plus the external data files the graph references (checked to lie inside
    its folder; they may be missing)."""
    import onnx

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {p} does not exist; give the path of an .onnx file")
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give the path of an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage
        raise UsageError(f"{flag} {p} is not an ONNX model ({type(e).__name__}); give an .onnx file") from e
    if not model.graph.node:
        raise UsageError(f"{flag} {p} is not an ONNX model (no graph nodes); give an .onnx file")
    try:
        files = check_external_data(model, p.parent, model_file=p)
    except UnsafeLocationError as e:
        raise UsageError(f"{flag} {p}: {e}") from None
    return model, files
