"""One output transaction for every writer: ONNX exports and patches, fast paths, TensorRT engines
and their JSON sidecars, Triton version folders, eval reports, calibration files.

Usage::

    from itae_export.outputs import OutputTransaction, install_signal_handlers

    install_signal_handlers()                      # once, in the CLI's main thread: SIGTERM -> Terminated
    with OutputTransaction(out, inputs=[src], force=args.force) as tx:  # validate, lock, stage (cheap)
        staged = tx.stage_path(out)                # <out folder>/.itae-staging.<name>.<pid>.<hex>/<name>
        onnx.save_model(model, str(staged), save_as_external_data=True, location=out.name + ".data")
        tx.add(staged, out, source=src)            # source: the input whose permissions cap the output's
        tx.commit()                                # model and data land together; returns the final paths

    write_text_atomic(report_path, json_text, force=True)   # small files: one call

Leaving the block without commit(), or by any exception (Terminated and KeyboardInterrupt included),
removes everything the transaction made: its staging folder, lock folders and the parent folders it
created, so the output folder lists exactly what it did before. Several files that land together
(`X.engine` + `X.engine.json`, a Triton `config.pbtxt` + version folder) are one transaction:
``OutputTransaction(engine, extra=[sidecar])``; the primary `dest` is committed last.

Guarantees
* Validation up front (__enter__, before the caller's heavy work): a destination that is an input
  (os.path.samefile, so also through a symlink or hard link) or an external data file of an .onnx
  input is refused (UsageError), as is an existing directory; an existing file needs force
  (OutputExistsError); names longer than the file system allows, a read-only or full file system
  and missing permissions are OutputError (exit 5). A missing parent folder is created (0o755) and
  removed again when nothing was committed. Every entry must sit in the same folder.
* Locking: each destination is claimed by a folder `.itae-lock.<name>` beside it, created by one
  os.rename of a folder that already holds a lock file locked with fcntl.flock and the owner's pid.
  A second writer (process or thread) is refused at once with OutputBusyError (exit 6) naming the
  holder's pid; a claim whose flock is free belonged to a dead process and is taken over. The claim
  folder is removed at the end, so a finished run leaves no lock file behind.
* Staging happens in `.itae-staging.<name>.<pid>.<hex>` beside the destination (same file system, so
  every rename is atomic), holding its own flocked lock file. Each transaction removes the staging
  and claim folders of dead owners (SIGKILL) in its folder, and the unreferenced `X.onnx.<hex>.data`
  files an interrupted commit of its own destination left.
* ONNX (`*.onnx` entries): commit() finds the staged model's external data files itself (plain file
  names inside the staging folder; anything else is refused with ValueError, except files named in
  `shared`). The data gets the name `X.onnx.data` when that name is free, else a fresh
  `X.onnx.<8 hex>.data` (locations rewritten in the staged header, weights never loaded); the data
  is renamed in first and the .onnx is os.replace'd last, so a kill at any moment leaves the complete
  old artifact or the complete new one (plus unreferenced data that the next run removes). After the
  switch, the old artifact's data files (only files inside the folder) that no .onnx in the folder
  mentions any more are deleted.
* Folders (a Triton version folder) are committed with one os.rename; an existing one is refused.
* Modes: files 0o644, capped by the mode of `source` when given (`0o644 & source_mode`); folders 0o755.
* OS errors while staging (ENOSPC, EDQUOT, EROFS, EACCES, EPERM, ENAMETOOLONG, EFBIG on a path in the
  output folder) or committing become OutputError; a commit that fails before its last rename is
  rolled back (replaced extra files are restored from hard-link backups).
* Signals: commit and clean-up run with SIGINT/SIGTERM deferred (main thread), so they are not cut
  half-way; install_signal_handlers() makes SIGTERM raise Terminated (exit 143) like SIGINT raises
  KeyboardInterrupt (130).

Limits: a kill between the files of a non-ONNX multi-file artifact (sidecar already replaced, primary
not yet) leaves the new sidecar beside the old primary; durability against power loss relies on
fsync of files and folder; writers of *different* destinations that share data files in place are
not coordinated beyond the "does any .onnx here mention it" check; the locks are advisory (flock):
tools that do not use this module are not stopped, and flock over NFS depends on the server.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import re
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputBusyError, OutputError, OutputExistsError, Terminated, UsageError

__all__ = [
    "OutputBusyError",
    "OutputError",
    "OutputTransaction",
    "Terminated",
    "install_signal_handlers",
    "write_text_atomic",
]

STAGING_PREFIX = ".itae-staging."
CLAIM_PREFIX = ".itae-lock."
LOCK_NAME = ".itae-staging.lock"  # the flocked file inside every staging and claim folder
FILE_MODE = 0o644
EXEC_MODE = 0o755
DIR_MODE = 0o755
_NEW_DATA_SUFFIX_LEN = len(".0123abcd.data")
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                 errno.EFBIG}


# ----------------------------------------------------------------------------------------- signals

def _raise_terminated(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM; unfinished outputs were removed and existing ones left as they were")


def install_signal_handlers() -> None:
    """Make SIGTERM raise Terminated (exit_code 143) in the main thread, as SIGINT raises
    KeyboardInterrupt (130), so `with OutputTransaction(...)` cleans up on both. No-op off the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM for the duration (main thread only), then deliver them to the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, object] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        old = signal.getsignal(sig)
        if old is None:  # installed from C: cannot be restored, leave it alone
            continue
        try:
            signal.signal(sig, lambda s, f: pending.append(s))
        except (ValueError, OSError):
            continue
        saved[sig] = old
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


# ------------------------------------------------------------------------------- lock/claim folders

def _short(name: str) -> str:
    """`name`, or a shortened unique form of it, fit to sit inside a folder name."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 120:
        return name
    head = raw[:60].decode("utf-8", "ignore")
    return f"{head}~{hashlib.sha1(raw).hexdigest()[:12]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _pid_from_name(name: str) -> int | None:
    parts = name.rsplit(".", 2)
    try:
        return int(parts[1]) if len(parts) == 3 else None
    except ValueError:
        return None


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode("ascii", "replace").strip())
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _user_path(p: Path) -> Path:
    """The path the user asked for: a transaction nested in another one's staging folder (a writer
    called by the pipeline) reports the outer destination, not the staging folder."""
    parts = list(p.parts)
    while any(x.startswith(STAGING_PREFIX) for x in parts[:-1]):
        i = max(i for i, x in enumerate(parts[:-1]) if x.startswith(STAGING_PREFIX))
        parts = parts[:i] + parts[i + 1:]
    return Path(*parts)


def _make_locked_dir(folder: Path, label: str) -> tuple[Path, int]:
    """A new folder `.itae-staging.<label>.<pid>.<hex>` in `folder` holding LOCK_NAME, flocked by the
    returned fd and holding our pid (an empty lock file means "still being set up")."""
    while True:
        d = folder / f"{STAGING_PREFIX}{_short(label)}.{os.getpid()}.{secrets.token_hex(4)}"
        try:
            os.mkdir(d, DIR_MODE)
            break
        except FileExistsError:
            continue
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, FILE_MODE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(d)
        raise
    try:
        _flock_soon(fd)
        os.write(fd, f"{os.getpid()}\n".encode())
    except BaseException:
        os.close(fd)
        _remove_tree(d)
        raise
    return d, fd


def _flock_soon(fd: int, attempts: int = 200) -> None:
    """flock our brand-new lock file. A sweeper in another process may hold it for a moment while it
    checks whether the folder is dead (it is not: it then lets go), so retry for up to ~2 s."""
    for i in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == attempts - 1:
                raise
            time.sleep(0.01)


def _remove_tree(d: Path) -> None:
    shutil.rmtree(d, ignore_errors=True)


def _release_locked(path: Path, fd: int) -> None:
    """Remove a claim or staging folder we hold, then drop its lock (removal first, so a waiter that
    gets the lock finds the path gone or replaced)."""
    try:
        if path.name.startswith(CLAIM_PREFIX):
            if _same_file(fd, path / LOCK_NAME):
                with contextlib.suppress(OSError):
                    os.unlink(path / LOCK_NAME)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        else:
            _remove_tree(path)
    finally:
        os.close(fd)


def _dead_lock(d: Path) -> int | None:
    """For a staging or claim folder: an fd holding its lock when its owner is dead, -1 when it is
    dead and has no lock file, None when it is alive (or we cannot tell)."""
    claim = d.name.startswith(CLAIM_PREFIX)
    if not claim:
        owner = _pid_from_name(d.name)
        if owner is not None and owner != os.getpid() and _pid_alive(owner):
            return None  # another live process's staging folder: never touch its lock (it may be locking it now)
        # our own pid: a folder of another thread of ours (its flock tells), or one left by an earlier
        # process that had our pid (a container's pid 1 is reused by every run): the flock decides
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        if claim:  # claims are born with a lock file: without one the folder is debris
            return -1
        pid = _pid_from_name(d.name)
        return -1 if pid is not None and not _pid_alive(pid) else None
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not _same_file(fd, d / LOCK_NAME):
        os.close(fd)
        return None
    if _read_pid(fd) is None and not claim:  # owner may be between creating and locking it
        pid = _pid_from_name(d.name)
        if pid is None or _pid_alive(pid):
            os.close(fd)
            return None
    return fd


def _sweep_dead(folder: Path) -> None:
    """Remove the staging and claim folders of dead owners in `folder`."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not name.startswith((STAGING_PREFIX, CLAIM_PREFIX)) or name == LOCK_NAME:
            continue
        d = folder / name
        try:
            if not stat.S_ISDIR(os.lstat(d).st_mode):
                continue
        except OSError:
            continue
        fd = _dead_lock(d)
        if fd is None:
            continue
        if fd == -1:
            if name.startswith(CLAIM_PREFIX):
                with contextlib.suppress(OSError):
                    os.rmdir(d)  # rmdir only: an acquirer may have just renamed a live claim here
            else:
                _remove_tree(d)
            continue
        _release_locked(d, fd)


@dataclass
class _Claim:
    path: Path
    fd: int


def _claim(folder: Path, dest: Path, flag: str) -> _Claim:
    """Claim `dest` (see the module docstring), or raise OutputBusyError."""
    cpath = folder / f"{CLAIM_PREFIX}{_short(dest.name)}"
    tmp, fd = _make_locked_dir(folder, "claim-" + dest.name)
    try:
        for attempt in range(200):
            try:
                os.rename(tmp, cpath)  # atomic; replaces only an empty folder (debris)
                return _Claim(cpath, fd)
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
                    raise
                try:
                    in_the_way = e.errno == errno.ENOTDIR or not stat.S_ISDIR(os.lstat(cpath).st_mode)
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                if in_the_way:
                    raise UsageError(f"{cpath} is in the way of the lock folder of {flag} {dest}; remove it") from e
            try:
                hfd = os.open(cpath / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                if attempt > 100:
                    raise OutputBusyError(
                        f"{flag} {dest} is locked by {cpath}, which has no owner file; if no itae tool is "
                        f"writing {dest.name}, remove that folder and rerun") from None
                time.sleep(0.005)  # being removed by its owner or a sweeper
                continue
            try:
                fcntl.flock(hfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(hfd)
                os.close(hfd)
                if (pid is not None and _pid_alive(pid)) or attempt > 20:
                    who = (f"pid {pid}" + (", this process" if pid == os.getpid() else "")) if pid else "pid unknown"
                    raise OutputBusyError(
                        f"{flag} {dest} is being written by another writer ({who}); wait for it to finish "
                        f"or choose another {flag}") from None
                time.sleep(0.01)  # a dead owner's claim being removed by someone else
                continue
            # The lock was free: its owner is dead (or has just released it); remove and retry.
            if _same_file(hfd, cpath / LOCK_NAME):
                _release_locked(cpath, hfd)
            else:
                os.close(hfd)
        raise OutputBusyError(f"{flag} {dest} could not be locked (the lock changed hands too often); rerun")
    except BaseException:
        _release_locked(tmp, fd)
        raise


# --------------------------------------------------------------------------------------- ONNX bits

def _external(model) -> Iterator:
    """(tensor, location entry) of every external tensor (graph_passes.graph.external_tensors)."""
    from graph_passes.graph import external_tensors

    return external_tensors(model)


def _load_header(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _locations(path: Path) -> list[str] | None:
    """External-data locations of the ONNX file at `path`; None when it is not a readable ONNX file."""
    try:
        return sorted({kv.value for _, kv in _external(_load_header(path))})
    except Exception:  # noqa: BLE001 - protobuf raises several types for garbage; not an ONNX file
        return None


def _inside(folder: Path, location: str) -> Path | None:
    """The file `location` names relative to `folder` when it is a plain relative path that stays
    inside `folder` (symlinks followed), else None."""
    loc = location.replace("\\", "/")
    parts = loc.split("/")
    if not loc or loc.startswith("/") or ".." in parts or "\x00" in loc or ":" in parts[0]:
        return None
    base = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(base, loc))
    return Path(folder, loc) if target.startswith(base + os.sep) else None


def _mentioned(files: Sequence[Path], names: set[str]) -> set[str]:
    """Which of `names` occur (as bytes) in any of `files`: a cheap, conservative "is referenced"."""
    found: set[str] = set()
    for p in files:
        if found == names:
            break
        try:
            with open(p, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    continue
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    for n in names - found:
                        if m.find(n.encode("utf-8", "surrogateescape")) >= 0:
                            found.add(n)
        except OSError:
            return set(names)  # cannot tell: keep everything
    return found


def _onnx_files_in(folder: Path, exclude: set[str]) -> list[Path]:
    """The .onnx files of `folder` (and of its live staging folders), except `exclude` (names)."""
    out: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        try:
            if e.name.lower().endswith(".onnx") and e.name not in exclude and e.is_file():
                out.append(Path(e.path))
            elif e.name.startswith(STAGING_PREFIX) and e.is_dir(follow_symlinks=False):
                out.extend(Path(s.path) for s in os.scandir(e.path) if s.name.lower().endswith(".onnx"))
        except OSError:
            continue
    return out


def _onnx_data_files(onnx_path: Path) -> list[Path]:
    locs = _locations(onnx_path) or []
    return [p for p in (_inside(onnx_path.parent, loc) for loc in locs) if p is not None]


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, (os.O_RDONLY | os.O_DIRECTORY) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):  # some file systems cannot fsync folders
            raise
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ transaction

@dataclass
class _Entry:
    dest: Path
    staged: Path | None = None
    source: Path | None = None


@dataclass
class _Plan:
    """What commit() does for one entry, prepared inside the staging folder."""

    entry: _Entry
    kind: str  # "file", "dir" or "onnx"
    data: list[str] = field(default_factory=list)  # onnx: new data file names (in staging, then in folder)
    old_data: list[Path] = field(default_factory=list)  # onnx: files the replaced .onnx referenced
    keep: set[str] = field(default_factory=set)  # onnx: names the new .onnx references


def _abs(p: Path | str) -> Path:
    return Path(os.path.abspath(os.fspath(p)))


class OutputTransaction:
    """Stage outputs beside their destinations and commit them together; see the module docstring.

    dest: the primary output (file or folder), committed last. extra: more outputs in the same folder
    (sidecars), committed before it. inputs: files the run reads (never overwritten). force: allow
    replacing existing files (never folders). flag: the option named in messages. shared: existing
    files in the output folder that a staged .onnx may reference in place (never moved or deleted).
    """

    def __init__(self, dest: Path | str, *, extra: Sequence[Path | str] = (), inputs: Sequence[Path | str] = (),
                 force: bool = False, flag: str = "--out", shared: Sequence[Path | str] = ()):
        self.dest = _abs(dest)
        self._entries: dict[Path, _Entry] = {}
        for p in [*map(_abs, extra), self.dest]:
            if p in self._entries:
                raise UsageError(f"{flag} {p} is given twice as an output; give each output once")
            self._entries[p] = _Entry(p)
        self.folder = self.dest.parent
        for p in self._entries:
            if p.parent != self.folder:
                raise UsageError(f"{p} is not in the folder of {flag} {self.dest}; outputs committed together "
                                 "must share a folder (use one transaction per folder)")
        self._inputs = [Path(i) for i in inputs if i is not None]
        self._shared = [_abs(s) for s in shared]
        self.force = force
        self.flag = flag
        self._state = "new"  # new -> open -> committed -> closed
        self._claims: list[_Claim] = []
        self._staging: Path | None = None
        self._staging_fd = -1
        self._created: list[Path] = []  # parent folders we made, outermost first
        self._installed: list[tuple[str, Path, Path | None]] = []  # for rollback: (what, path, backup)

    # ------------------------------------------------------------------ public API

    def __enter__(self) -> OutputTransaction:
        if self._state != "new":
            raise RuntimeError("an OutputTransaction can be entered once")
        with _signals_deferred():
            try:
                self._validate()
                self._make_parent()
                _sweep_dead(self.folder)
                for e in sorted(self._entries, key=lambda p: p.name):
                    self._claims.append(_claim(self.folder, e, self.flag))
                self._validate()  # again: another writer may have committed before we claimed
                self._staging, self._staging_fd = _make_locked_dir(self.folder, self.dest.name)
                self._clean_orphans()
                self._state = "open"
            except OSError as e:
                self._cleanup()
                raise self._output_error(e) from e
            except BaseException:
                self._cleanup()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        committed = self._state == "committed"
        with _signals_deferred():
            self._cleanup()
        if isinstance(exc, OSError) and not committed and self._is_output_os_error(exc):
            raise self._output_error(exc) from exc
        return False

    @property
    def staging(self) -> Path:
        """The staging folder (beside the destination, removed at the end)."""
        if self._staging is None or self._state != "open":
            raise RuntimeError("the staging folder exists only inside `with OutputTransaction(...)`")
        return self._staging

    def stage_path(self, dest: Path | str | None = None) -> Path:
        """Where to write the staged copy of `dest` (default: the primary destination)."""
        e = self._entry(self.dest if dest is None else dest)
        return self.staging / e.dest.name

    def add(self, staged: Path | str, dest: Path | str | None = None, *, source: Path | str | None = None) -> None:
        """Register the staged file or folder `staged` (inside `staging`) for `dest` (default: the
        primary). `source`: the input it derives from; its permission bits cap the output's."""
        e = self._entry(self.dest if dest is None else dest)
        sp = Path(staged)
        if os.path.realpath(sp.parent) != os.path.realpath(self.staging) or sp.name == LOCK_NAME:
            raise ValueError(f"add({sp}): stage outputs directly inside {self.staging} (use stage_path())")
        try:
            st = os.lstat(sp)
        except FileNotFoundError:
            raise ValueError(f"add({sp}): nothing was written there") from None
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise ValueError(f"add({sp}): only regular files and folders can be committed")
        if stat.S_ISDIR(st.st_mode) and os.path.lexists(e.dest):
            raise OutputExistsError(f"{self.flag} {e.dest} already exists; folder outputs never replace anything: "
                                    "choose a new name (e.g. the next version number)")
        if any(o.staged == sp for o in self._entries.values() if o is not e):
            raise ValueError(f"add({sp}): already added for another destination")
        e.staged = sp
        e.source = Path(source) if source is not None else None

    def commit(self) -> list[Path]:
        """Move every added output into place (extras first, the primary last; ONNX data before its
        model). Returns the final paths in commit order. Raises OutputError (rolled back) on OS errors."""
        if self._state != "open":
            raise RuntimeError("commit() needs an open transaction that has not committed yet")
        todo = [e for e in self._entries.values() if e.staged is not None]
        if not todo:
            raise ValueError("commit(): nothing was added")
        done: list[Path] = []
        with _signals_deferred():
            try:
                plans = [self._prepare(e) for e in todo]
                for i, plan in enumerate(plans):
                    done += self._install(plan, last=i == len(plans) - 1)
            except BaseException as e:
                self._rollback()
                if isinstance(e, OSError):
                    raise self._output_error(e) from e
                raise
            # The last rename was the commit point: from here on nothing is undone or raised.
            self._state = "committed"
            self._installed.clear()
            with contextlib.suppress(OSError):
                _fsync(self.folder, directory=True)
            for plan in plans:
                if plan.kind == "onnx":
                    self._delete_unreferenced(plan)
        return done

    # ------------------------------------------------------------------ validation

    def _entry(self, dest: Path | str) -> _Entry:
        try:
            return self._entries[_abs(dest)]
        except KeyError:
            raise ValueError(f"{dest} is not an output of this transaction (declare it with extra=)") from None

    def _validate(self) -> None:
        for p in self._entries:
            name = p.name
            if not name or name in (".", ".."):
                raise UsageError(f"{self.flag} {p} names no file; give a file path")
            if name.startswith((STAGING_PREFIX, CLAIM_PREFIX)):
                raise UsageError(f"{self.flag} {p}: names starting with '.itae-' are reserved; choose another name")
            self._check_name_length(p)
            for i in self._inputs:
                self._check_not_input(p, i)
            if p.is_dir():
                raise UsageError(f"{self.flag} {p} is an existing directory; outputs never replace a directory: "
                                 "give a file path or a new folder name")
            if os.path.lexists(p) and not self.force:
                raise OutputExistsError(f"{p} already exists; pass --force to overwrite it or choose another {self.flag}")
        q = self.folder
        while not os.path.lexists(q):
            q = q.parent
        if not q.is_dir():
            raise UsageError(f"{self.flag} {self.dest}: {q} is not a directory; choose another {self.flag}")

    def _check_name_length(self, p: Path) -> None:
        q = p.parent
        while not q.exists() and q != q.parent:
            q = q.parent
        try:
            name_max = os.pathconf(q, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        need = len(p.name.encode("utf-8", "surrogateescape"))
        if p.name.lower().endswith(".onnx"):
            need += _NEW_DATA_SUFFIX_LEN  # its data file may be named <name>.<8 hex>.data
        if need > name_max:
            raise OutputError(f"{self.flag} {p}: the file name is too long for its file system ({need} > {name_max} "
                              f"bytes with the data-file suffix); choose a shorter {self.flag}")

    def _check_not_input(self, p: Path, i: Path) -> None:
        same = os.path.realpath(p) == os.path.realpath(i)
        if not same and i.exists() and p.exists():
            same = os.path.samefile(p, i)
        if same:
            raise UsageError(f"{self.flag} {p} is the input file {i}; choose another output path "
                             "(inputs are never modified)")
        if i.suffix.lower() == ".onnx" and i.is_file() and p.is_file():
            # Cheap prefilter (a header parse of a big embedded-weights model is not cheap).
            if os.stat(p).st_nlink > 1 or _mentioned([i], {p.name}):
                for d in _onnx_data_files(i):
                    if d.exists() and os.path.samefile(d, p):
                        raise UsageError(f"{self.flag} {p} is an external data file of the input {i}; choose "
                                         "another output path (inputs are never modified)")

    def _make_parent(self) -> None:
        missing = []
        q = self.folder
        while not os.path.lexists(q):
            missing.append(q)
            q = q.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, DIR_MODE)
            except FileExistsError:
                continue
            self._created.append(d)
            os.chmod(d, DIR_MODE)

    # ------------------------------------------------------------------ errors

    def _is_output_os_error(self, e: OSError) -> bool:
        if e.errno not in _WRITE_ERRNOS:
            return False
        names = [n for n in (e.filename, e.filename2) if n is not None]
        if not names:
            return True  # a failed write(): nothing else is written inside the transaction's block
        ours = {os.path.realpath(p) for p in (self.folder, *self._entries)}
        stage = os.path.realpath(self._staging) + os.sep if self._staging is not None else None
        for n in names:
            r = os.path.realpath(os.fsdecode(n))
            if r in ours or (stage is not None and (r + os.sep).startswith(stage)):
                return True
        return False

    def _output_error(self, e: OSError) -> OutputError:
        code = e.errno
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            what, todo = "its file system is full (or over quota)", f"free space there or choose another {self.flag}"
        elif code == errno.EROFS:
            what, todo = "its file system is read-only", f"choose a writable {self.flag}"
        elif code in (errno.EACCES, errno.EPERM):
            what, todo = f"permission denied in {self.folder}", f"choose a writable {self.flag}"
        elif code == errno.ENAMETOOLONG:
            what, todo = "a file name is too long", f"choose a shorter {self.flag}"
        else:
            what, todo = e.strerror or type(e).__name__, f"check the folder {self.folder} or choose another {self.flag}"
        return OutputError(f"{self.flag} {_user_path(self.dest)} cannot be written: {what}; {todo} "
                           "(the output folder was left as it was)")

    # ------------------------------------------------------------------ commit steps

    def _mode(self, e: _Entry) -> int:
        """0o644, or 0o755 for a staged file the writer made executable (a build script); capped by
        the source's mode."""
        mode = FILE_MODE
        if e.staged is not None and os.path.isfile(e.staged) and os.stat(e.staged).st_mode & stat.S_IXUSR:
            mode = EXEC_MODE
        if e.source is None:
            return mode
        return mode & stat.S_IMODE(os.stat(e.source).st_mode)

    def _finish_file(self, path: Path, mode: int) -> None:
        os.chmod(path, mode)
        _fsync(path)

    def _prepare(self, e: _Entry) -> _Plan:
        assert e.staged is not None
        st = os.lstat(e.staged)
        mode = self._mode(e)
        if stat.S_ISDIR(st.st_mode):
            for root, _dirs, files in os.walk(e.staged):
                os.chmod(root, DIR_MODE)
                for f in files:
                    fp = Path(root, f)
                    if not os.path.islink(fp):
                        self._finish_file(fp, mode)
            return _Plan(e, "dir")
        if not e.dest.name.lower().endswith(".onnx"):
            self._finish_file(e.staged, mode)
            return _Plan(e, "file")
        return self._prepare_onnx(e, mode)

    def _prepare_onnx(self, e: _Entry, mode: int) -> _Plan:
        assert e.staged is not None
        staging = self.staging
        try:
            model = _load_header(e.staged)
        except OSError:
            raise
        except Exception as ex:  # noqa: BLE001
            raise ValueError(f"commit(): staged {e.staged} is not a readable ONNX file ({ex})") from ex
        shared = {os.path.realpath(s) for s in self._shared}
        staged_locs: list[str] = []
        keep: set[str] = set()
        for loc in sorted({kv.value for _, kv in _external(model)}):
            plain = "/" not in loc and "\\" not in loc and loc not in ("", ".", "..", LOCK_NAME)
            if plain and os.path.isfile(staging / loc) and not os.path.islink(staging / loc):
                staged_locs.append(loc)
                continue
            target = _inside(self.folder, loc)
            if target is not None and os.path.realpath(target) in shared and target.is_file():
                keep.add(loc)
                continue
            raise ValueError(f"commit(): staged {e.staged.name} references external data {loc!r}, which is not a "
                             f"file inside the staging folder {staging} (save it there, e.g. "
                             f"location={e.dest.name + '.data'!r}) nor a file passed as shared=")
        # New names: <name>.data when free, else <name>.<8 hex>.data, never an existing name.
        in_folder, in_staging = set(os.listdir(self.folder)), set(os.listdir(staging))
        taken = in_folder | in_staging
        wanted = e.dest.name + ".data"
        rename: dict[str, str] = {}
        if len(staged_locs) == 1 and wanted not in in_folder and (staged_locs[0] == wanted or wanted not in in_staging):
            rename[staged_locs[0]] = wanted
        else:
            for loc in staged_locs:
                while True:
                    new = f"{e.dest.name}.{secrets.token_hex(4)}.data"
                    if new not in taken:
                        taken.add(new)
                        break
                rename[loc] = new
        for old, new in rename.items():
            if old != new:
                os.rename(staging / old, staging / new)
        if any(old != new for old, new in rename.items()):
            for _, kv in _external(model):
                kv.value = rename.get(kv.value, kv.value)
            tmp = staging / f".{secrets.token_hex(4)}.onnx.tmp"
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
            os.replace(tmp, e.staged)
        for new in rename.values():
            self._finish_file(staging / new, mode)
        self._finish_file(e.staged, mode)
        old_data: list[Path] = []
        if e.dest.is_file():
            old_data = _onnx_data_files(e.dest)
        return _Plan(e, "onnx", data=list(rename.values()), old_data=old_data, keep=keep | set(rename.values()))

    def _backup(self, dest: Path) -> Path | None:
        b = self.staging / f".backup.{secrets.token_hex(4)}"
        try:
            os.link(dest, b, follow_symlinks=False)
        except OSError:
            return None
        return b

    def _install(self, plan: _Plan, *, last: bool) -> list[Path]:
        e = plan.entry
        assert e.staged is not None
        out: list[Path] = []
        if plan.kind == "dir":
            if os.path.lexists(e.dest):
                raise OutputExistsError(f"{self.flag} {e.dest} already exists; folder outputs never replace anything: "
                                        "choose a new name")
            os.rename(e.staged, e.dest)
            self._installed.append(("dir", e.dest, None))
            return [e.dest]
        for name in plan.data:
            target = self.folder / name
            if os.path.lexists(target):  # only our claim writes these names; someone else did
                raise OutputBusyError(f"{self.flag} {e.dest}: {target} appeared during the commit; another tool is "
                                      "writing this folder, rerun when it is done")
            os.rename(self.staging / name, target)
            self._installed.append(("new", target, None))
            out.append(target)
        existed = os.path.lexists(e.dest)
        backup = self._backup(e.dest) if existed and not last else None
        os.replace(e.staged, e.dest)
        self._installed.append(("replaced" if existed else "new", e.dest, backup))
        out.append(e.dest)
        return out

    def _rollback(self) -> None:
        """Undo the renames of a failed commit (newest first); best effort, never raises."""
        for what, path, backup in reversed(self._installed):
            with contextlib.suppress(OSError):
                if what == "dir":
                    os.rename(path, self.staging / f".rolled-back.{secrets.token_hex(4)}")
                elif what == "new":
                    os.unlink(path)
                elif backup is not None:
                    os.replace(backup, path)
        self._installed.clear()

    def _delete_unreferenced(self, plan: _Plan) -> None:
        """After the switch: delete the replaced model's data files and data left by interrupted
        commits of this destination that no .onnx in the folder mentions (best effort)."""
        with contextlib.suppress(OSError):
            self._delete_candidates(plan.entry.dest, set(plan.old_data), plan.keep, only_new_names=False)

    def _clean_orphans(self) -> None:
        """Delete the `X.onnx.<hex>.data` files that an interrupted commit of an .onnx destination left
        and that nothing references (the current X.onnx, any other .onnx here)."""
        for p in self._entries:
            if not p.name.lower().endswith(".onnx"):
                continue
            with contextlib.suppress(OSError):
                if not self._orphan_names(p, only_new_names=True):
                    continue
                refs: set[str] = set()
                if os.path.lexists(p):
                    locs = _locations(p)
                    if locs is None:
                        continue  # cannot read the current model: keep everything
                    refs = set(locs)
                self._delete_candidates(p, set(), refs, only_new_names=True)

    def _orphan_names(self, dest: Path, only_new_names: bool) -> set[str]:
        pat = re.compile(re.escape(dest.name) + (r"\.[0-9a-f]{8}\.data" if only_new_names
                                                 else r"(\.[0-9a-f]{8})?\.data"))
        return {n for n in os.listdir(self.folder) if pat.fullmatch(n)}

    def _delete_candidates(self, dest: Path, old: set[Path], keep: set[str], *, only_new_names: bool) -> None:
        cands: dict[str, Path] = {}
        for p in old:
            cands[p.name if p.parent == self.folder else os.path.relpath(p, self.folder)] = p
        for n in self._orphan_names(dest, only_new_names):
            cands.setdefault(n, self.folder / n)
        for n in list(cands):
            if n in keep:
                del cands[n]
        protected = [*self._shared, *self._inputs]
        for n, p in list(cands.items()):
            for q in protected:
                with contextlib.suppress(OSError):
                    if os.path.samefile(p, q):
                        del cands[n]
                        break
        if not cands:
            return
        basenames = {Path(n).name for n in cands}
        mentioned = _mentioned(_onnx_files_in(self.folder, exclude={dest.name}), basenames)
        for n, p in cands.items():
            if Path(n).name not in mentioned:
                with contextlib.suppress(OSError):
                    os.unlink(p)

    def _cleanup(self) -> None:
        """Remove staging, claims and (when nothing was committed) the parents we created. Never raises."""
        if self._staging is not None and self._staging_fd >= 0:
            _release_locked(self._staging, self._staging_fd)
            self._staging_fd = -1
        for c in reversed(self._claims):
            with contextlib.suppress(OSError):
                _release_locked(c.path, c.fd)
        self._claims.clear()
        if self._state != "committed":
            for d in reversed(self._created):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        self._created.clear()
        self._state = "closed"


def write_text_atomic(dest: Path | str, text: str | bytes, *, force: bool = False,
                      inputs: Sequence[Path | str] = (), flag: str = "--out", encoding: str = "utf-8") -> Path:
    """Write a small file (report, sidecar, calibration table) through an OutputTransaction."""
    with OutputTransaction(dest, inputs=inputs, force=force, flag=flag) as tx:
        staged = tx.stage_path()
        data = text if isinstance(text, bytes) else text.encode(encoding)
        with open(staged, "wb") as f:
            f.write(data)
        tx.add(staged)
        return tx.commit()[-1]
