"""itae_export.outputs: one output transaction (staging, locks, single commit, clean-up) with real
files, real subprocesses and signals, and small tmpfs mounts for full / read-only file systems."""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import mounted_tmpfs

from itae_export.errors import OutputExistsError, UsageError
from itae_export.outputs import (
    OutputBusyError,
    OutputError,
    OutputTransaction,
    Terminated,
    install_signal_handlers,
    write_text_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("_writer_proc.py")
_spec = importlib.util.spec_from_file_location("_writer_proc", WRITER)
wp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wp)


# ----------------------------------------------------------------------------------------- helpers

def snapshot(folder: Path) -> dict:
    """Everything under `folder`: relative path -> (kind, mode, sha256 of the bytes)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = Path(root, n)
            st = os.lstat(p)
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), digest)
    return out


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def run_model(path: Path) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros(4, np.float32)})[0]
    assert np.all(y == y[0])
    return float(y[0])


def write_model(dest: Path, value: float, *, force: bool = False) -> list[Path]:
    with OutputTransaction(dest, force=force) as tx:
        wp.stage_model(tx, dest, value)
        return tx.commit()


def writer(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(WRITER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)


def wait_staged(p: subprocess.Popen) -> None:
    line = p.stdout.readline()
    assert line.startswith("STAGED"), (line, p.stderr.read() if p.poll() is not None else "")


def dead_pid() -> int:
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                       check=True)
    return int(r.stdout)


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MiB tmpfs; skipped when we cannot mount one. Always unmounted."""
    with mounted_tmpfs(tmp_path / "mnt", "1m") as mnt:
        yield mnt


# -------------------------------------------------------------------------------------------- ONNX

def test_onnx_fresh_commit_then_force_overwrite(tmp_path):
    dest = tmp_path / "m.onnx"
    done = write_model(dest, 1.0)
    assert done == [tmp_path / "m.onnx.data", dest]  # data first, model last
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert run_model(dest) == 1.0

    write_model(dest, 2.0, force=True)
    files = names(tmp_path)
    assert len(files) == 2 and files[0] == "m.onnx" and files[1].startswith("m.onnx.") and files[1] != "m.onnx.data"
    assert run_model(dest) == 2.0  # the new weights, under a fresh data name; old data deleted

    write_model(dest, 3.0, force=True)  # the plain name is free again and is used
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert run_model(dest) == 3.0


def test_overwrite_keeps_data_that_another_model_references(tmp_path):
    dest = tmp_path / "m.onnx"
    write_model(dest, 1.0)
    (tmp_path / "patched.onnx").write_bytes(dest.read_bytes())  # references m.onnx.data in place
    write_model(dest, 2.0, force=True)
    assert (tmp_path / "m.onnx.data").exists()
    assert run_model(tmp_path / "patched.onnx") == 1.0 and run_model(dest) == 2.0


def test_staged_onnx_with_data_outside_staging_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    wp.save_external(wp.make_model(1.0), elsewhere / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(out)
    with pytest.raises(ValueError, match="not a file inside the staging folder"):
        with OutputTransaction(out / "m.onnx") as tx:
            staged = tx.stage_path()
            staged.write_bytes((elsewhere / "m.onnx").read_bytes())
            tx.add(staged)
            tx.commit()
    assert snapshot(out) == before


# ----------------------------------------------------------------------------------- concurrency

def test_second_writer_thread_is_refused_and_live_staging_survives_a_sweep(tmp_path):
    dest = tmp_path / "m.onnx"
    entered, release, failed = threading.Event(), threading.Event(), []

    def hold():
        try:
            with OutputTransaction(dest) as tx:
                wp.stage_model(tx, dest, 1.0)
                entered.set()
                release.wait(30)
                tx.commit()
        except BaseException as e:  # noqa: BLE001 - reported below
            failed.append(e)
            entered.set()

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert entered.wait(30) and not failed
        t0 = time.monotonic()
        with pytest.raises(OutputBusyError) as ei:
            with OutputTransaction(dest, force=True):
                pytest.fail("entered a destination another writer holds")
        assert time.monotonic() - t0 < 2  # refused at once, not after waiting
        msg = str(ei.value)
        assert str(dest) in msg and f"pid {os.getpid()}" in msg and "wait for it" in msg
        assert ei.value.exit_code == 6
        # Another destination in the same folder: its sweep must not touch the live staging folder.
        write_text_atomic(tmp_path / "other.txt", "x")
        assert any(n.startswith(".itae-staging.m.onnx.") for n in names(tmp_path))
    finally:
        release.set()
        t.join(30)
    assert not failed
    assert names(tmp_path) == ["m.onnx", "m.onnx.data", "other.txt"]  # no lock or staging folder left
    assert run_model(dest) == 1.0


def test_two_writer_processes_exactly_one_wins(tmp_path):
    dest, go = tmp_path / "m.onnx", tmp_path / "go"
    procs = {v: writer(str(dest), v, "--wait-file", str(go)) for v in ("1", "2")}
    try:
        deadline = time.monotonic() + 60
        while all(p.poll() is None for p in procs.values()):
            assert time.monotonic() < deadline, "neither writer was refused"
            time.sleep(0.02)
        loser_v = next(v for v, p in procs.items() if p.poll() is not None)
        winner_v = "2" if loser_v == "1" else "1"
        loser, winner = procs[loser_v], procs[winner_v]
        err = loser.stderr.read()
        assert loser.returncode == 6, err
        assert f"pid {winner.pid}" in err and str(dest) in err
        go.touch()
        assert winner.wait(60) == 0, winner.stderr.read()
    finally:
        go.touch()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()
            p.stderr.close()
    go.unlink()
    assert names(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert run_model(dest) == float(winner_v)


# ---------------------------------------------------------------------------------------- signals

def test_sigterm_mid_run_exits_143_and_leaves_folder_as_before(tmp_path):
    dest = tmp_path / "m.onnx"
    write_model(dest, 1.0)
    before = snapshot(tmp_path)
    p = writer(str(dest), "2", "--force", "--signals", "--sleep", "60")
    try:
        wait_staged(p)
        assert any(n.startswith(".itae-staging.") for n in names(tmp_path))
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 143, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
        p.communicate()
    assert snapshot(tmp_path) == before
    assert run_model(dest) == 1.0


def test_install_signal_handlers_turns_sigterm_into_terminated():
    old = signal.getsignal(signal.SIGTERM)
    try:
        install_signal_handlers()
        with pytest.raises(Terminated) as ei:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(1)
        assert ei.value.exit_code == 143 and isinstance(ei.value, KeyboardInterrupt)  # no `except Exception` catches it
    finally:
        signal.signal(signal.SIGTERM, old)


def test_sigterm_during_commit_is_deferred_until_the_commit_is_complete(tmp_path, monkeypatch):
    dest = tmp_path / "m.onnx"
    write_model(dest, 1.0)
    real_replace, old = os.replace, signal.getsignal(signal.SIGTERM)

    def replace_with_sigterm(src, dst, *a, **kw):
        if Path(dst) == dest:  # SIGTERM arrives between the data rename and the .onnx switch
            signal.raise_signal(signal.SIGTERM)
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace_with_sigterm)
    try:
        install_signal_handlers()
        with pytest.raises(Terminated):
            write_model(dest, 2.0, force=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    monkeypatch.setattr(os, "replace", real_replace)
    files = names(tmp_path)
    assert len(files) == 2 and files[0] == "m.onnx" and not any(n.startswith(".itae-") for n in files)
    assert run_model(dest) == 2.0  # the commit was not cut in half


def test_sigkill_mid_run_leaves_staging_that_a_rerun_removes(tmp_path):
    dest = tmp_path / "m.onnx"
    write_model(dest, 1.0)
    p = writer(str(dest), "2", "--force", "--sleep", "60")
    try:
        wait_staged(p)
        p.kill()
        assert p.wait(30) == -signal.SIGKILL
    finally:
        p.communicate()
    left = names(tmp_path)
    assert any(n.startswith(".itae-staging.") for n in left) and ".itae-lock.m.onnx" in left
    assert run_model(dest) == 1.0
    write_model(dest, 3.0, force=True)  # takes over the dead lock, removes the dead staging folder
    files = names(tmp_path)
    assert len(files) == 2 and files[0] == "m.onnx" and files[1].startswith("m.onnx.")  # no .itae-* left
    assert run_model(dest) == 3.0


def test_sigkill_inside_commit_of_an_overwrite_keeps_old_artifact_and_rerun_cleans(tmp_path):
    dest = tmp_path / "m.onnx"
    write_model(dest, 1.0)
    p = writer(str(dest), "2", "--force", "--kill-before-replace")
    try:
        assert p.wait(60) == -signal.SIGKILL, p.stderr.read()
    finally:
        p.communicate()
    left = names(tmp_path)
    orphans = [n for n in left if n.startswith("m.onnx.") and n != "m.onnx.data"]
    assert len(orphans) == 1  # the new data landed under a fresh name; the .onnx was not switched
    assert run_model(dest) == 1.0  # complete old artifact
    with OutputTransaction(dest, force=True) as tx:
        # Before any commit, the rerun has removed the dead staging/lock folders and the orphaned data.
        assert [n for n in names(tmp_path) if not n.startswith(".itae-")] == ["m.onnx", "m.onnx.data"]
        assert [n for n in names(tmp_path) if n.startswith(".itae-staging.")] == [tx.staging.name]
        wp.stage_model(tx, dest, 3.0)
        tx.commit()
    files = names(tmp_path)
    assert len(files) == 2 and files[0] == "m.onnx" and not any(n.startswith(".itae-") for n in files)
    assert run_model(dest) == 3.0


def test_sigkill_inside_commit_of_a_fresh_destination(tmp_path):
    dest = tmp_path / "m.onnx"
    p = writer(str(dest), "2", "--kill-before-replace")
    try:
        assert p.wait(60) == -signal.SIGKILL, p.stderr.read()
    finally:
        p.communicate()
    assert not dest.exists() and (tmp_path / "m.onnx.data").exists()  # only an unreferenced data file
    write_model(dest, 3.0)  # no --force needed: the destination does not exist
    files = names(tmp_path)
    assert len(files) == 2 and files[0] == "m.onnx" and files[1].startswith("m.onnx.")
    assert "m.onnx.data" not in files  # the orphan was removed once the new model landed
    assert run_model(dest) == 3.0


# ----------------------------------------------------------------------------- dead-owner debris

def test_dead_staging_and_lock_folders_are_removed_on_entry(tmp_path):
    dest = tmp_path / "m.onnx"
    write_model(dest, 1.0)
    pid = dead_pid()
    no_lock = tmp_path / f".itae-staging.x.bin.{pid}.0badf00d"
    no_lock.mkdir()
    (no_lock / "x.bin").write_bytes(b"partial")
    unlocked = tmp_path / f".itae-staging.y.bin.{os.getpid()}.0badf00e"  # lock file written, lock free
    unlocked.mkdir()
    (unlocked / ".itae-staging.lock").write_text(f"{pid}\n")
    dead_claim = tmp_path / ".itae-lock.m.onnx"
    dead_claim.mkdir()
    (dead_claim / ".itae-staging.lock").write_text(f"{pid}\n")
    orphan = tmp_path / "m.onnx.0123abcd.data"
    orphan.write_bytes(b"x" * 16)
    with OutputTransaction(dest, force=True) as tx:
        left = names(tmp_path)
        assert not {no_lock.name, unlocked.name, orphan.name} & set(left)
        assert ".itae-lock.m.onnx" in left  # ours now
        wp.stage_model(tx, dest, 2.0)
        tx.commit()
    assert names(tmp_path)[0] == "m.onnx" and len(names(tmp_path)) == 2
    assert run_model(dest) == 2.0


# -------------------------------------------------------------------------------- file systems

def test_full_filesystem_is_output_error_and_leaves_nothing(tmpfs):
    (tmpfs / "keep.txt").write_text("old")
    before = snapshot(tmpfs)
    dest = tmpfs / "sub" / "big.bin"
    with pytest.raises(OutputError) as ei:
        with OutputTransaction(dest) as tx:
            staged = tx.stage_path()
            staged.write_bytes(b"\0" * (2 << 20))
            tx.add(staged)
            tx.commit()
    msg = str(ei.value)
    assert str(dest) in msg and "free space" in msg and ei.value.exit_code == 5
    assert snapshot(tmpfs) == before  # staging, lock and the created "sub" folder are gone


def test_full_filesystem_during_commit_rolls_back(tmpfs):
    dest = tmpfs / "m.onnx"
    write_model(dest, 1.0)
    before = snapshot(tmpfs)
    with OutputTransaction(dest, force=True) as tx:
        wp.stage_model(tx, dest, 2.0)
        fd = os.open(tx.staging / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:  # fill the file system to the last page
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with pytest.raises(OutputError, match="free space"):
            tx.commit()  # the fresh data name needs a rewritten header, which cannot be written
    assert snapshot(tmpfs) == before
    assert run_model(dest) == 1.0


def test_read_only_filesystem_is_refused_before_any_work(tmpfs):
    (tmpfs / "old.bin").write_text("old")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    reached = []
    for dest, force in ((tmpfs / "new.bin", False), (tmpfs / "old.bin", True), (tmpfs / "sub" / "x.bin", False)):
        with pytest.raises(OutputError) as ei:
            with OutputTransaction(dest, force=force):
                reached.append(dest)
        assert str(dest) in str(ei.value) and "writable --out" in str(ei.value)
    assert not reached
    assert names(tmpfs) == ["old.bin"]


def test_name_too_long_is_output_error_up_front(tmp_path):
    with pytest.raises(OutputError, match="too long"):
        with OutputTransaction(tmp_path / ("a" * 250 + ".onnx")):
            pytest.fail("entered")
    assert names(tmp_path) == []


# ----------------------------------------------------------------------------------------- modes

def test_modes_never_widen_the_source(tmp_path):
    out = tmp_path / "out"
    old_umask = os.umask(0)  # modes come from the transaction, not from the umask
    try:
        for src_mode, want in ((0o600, 0o600), (0o640, 0o640), (0o777, 0o644)):
            src = tmp_path / f"src{src_mode:o}.bin"
            src.write_bytes(b"weights")
            os.chmod(src, src_mode)
            dest = out / f"copy{src_mode:o}.bin"
            with OutputTransaction(dest, inputs=[src]) as tx:
                staged = tx.stage_path()
                staged.write_bytes(src.read_bytes())
                os.chmod(staged, 0o666)
                tx.add(staged, source=src)
                tx.commit()
            assert stat.S_IMODE(dest.stat().st_mode) == want
        assert stat.S_IMODE(write_text_atomic(out / "report.json", "{}").stat().st_mode) == 0o644
        write_model(out / "m.onnx", 1.0)  # onnx.save writes its .data 0600
        for n in ("m.onnx", "m.onnx.data"):
            assert stat.S_IMODE((out / n).stat().st_mode) == 0o644
        assert stat.S_IMODE(out.stat().st_mode) == 0o755  # the parent we created
    finally:
        os.umask(old_umask)


# ------------------------------------------------------------------------------ path validation

def test_destination_that_is_an_input_is_refused(tmp_path):
    src = tmp_path / "in.onnx"
    wp.save_external(wp.make_model(1.0), src)
    (tmp_path / "link.onnx").symlink_to(src)
    os.link(src, tmp_path / "hard.onnx")
    (tmp_path / "alias").symlink_to(tmp_path)
    before = snapshot(tmp_path)
    for dest in (src, tmp_path / "link.onnx", tmp_path / "hard.onnx", tmp_path / "alias" / "in.onnx"):
        with pytest.raises(UsageError, match="is the input file"):
            with OutputTransaction(dest, inputs=[src], force=True):
                pytest.fail("entered")
    with pytest.raises(UsageError, match="external data file of the input"):
        with OutputTransaction(tmp_path / "in.onnx.data", inputs=[src], force=True):
            pytest.fail("entered")
    assert snapshot(tmp_path) == before
    assert run_model(src) == 1.0


def test_existing_destination_needs_force_and_directories_are_refused(tmp_path):
    dest = tmp_path / "r.json"
    write_text_atomic(dest, "old")
    with pytest.raises(OutputExistsError) as ei:
        write_text_atomic(dest, "new")
    assert str(dest) in str(ei.value) and "--force" in str(ei.value)
    assert dest.read_text() == "old"
    write_text_atomic(dest, "new", force=True)
    assert dest.read_text() == "new"
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match="is an existing directory"):
        write_text_atomic(tmp_path / "d", "x", force=True)
    assert names(tmp_path) == ["d", "r.json"]


def test_failure_before_commit_restores_the_folder_and_maps_only_output_errors(tmp_path):
    before = snapshot(tmp_path)
    dest = tmp_path / "new" / "deeper" / "r.json"
    with pytest.raises(RuntimeError):
        with OutputTransaction(dest) as tx:
            tx.stage_path().write_text("partial")
            raise RuntimeError("writer failed")
    assert snapshot(tmp_path) == before  # the parents it created are gone too
    with pytest.raises(FileNotFoundError):  # an input that is missing is not an output problem
        with OutputTransaction(dest):
            raise FileNotFoundError(errno.ENOENT, "No such file", "/nonexistent/input.onnx")
    with pytest.raises(OutputError, match="permission denied"):
        with OutputTransaction(dest) as tx:
            raise PermissionError(errno.EACCES, "Permission denied", str(tx.staging / "r.json"))
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------- multi-file and folder outputs

def test_sidecar_lands_before_engine_and_a_failed_commit_restores_it(tmp_path, monkeypatch):
    eng, side = tmp_path / "m.engine", tmp_path / "m.engine.json"

    def write_pair(tag: str, force: bool) -> list[Path]:
        with OutputTransaction(eng, extra=[side], force=force) as tx:
            for d in (eng, side):
                tx.stage_path(d).write_text(f"{tag} {d.name}")
                tx.add(tx.stage_path(d), d)
            return tx.commit()

    assert write_pair("old", False) == [side, eng]  # primary last
    before = snapshot(tmp_path)
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        if Path(dst) == eng:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="free space"):
        write_pair("new", True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert snapshot(tmp_path) == before  # the already replaced sidecar was put back
    write_pair("new", True)
    assert side.read_text() == "new m.engine.json" and eng.read_text() == "new m.engine"


def test_version_folder_is_one_rename_and_never_overwritten(tmp_path):
    repo = tmp_path / "repo" / "dinov2"
    version = repo / "3"
    with OutputTransaction(version) as tx:
        staged = tx.stage_path()
        staged.mkdir()
        wp.save_external(wp.make_model(1.0), staged / "model.onnx")
        tx.add(staged)
        assert tx.commit() == [version]
    assert names(repo) == ["3"]
    assert names(version) == ["model.onnx", "model.onnx.data"]
    assert stat.S_IMODE(version.stat().st_mode) == 0o755
    assert all(stat.S_IMODE((version / n).stat().st_mode) == 0o644 for n in names(version))
    assert run_model(version / "model.onnx") == 1.0
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="existing directory"):
        with OutputTransaction(version, force=True):
            pytest.fail("entered")
    assert snapshot(tmp_path) == before
