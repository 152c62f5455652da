"""Every file is hostile: pickles with code payloads, damaged checkpoints, image bombs and garbage, and
ONNX external-data locations that point outside the model's folder. Each case builds its own file."""

from __future__ import annotations

import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image

from graph_passes.errors import UnsafeLocationError
from graph_passes.graph import check_external_data, resolve_external_location
from itae_export.data import load_dataset
from itae_export.errors import DataError, ModelError, UsageError
from itae_export.models import build_model
from itae_export.safe_io import load_onnx_checked, open_image_rgb, safe_pickle_load

# ------------------------------------------------------------------------------------------ pickles


def _global_call(module: str, name: str, arg: str) -> bytes:
    """A protocol-0 pickle of {b'data': module.name(arg), b'labels': [0]} (GLOBAL + REDUCE)."""
    return (b"(dp0\nS'data'\np1\nc" + module.encode() + b"\n" + name.encode() + b"\n(V" + arg.encode()
            + b"\ntRp2\nsS'labels'\np3\n(lp4\nI0\nas.")


class _Exec:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


class _System:
    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _cifar_dir(root: Path, payload: bytes) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "test_batch").write_bytes(payload)
    return d


def _hostile_payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    touch = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (_global_call("os", "system", touch), "os.system"),
        "posix.system": (_global_call("posix", "system", touch), "posix.system"),
        "builtins.eval": (_global_call("builtins", "eval", py), "builtins.eval"),
        "__builtin__.exec": (_global_call("__builtin__", "exec", py), "__builtin__.exec"),
        "builtins.getattr": (_global_call("builtins", "getattr", py), "builtins.getattr"),
        "subprocess.getoutput": (_global_call("subprocess", "getoutput", touch), "subprocess.getoutput"),
        "reduce-exec-p2": (pickle.dumps({b"data": _Exec(py), b"labels": [0]}, protocol=2), "__builtin__.exec"),
        "reduce-exec-p3": (pickle.dumps({b"data": _Exec(py), b"labels": [0]}, protocol=3), "builtins.exec"),
        "reduce-system-p4": (pickle.dumps({b"labels": [0], b"data": _System(touch)}, protocol=4), "posix.system"),
        "reduce-system-p5": (pickle.dumps([_System(touch)], protocol=5), "posix.system"),
    }


@pytest.mark.parametrize("kind", list(_hostile_payloads(Path("m"))))
def test_hostile_cifar_pickle_is_refused_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "PWNED"
    payload, forbidden = _hostile_payloads(marker)[kind]
    d = _cifar_dir(tmp_path / "data", payload)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "data")
    msg = str(e.value)
    assert str(d / "test_batch") in msg and forbidden in msg and "forbidden global" in msg
    assert "\n" not in msg
    assert not marker.exists()


def test_hostile_payload_is_real(tmp_path: Path) -> None:
    """The plain pickle module would run the payload; the restricted one does not."""
    marker = tmp_path / "PWNED"
    payload, _ = _hostile_payloads(marker)["reduce-exec-p2"]
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    (tmp_path / "p.pkl").write_bytes(payload)
    with pytest.raises(DataError, match="forbidden global __builtin__.exec"):
        safe_pickle_load(tmp_path / "p.pkl")
    assert not marker.exists()


def _cifar_batch(n: int, seed: int = 0) -> dict:
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return {b"data": data, b"labels": [i % 10 for i in range(n)], b"batch_label": b"testing batch 1 of 1"}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5, "numpy.core"])
def test_legitimate_cifar_pickle_still_loads(tmp_path: Path, protocol) -> None:
    batch = _cifar_batch(6)
    payload = pickle.dumps(batch, protocol=2 if protocol == "numpy.core" else protocol)
    if protocol == "numpy.core":  # the names numpy 1.x (and the official Python 2 files) use
        payload = payload.replace(b"numpy._core", b"numpy.core")
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in payload
    _cifar_dir(tmp_path, payload)
    ds = load_dataset("cifar10", tmp_path)
    assert len(ds) == 6 and list(ds.labels) == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.asarray(ds.load(1)), batch[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated", "huge-length", "bad-utf8", "deep", "object-array",
                                  "not-dict", "self-ref", "str-data", "bad-labels"])
def test_damaged_cifar_pickles_are_data_errors(tmp_path: Path, kind: str) -> None:
    good = pickle.dumps(_cifar_batch(4), protocol=2)
    payload = {
        "empty": b"",
        "garbage": os.urandom(64),
        "truncated": good[: len(good) // 2],
        "huge-length": b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"x.",
        "bad-utf8": b"\x80\x02X\x02\x00\x00\x00\xff\xfe.",
        "deep": b"(" * 200_000 + b"l" * 200_000 + b".",
        "object-array": pickle.dumps({b"data": np.array([1, "x"], dtype=object), b"labels": [0]}, protocol=2),
        "not-dict": pickle.dumps([1, 2, 3]),
        "self-ref": b"(lp0\ng0\na.",
        "str-data": pickle.dumps({b"data": np.array(["a"] * 3072).reshape(1, 3072), b"labels": [0]}),
        "bad-labels": pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": ["cat"]}),
    }[kind]
    d = _cifar_dir(tmp_path, payload)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path)
    assert str(d / "test_batch") in str(e.value) and "\n" not in str(e.value)


def test_stl10_sizes_checked_before_reading(tmp_path: Path) -> None:
    d = tmp_path / "stl10_binary"
    d.mkdir()
    np.zeros(2 * 3 * 96 * 96, np.uint8).tofile(d / "test_X.bin")
    np.asarray([1, 2, 3], np.uint8).tofile(d / "test_y.bin")
    with pytest.raises(DataError, match="3 labels .* for 2 images"):
        load_dataset("stl10", tmp_path)
    (d / "test_y.bin").unlink()
    (d / "test_y.bin").mkdir()
    with pytest.raises(DataError, match="test_y.bin is missing or not a regular file"):
        load_dataset("stl10", tmp_path)


def test_undecodable_text_file_is_a_data_error(tmp_path: Path) -> None:
    d = tmp_path / "tiny-imagenet-200"
    d.mkdir()
    (d / "wnids.txt").write_bytes(b"n0\xff\xfe\n")
    with pytest.raises(DataError, match="wnids.txt is not readable UTF-8"):
        load_dataset("tiny-imagenet", tmp_path)


# -------------------------------------------------------------------------------------- checkpoints


def _weights_error(path: Path) -> str:
    with pytest.raises(ModelError) as e:
        build_model("dinov2_vits14", weights=path, img_size=28)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_checkpoint_with_nan_names_the_key(tmp_path: Path) -> None:
    t = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    t[1, 2] = float("nan")
    torch.save({"blocks.0.attn.qkv.weight": t}, tmp_path / "nan.pth")
    assert "'blocks.0.attn.qkv.weight'" in _weights_error(tmp_path / "nan.pth")
    torch.save({"model": {"pos_embed": torch.full((2,), float("-inf"))}}, tmp_path / "inf.pth")
    assert "'pos_embed'" in _weights_error(tmp_path / "inf.pth")


def test_checkpoint_with_non_tensor_entry(tmp_path: Path) -> None:
    torch.save({"pos_embed": torch.zeros(2), "note": "hello"}, tmp_path / "a.pth")
    assert "'note'" in _weights_error(tmp_path / "a.pth")
    torch.save({"state_dict": {"pos_embed": torch.zeros(2), "epoch": 3}}, tmp_path / "b.pth")
    assert "'epoch'" in _weights_error(tmp_path / "b.pth")
    torch.save([torch.zeros(2)], tmp_path / "c.pth")
    assert "no state dict" in _weights_error(tmp_path / "c.pth")


def test_damaged_checkpoints(tmp_path: Path) -> None:
    torch.save({"pos_embed": torch.zeros(64)}, tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "zero.pth").write_bytes(b"")
    (tmp_path / "garbage.safetensors").write_bytes(os.urandom(100))
    (tmp_path / "huge-header.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    (tmp_path / "dir.pth").mkdir()
    for name in ("truncated.pth", "zero.pth", "garbage.safetensors", "huge-header.safetensors", "dir.pth"):
        _weights_error(tmp_path / name)


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
def test_checkpoint_code_payload_runs_nothing(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "PWNED"
    evil = {"pos_embed": torch.zeros(2), "x": _System(f"touch {marker}")}
    path = tmp_path / "evil.pth"
    if fmt == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps({"x": evil["x"]}, protocol=2))
    msg = _weights_error(path)
    assert "system" in msg or "could not read" in msg
    assert not marker.exists()


def test_safetensors_with_inf(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"cls_token": torch.tensor([1.0, float("inf")])}, str(tmp_path / "w.safetensors"))
    assert "'cls_token'" in _weights_error(tmp_path / "w.safetensors")


# ------------------------------------------------------------------------------------------- images


def _png_header(w: int, h: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _bad_images(tmp_path: Path) -> list[Path]:
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    files = {
        "zero.png": b"",
        "truncated.png": good.read_bytes()[:300],
        "text.jpg": b"this is not a jpeg, just some text\n" * 10,
        "bomb.png": _png_header(100_000, 100_000),
        "warn.png": _png_header(10_000, 10_000),  # between PIL's warning and error sizes, over ours
        "eps.jpg": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return [tmp_path / n for n in files]


def test_bad_images_are_data_errors(tmp_path: Path) -> None:
    for p in _bad_images(tmp_path):
        with pytest.raises(DataError) as e:
            open_image_rgb(p)
        assert str(p) in str(e.value) and "\n" not in str(e.value), p
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        open_image_rgb(tmp_path / "dir.png")


def test_image_over_a_lowered_limit(tmp_path: Path) -> None:
    p = tmp_path / "good.png"
    Image.fromarray(np.zeros((40, 30, 3), np.uint8)).save(p)
    assert open_image_rgb(p).size == (30, 40)
    with pytest.raises(DataError, match="30x40 pixels, over the 1000-pixel limit"):
        open_image_rgb(p, max_pixels=1000)


def test_imagefolder_load_goes_through_the_safe_decoder(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    (root / "cat").mkdir(parents=True)
    for p in _bad_images(tmp_path):
        p.rename(root / "cat" / p.name)
    ds = load_dataset("imagefolder", root)
    for i, p in enumerate(ds.images):
        if p.name == "good.png":
            assert ds.load(i).size == (64, 64)
            continue
        with pytest.raises(DataError, match=str(p)):
            ds.load(i)


# --------------------------------------------------------------------------------- ONNX external data


def _external_model(folder: Path, location: str, name: str = "m.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[4])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        w.external_data.add(key=k, value=v)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=[w])
    path = folder / name
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def hostile_models(tmp_path: Path):
    secret = tmp_path / "outside" / "secret.bin"
    secret.parent.mkdir()
    secret.write_bytes(b"TOP SECRET" + bytes(6))
    secret.chmod(0o600)
    (tmp_path / "secret.bin").write_bytes(secret.read_bytes())
    (tmp_path / "secret.bin").chmod(0o600)
    models = {
        "dotdot": _external_model(tmp_path / "dotdot", "../secret.bin"),
        "absolute": _external_model(tmp_path / "absolute", "/etc/passwd"),
        "symlink": _external_model(tmp_path / "symlink", "w.data"),
        "symlinked-folder": _external_model(tmp_path / "symfolder", "sub/w.data"),
    }
    (tmp_path / "symlink" / "w.data").symlink_to(secret)
    (tmp_path / "symfolder" / "sub").symlink_to(secret.parent, target_is_directory=True)
    return tmp_path, secret, models


CASES = ["dotdot", "absolute", "symlink", "symlinked-folder"]


@pytest.mark.parametrize("cli", ["patch", "inspect"])
@pytest.mark.parametrize("case", CASES)
def test_cli_refuses_external_data_outside_the_folder(hostile_models, capsys, cli: str, case: str) -> None:
    from itae_export.cli import inspect_main, patch_main

    tmp_path, secret, models = hostile_models
    src = models[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = _tree(tmp_path)
    secret_stat = (secret.stat().st_mode, secret.read_bytes())
    capsys.readouterr()
    if cli == "patch":
        rc = patch_main([str(src), "--out", str(outdir / "p.onnx"), "--check", "no"])
    else:
        rc = inspect_main([str(src)])
    err = capsys.readouterr().err
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(src) in lines[0] and ("outside" in lines[0] or "relative" in lines[0])
    assert "Traceback" not in err
    assert list(outdir.iterdir()) == []
    assert _tree(tmp_path) == before  # inputs byte-identical, nothing created anywhere above out/
    assert (secret.stat().st_mode, secret.read_bytes()) == secret_stat


@pytest.mark.parametrize("case", CASES)
def test_load_onnx_checked_refuses_outside_locations(hostile_models, case: str) -> None:
    tmp_path, secret, models = hostile_models
    before = _tree(tmp_path)
    with pytest.raises(UsageError) as e:
        load_onnx_checked(models[case])
    msg = str(e.value)
    assert str(models[case]) in msg and ("outside" in msg or "relative" in msg) and "\n" not in msg
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("location", ["", " ", ".", "./", "a/\x00b", "C:/w.data", "C:w.data", "w.data:stream",
                                      "\\\\server\\share\\w.data", "..\\secret.bin", "sub/../../x", "/abs"])
def test_unsafe_location_strings(tmp_path: Path, location: str) -> None:
    with pytest.raises(UnsafeLocationError, match="relative path"):
        resolve_external_location(tmp_path, location)


def test_location_targets(tmp_path: Path) -> None:
    model = tmp_path / "m" / "m.onnx"
    model.parent.mkdir()
    model.write_bytes(b"x")
    (tmp_path / "m" / "w.data").write_bytes(bytes(16))
    (tmp_path / "m" / "sub" / "w.data").mkdir(parents=True)
    (tmp_path / "secret").write_bytes(b"s")
    (tmp_path / "m" / "a\\b").symlink_to(tmp_path / "secret")  # a literal backslash name on POSIX
    (tmp_path / "m" / "loop").symlink_to(tmp_path / "m" / "loop")
    base = tmp_path / "m"
    assert resolve_external_location(base, "w.data") == (base / "w.data").resolve()
    with pytest.raises(UnsafeLocationError, match="the .onnx file itself"):
        resolve_external_location(base, "m.onnx", model)
    with pytest.raises(UnsafeLocationError, match="folder or a special file"):
        resolve_external_location(base, "sub/w.data")
    with pytest.raises(UnsafeLocationError, match="outside"):
        resolve_external_location(base, "a\\b")
    with pytest.raises(UnsafeLocationError):
        resolve_external_location(base, "loop")


def test_external_data_in_sparse_and_attribute_tensors_is_checked(tmp_path: Path) -> None:
    path = _external_model(tmp_path / "m", "w.data")
    model = onnx.load(str(path), load_external_data=False)
    assert check_external_data(model, path.parent) == [(path.parent / "w.data").resolve()]
    values = TensorProto(name="sv", data_type=TensorProto.FLOAT, dims=[1])
    values.data_location = TensorProto.EXTERNAL
    values.external_data.add(key="location", value="../secret.bin")
    sparse = helper.make_sparse_tensor(values, helper.make_tensor("si", TensorProto.INT64, [1], [0]), [4])
    model.graph.sparse_initializer.append(sparse)
    with pytest.raises(UnsafeLocationError, match="'../secret.bin'"):
        check_external_data(model, path.parent)
    del model.graph.sparse_initializer[:]
    const = helper.make_node("Constant", [], ["c"], value=values)
    model.functions.append(helper.make_function("d", "f", [], ["c"], [const], [helper.make_opsetid("", 17)]))
    with pytest.raises(UnsafeLocationError, match="'../secret.bin'"):
        check_external_data(model, path.parent)


def test_load_onnx_checked_refuses_self_reference(tmp_path: Path) -> None:
    path = _external_model(tmp_path / "m", "m.onnx")
    with pytest.raises(UsageError, match="the .onnx file itself"):
        load_onnx_checked(path)


def test_read_json_object_refusals(tmp_path):
    from itae_export.errors import DataError, DeployError, UsageError
    from itae_export.safe_io import read_json_object

    f = tmp_path / "side.json"
    f.write_text('{"a": 1}')
    assert read_json_object(f, "sidecar", "re-export") == {"a": 1}
    f.write_text("[1, 2]")
    with pytest.raises(DeployError, match=r"side.json must hold a JSON object, not list; rebuild"):
        read_json_object(f, "engine sidecar", "rebuild", err=DeployError)
    f.write_text("{nope")
    with pytest.raises(UsageError, match="is not valid JSON .*; re-export"):
        read_json_object(f, "sidecar", "re-export")
    f.write_text(" " * 2048 + "{}")
    with pytest.raises(DataError, match="sidecar"):
        read_json_object(f, "sidecar", "re-export", max_bytes=1024)


def test_sibling_file_stays_beside(tmp_path):
    from itae_export.errors import UsageError
    from itae_export.safe_io import sibling_file

    (tmp_path / "m.onnx").write_bytes(b"x")
    assert sibling_file(tmp_path, "m.onnx", "sidecar") == tmp_path / "m.onnx"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "link.onnx").symlink_to(tmp_path / "m.onnx")
    for bad in ("", ".", "..", "../m.onnx", "sub/link.onnx", "a\\b", "/etc/passwd", "m\x00", 3, None):
        with pytest.raises(UsageError, match="sidecar names"):
            sibling_file(tmp_path, bad, "sidecar")
    with pytest.raises(UsageError, match="links out of the folder"):
        sibling_file(tmp_path / "sub", "link.onnx", "sidecar")
    (tmp_path / "loop.onnx").symlink_to(tmp_path / "loop.onnx")
    with pytest.raises(UsageError, match="sidecar names"):
        sibling_file(tmp_path, "loop.onnx", "sidecar")
