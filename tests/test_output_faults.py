"""CLI-level fault tests on real files and real processes: concurrent writers of one --out, SIGTERM
and SIGKILL in the middle of an export (and of a --force overwrite), read-only and full output file
systems, and the permission bits of what is written. The model is the tiny random DINOv2 (depth 2,
56 px); exports run as `python -m itae_export.cli` subprocesses where a signal or a second process is
involved, else in-process."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import mounted_tmpfs

pytest.importorskip("onnxruntime")

from itae_export import outputs  # noqa: E402
from itae_export.cli import export_main, patch_main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = ["dinov2_vits14", "--random-weights", "--depth", "2", "--img-size", "56"]
TIMEOUT = 300


# ------------------------------------------------------------------------------------------ helpers
def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "itae_export.cli", *TINY, *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)


def _one_error_line(err: str, prog: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:") and "Traceback" not in err, err
    return lines[0]


def _ours(d: Path) -> list[str]:
    """Staging and lock folders in `d`."""
    return sorted(n for n in os.listdir(d) if n.startswith((outputs.STAGING_PREFIX, outputs.CLAIM_PREFIX)))


def _wait_for_staging(p: subprocess.Popen, d: Path) -> bool:
    """Poll until a staging folder appears in `d` (True) or the process ends (False)."""
    deadline = time.monotonic() + TIMEOUT
    while p.poll() is None and time.monotonic() < deadline:
        if any(n.startswith(outputs.STAGING_PREFIX) for n in os.listdir(d)):
            return True
        time.sleep(0.005)
    return False


def _wait_for_line(p: subprocess.Popen, prefix: str) -> bool:
    """Read stdout until a line starting with `prefix` (True) or its end (False)."""
    assert p.stdout is not None
    for line in p.stdout:
        if line.lstrip().startswith(prefix):
            return True
    return False


def _finish(p: subprocess.Popen) -> tuple[int, str]:
    _, err = p.communicate(timeout=TIMEOUT)
    return p.returncode, err


def _digest(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


X = np.random.default_rng(11).standard_normal((2, 3, 56, 56)).astype(np.float32)


def _run(path: Path) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: X})[0]


def _export(out: Path, *extra: str) -> int:
    return export_main([*TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """An export with seed 0 ("old") and one with seed 1 ("new"), and their outputs on X."""
    d = tmp_path_factory.mktemp("artifacts")
    res = {}
    for name, seed in (("old", "0"), ("new", "1")):
        out = d / name / "m.onnx"
        assert _export(out, "--seed", seed) == 0
        res[name] = out
        res[name + "_y"] = _run(out)
    assert not np.allclose(res["old_y"], res["new_y"])
    return res


# ------------------------------------------------------------------------------ concurrent writers
def test_two_concurrent_exports_to_one_out(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    procs = [_popen("--out", str(out)) for _ in range(2)]
    results = [_finish(p) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 6], results
    loser = next(err for rc, err in results if rc == 6)
    line = _one_error_line(loser, "itae-export")
    assert str(out) in line and "being written" in line
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # complete, and no staging or lock folder left
    onnx.checker.check_model(str(out))
    assert np.isfinite(_run(out)).all()


# ------------------------------------------------------------------------------------------ signals
def test_sigterm_when_the_staging_folder_appears(tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.onnx"
    p = _popen("--out", str(out))
    assert _wait_for_staging(p, tmp_path), _finish(p)
    p.send_signal(signal.SIGTERM)
    rc, err = _finish(p)
    assert rc == 143, err
    assert "SIGTERM" in _one_error_line(err, "itae-export")
    assert os.listdir(tmp_path) == []
    assert _export(out) == 0  # the rerun succeeds
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_sigterm_during_the_exporter(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    p = _popen("--out", str(out))
    assert _wait_for_line(p, "[2/4]"), _finish(p)
    time.sleep(0.5)  # inside torch.onnx.export (it takes seconds even for the tiny model)
    p.send_signal(signal.SIGTERM)
    rc, err = _finish(p)
    assert os.listdir(tmp_path) == []
    assert rc == 143, err
    _one_error_line(err, "itae-export")


def test_terminated_is_not_swallowed_by_except_exception() -> None:
    """The mechanism of the two tests above, in-process: the handler raises inside third-party code."""
    old = signal.getsignal(signal.SIGTERM)
    outputs.install_signal_handlers()
    swallowed = False
    try:
        try:
            try:
                signal.raise_signal(signal.SIGTERM)
                time.sleep(0.01)
            except Exception:  # noqa: BLE001 - as torch's import and the exporters do
                swallowed = True
        except BaseException:  # noqa: BLE001 - reached only when Terminated is not an Exception
            pass
    finally:
        signal.signal(signal.SIGTERM, old)
    assert not swallowed


def test_sigkill_mid_export_then_rerun(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    p = _popen("--out", str(out))
    assert _wait_for_line(p, "[2/4]"), _finish(p)  # the staging folder holds a half-written export
    assert _ours(tmp_path)
    p.kill()
    p.wait(TIMEOUT)
    assert not out.exists() and _ours(tmp_path)  # the dead run's staging/lock folders
    assert _export(out) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]  # swept: no staging or lock folder left
    assert np.isfinite(_run(out)).all()


@pytest.mark.parametrize("marker", ["[3/4]", "[4/4]"])
def test_sigkill_during_a_force_overwrite_leaves_old_or_new(tmp_path: Path, artifacts, marker: str) -> None:
    out = tmp_path / "m.onnx"
    shutil.copyfile(artifacts["old"], out)
    p = _popen("--out", str(out), "--seed", "1", "--force")
    assert _wait_for_line(p, marker), _finish(p)  # "[4/4]": validation done, the commit follows at once
    p.kill()
    p.wait(TIMEOUT)
    onnx.checker.check_model(str(out))
    y = _run(out)
    assert np.allclose(y, artifacts["old_y"], atol=1e-5) or np.allclose(y, artifacts["new_y"], atol=1e-5)
    assert _export(out, "--seed", "1", "--force") == 0  # and a rerun cleans up after the dead one
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    np.testing.assert_allclose(_run(out), artifacts["new_y"], atol=1e-5)


def test_a_lock_file_probed_by_a_sweeper_while_it_is_created(tmp_path: Path, monkeypatch) -> None:
    real = fcntl.flock
    probed: list[str] = []

    def flock(fd, op):
        if not probed and op == fcntl.LOCK_EX | fcntl.LOCK_NB:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if path.endswith("/" + outputs.LOCK_NAME) and os.path.getsize(path) == 0:
                probed.append(path)
                probe = os.open(path, os.O_RDONLY)  # what a concurrent sweep's _dead_lock does at this moment
                try:
                    real(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return real(fd, op)
                finally:
                    os.close(probe)
        return real(fd, op)

    monkeypatch.setattr(outputs.fcntl, "flock", flock)
    with outputs.OutputTransaction(tmp_path / "x.txt") as tx:
        tx.stage_path().write_text("x")
        tx.add(tx.stage_path())
        tx.commit()
    assert probed and (tmp_path / "x.txt").read_text() == "x"


# ------------------------------------------------------------------------- read-only and full disks
@pytest.fixture
def small_fs(tmp_path: Path):
    """A 64 KiB tmpfs at tmp_path/mnt (root only); unmounted afterwards in every case."""
    with mounted_tmpfs(tmp_path / "mnt", "64k") as mnt:
        yield mnt


def _make_readonly(mnt: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def base_onnx(tmp_path_factory) -> Path:
    """An unpatched tiny export with its weights in an external .data file (the itae-patch input)."""
    d = tmp_path_factory.mktemp("base")
    inline = d / "inline.onnx"
    assert _export(inline, "--no-itae") == 0
    src = d / "base.onnx"
    onnx.save_model(onnx.load(str(inline)), str(src), save_as_external_data=True, location="base.onnx.data")
    inline.unlink()
    return src


@pytest.mark.parametrize("kind", [
    "read-only",
    "full",
])
def test_export_to_an_unwritable_file_system(tmp_path: Path, small_fs: Path, kind: str, capsys) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text('{"itae": {"relative_threshold": 2.0}}\n')
    before = _digest([settings])
    if kind == "read-only":
        _make_readonly(small_fs)
    out = small_fs / "m.onnx"
    capsys.readouterr()
    rc = _export(out, "--settings", str(settings))
    err = capsys.readouterr().err
    assert os.listdir(small_fs) == []
    assert _digest([settings]) == before
    assert rc == 5, err
    assert str(out) in _one_error_line(err, "itae-export")


@pytest.mark.parametrize("kind", ["read-only", "full"])
@pytest.mark.parametrize("copy", [False, True])
def test_patch_to_an_unwritable_file_system(small_fs: Path, base_onnx: Path, kind: str, copy: bool,
                                            capsys) -> None:
    inputs = [base_onnx, base_onnx.parent / "base.onnx.data"]
    before = _digest(inputs)
    if kind == "read-only":
        _make_readonly(small_fs)
    out = small_fs / "p.onnx"
    capsys.readouterr()
    rc = patch_main([str(base_onnx), "--out", str(out)] + (["--copy-weights"] if copy else []))
    err = capsys.readouterr().err
    assert rc == 5, err
    assert str(out) in _one_error_line(err, "itae-patch")
    assert os.listdir(small_fs) == []
    assert _digest(inputs) == before


# -------------------------------------------------------------------------------------------- modes
def _modes(d: Path) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in d.iterdir()}


def test_patch_of_a_0600_input_is_never_wider(tmp_path: Path, base_onnx: Path) -> None:
    src_dir = tmp_path / "in"
    src_dir.mkdir()
    for f in (base_onnx, base_onnx.parent / "base.onnx.data"):
        shutil.copyfile(f, src_dir / f.name)
        os.chmod(src_dir / f.name, 0o600)
    out = tmp_path / "out" / "p.onnx"
    assert patch_main([str(src_dir / "base.onnx"), "--out", str(out), "--copy-weights"]) == 0
    modes = _modes(out.parent)
    assert set(modes) == {"p.onnx", "p.onnx.data"}
    assert all(m & ~0o600 == 0 for m in modes.values()), {k: oct(v) for k, v in modes.items()}
    assert _modes(src_dir) == {"base.onnx": 0o600, "base.onnx.data": 0o600}  # inputs untouched


def test_a_normal_export_is_0644(tmp_path: Path) -> None:
    out = tmp_path / "new" / "m.onnx"
    with _umask(0o022):
        assert _export(out, "--fast-path", "fused") == 0
    modes = _modes(out.parent)
    assert "m.onnx" in modes and "m.fp32.onnx" in modes
    assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o755


@contextlib.contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_engine_build_script_is_executable(tmp_path: Path, capsys) -> None:
    rc = _export(tmp_path / "m.engine")  # exit 4 without TensorRT/GPU: the ONNX and the script are written
    assert rc in (0, 3, 4), capsys.readouterr().err
    script = tmp_path / "build_engine.sh"
    assert script.is_file() and os.access(script, os.X_OK), oct(stat.S_IMODE(script.stat().st_mode))


def test_unwritable_triton_repo_is_refused_before_the_export(tmp_path: Path, small_fs: Path, capsys) -> None:
    """A --triton-repo on a read-only file system is refused up front: no ONNX is left behind that
    would make the corrected rerun need --force."""
    _make_readonly(small_fs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = export_main([*TINY, "--out", str(out_dir / "m.onnx"), "--triton-repo", str(small_fs / "repo")])
    err = capsys.readouterr().err
    assert rc == 5 and "--triton-repo" in _one_error_line(err, "itae-export")
    assert list(out_dir.iterdir()) == []
