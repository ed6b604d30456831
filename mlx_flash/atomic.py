"""Safe writes, in one place: atomic files, folders built aside and published by rename,
a lock per destination, removal of temporaries left by killed processes, and clear
messages for a full disk or a folder that cannot be written.

- :func:`atomic_path` / :func:`atomic_write_text`: one file (temp file beside it, fsync, rename).
- :class:`FolderBuild` / :func:`build_folder`: a model folder. The destination is locked
  (:func:`destination_lock`), stale temporaries next to it are removed (:func:`clean_stale`),
  the free space is checked (:func:`check_space`), the folder is written in a hidden temp folder
  ``.NAME.tmp-PID-XXXXXXXX`` that :func:`publish_dir` renames onto the destination only when
  complete. On any error the temp folder goes and the error becomes a one-line
  :class:`WriteError` when it is a full disk or a permission problem (:func:`write_error`).

Temporaries carry their owner's pid in the name, so :func:`clean_stale` can tell the leftovers
of a killed process (pid not alive) from the work of a running one. Lock files
(``.NAME.lock``, holding the owner's pid) are removed by their owner on release; one left by a
killed process is unlocked (the kernel releases ``flock`` locks at exit) and removed by the
next :func:`clean_stale`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import resource
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

from .progress import ProgressCallback, report
from .units import fmt_bytes

PathLike = Union[str, Path]

#: errno values that mean "the disk (or the user's quota) is full" and "not allowed to write".
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)

#: ``.NAME.KIND-PID-HEX[SUFFIX]``: a temporary made by this module (file or folder).
_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|work|trash)-(?P<pid>\d+)-[0-9a-f]{8}(?P<suffix>[^/]*)$")
_LOCK_RE = re.compile(r"^\.(?P<name>.+)\.lock$")
#: temporaries of mlx-flash versions before pids were in the names (``tempfile.mkdtemp`` suffixes): removed
#: once a day old, since nothing tells whether their process still runs.
_LEGACY_RE = re.compile(r"^\.(?:(?:convert|import|gguf)-|.+\.(?:tmp|old)-)[a-z0-9_]{8}$")
LEGACY_AGE_S = 24 * 3600


# --------------------------------------------------------------------------- errors
class WriteError(OSError):
    """A write failed for a reason the user can act on (full disk, no permission); ``str()``
    is the one-line message, ``errno`` the cause."""

    def __str__(self) -> str:
        return str(self.strerror)


class DestinationBusy(OSError):
    """Another process (or thread) is writing the same destination."""

    def __init__(self, dst: Path, pid: Optional[int]):
        who = f"another process (pid {pid})" if pid else "another process"
        super().__init__(errno.EBUSY, f"{dst} is being written by {who}: wait for it to finish or choose "
                                      "another destination")
        self.dst, self.pid = dst, pid

    def __str__(self) -> str:
        return str(self.strerror)


def free_bytes(folder: PathLike) -> int:
    """Free bytes for an unprivileged writer on the disk holding ``folder`` (its nearest
    existing ancestor); -1 when unknown."""
    p = Path(folder)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return -1
    return st.f_bavail * st.f_frsize


def _errno_of(e: BaseException, folder: Path, need: Optional[int]) -> Optional[int]:
    code = getattr(e, "errno", None)
    if isinstance(code, int):
        return code
    # MLX reports failed writes as a RuntimeError without errno: infer the usual causes
    if isinstance(e, RuntimeError):
        free = free_bytes(folder)
        if 0 <= free < max(need or 0, 1 << 20):
            return errno.ENOSPC
        if not os.access(folder if folder.exists() else folder.parent, os.W_OK):
            return errno.EACCES
        if "write" in str(e).lower() and _file_size_limit() is not None:
            return errno.EFBIG
    return None


def _file_size_limit() -> Optional[int]:
    """This process's largest writable file in bytes (``ulimit -f``, RLIMIT_FSIZE), None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else int(soft)


def write_error(e: BaseException, dst: PathLike, *, need: Optional[int] = None,
                what: str = "") -> BaseException:
    """``e`` turned into a one-line :class:`WriteError` when it is a full disk (ENOSPC, EDQUOT,
    EFBIG) or a permission problem (EACCES, EPERM, EROFS) while writing ``dst``; any other
    error comes back unchanged. ``need``: bytes the whole write needs (said in the message);
    ``what``: what was being written (default: ``dst``)."""
    if isinstance(e, (WriteError, DestinationBusy)):
        return e
    dst = Path(dst)
    code = _errno_of(e, dst.parent, need)
    what = what or str(dst)
    if code == errno.EFBIG and (limit := _file_size_limit()) is not None:
        free = free_bytes(dst.parent)
        free_s = f"{fmt_bytes(free)} is free on {dst.parent}; " if free >= 0 else ""
        return WriteError(code, f"file too large while writing {what}: this process may write files of at most "
                                f"{fmt_bytes(limit)} (its file-size limit, ulimit -f); {free_s}nothing was written "
                                "(raise the limit)")
    if code in DISK_FULL:
        free = free_bytes(dst.parent)
        free_s = fmt_bytes(free) if free >= 0 else "an unknown amount"
        need_s = f"about {fmt_bytes(need)} is needed and " if need else ""
        kind = "quota exceeded" if code == errno.EDQUOT else "disk full"
        return WriteError(code, f"{kind} while writing {what}: {need_s}{free_s} is free on {dst.parent}; "
                                "nothing was written (free up space or choose another folder)")
    if code in NOT_WRITABLE:
        why = "the disk is read-only" if code == errno.EROFS else "permission denied"
        where = getattr(e, "filename", None) or dst.parent
        return WriteError(code, f"cannot write {what}: {why} ({where}); nothing was written "
                                "(choose a folder you can write to)")
    return e


@contextlib.contextmanager
def translate_write_errors(dst: PathLike, *, need: Optional[int] = None, what: str = "") -> Iterator[None]:
    """Re-raise full-disk and permission errors inside the block as :func:`write_error` messages."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        t = write_error(e, dst, need=need, what=what)
        if t is e:
            raise
        raise t from e


def check_space(folder: PathLike, need: int, what: str) -> None:
    """Raise :class:`WriteError` (ENOSPC) when the disk holding ``folder`` has less than ``need``
    bytes free; ``what`` names the job (and may list its parts) for the message."""
    free = free_bytes(folder)
    if 0 <= free < need:
        raise WriteError(errno.ENOSPC, f"not enough disk space for {what}: about {fmt_bytes(need)} is needed and "
                                       f"{fmt_bytes(free)} is free on {folder} (free up space or choose another "
                                       "folder)")


# --------------------------------------------------------------------------- temporaries
def temp_name(target: str, kind: str = "tmp", suffix: str = "") -> str:
    """A hidden name for a temporary of ``target`` owned by this process."""
    return f".{target}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def make_temp_dir(dst: PathLike, kind: str = "tmp") -> Path:
    """A new hidden folder beside ``dst`` owned by this process (see :func:`clean_stale`)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    while True:
        p = dst.parent / temp_name(dst.name, kind)
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # Linux: a killed process its parent has not reaped yet (a zombie) still answers kill(0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


def clean_stale(folder: PathLike, *, depth: int = 2) -> List[Path]:
    """Remove the temporaries (``.NAME.tmp|old|work|trash-PID-…``) of processes that are no longer
    running (an ``old`` whose destination is missing is moved back instead) and unheld lock files,
    in ``folder`` and (``depth`` 2) its non-hidden sub-folders; return what was removed. Never
    touches a temporary whose process is alive."""
    folder = Path(folder)
    removed: List[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for p in entries:
        name = p.name
        if not name.startswith("."):
            if depth > 1 and p.is_dir() and not p.is_symlink():
                removed += clean_stale(p, depth=depth - 1)
            continue
        m = _TEMP_RE.match(name)
        if m:
            if not pid_alive(int(m["pid"])):
                target = folder / m["name"]
                if m["kind"] == "old" and not m["suffix"] and not (target.exists() or target.is_symlink()):
                    # killed between moving the old version aside and moving the new one in: put it back
                    # (if that fails, keep it: it is the user's model)
                    with contextlib.suppress(OSError):
                        os.replace(p, target)
                    continue
                _remove(p)
                removed.append(p)
            continue
        if _LOCK_RE.match(name) and p.is_file() and _remove_unheld_lock(p):
            removed.append(p)
        elif _LEGACY_RE.match(name) and p.is_dir() and not p.is_symlink():
            try:
                old = time.time() - p.stat().st_mtime > LEGACY_AGE_S
            except OSError:
                continue
            if old:
                _remove(p)
                removed.append(p)
    return removed


# --------------------------------------------------------------------------- locks
_held: Dict[Tuple[str, int], List[int]] = {}  # (lock path, thread) -> [fd, depth]
_held_mu = threading.Lock()


def lock_path(dst: PathLike) -> Path:
    dst = Path(dst)
    return dst.parent / f".{dst.name}.lock"


def _read_pid(fd: int) -> Optional[int]:
    try:
        data = os.pread(fd, 32, 0)
        return int(data.split()[0]) if data.strip() else None
    except (OSError, ValueError, IndexError):
        return None


def _try_lock(path: Path) -> Tuple[Optional[int], Optional[int]]:
    """(fd holding the exclusive lock on ``path``, None) or (None, pid of the holder)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            return None, pid
        except BaseException:
            os.close(fd)
            raise
        try:  # the file may have been unlinked by its previous owner between our open and flock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd, None
        os.close(fd)


def _remove_unheld_lock(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


@contextlib.contextmanager
def destination_lock(dst: PathLike, *, wait: bool = False, progress: Optional[ProgressCallback] = None,
                     poll: float = 0.5) -> Iterator[Path]:
    """Hold an exclusive lock on ``dst`` (the file ``.NAME.lock`` beside it, holding this pid)
    for the block. Held by another process or thread: raise :class:`DestinationBusy` naming
    its pid, or with ``wait`` poll until it is free (reporting to ``progress``, whose ``False``
    cancels). Re-entrant within a thread. Full-disk/permission errors become :class:`WriteError`."""
    dst = Path(dst).expanduser()
    path = lock_path(dst)
    key = (os.path.abspath(path), threading.get_ident())
    with _held_mu:
        if key in _held:
            _held[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_mu:
                _held[key][1] -= 1
        return
    with translate_write_errors(dst):
        dst.parent.mkdir(parents=True, exist_ok=True)
        unnamed = 0
        while True:
            fd, pid = _try_lock(path)
            if fd is not None:
                break
            # a holder between its flock and writing its pid, or clean_stale probing a dead process's file
            if (pid is None or not pid_alive(pid)) and unnamed < 40:
                unnamed += 1
                time.sleep(0.025)
                continue
            if not wait:
                raise DestinationBusy(dst, pid)
            report(progress, 0.0, f"waiting for process {pid or '?'} writing {dst.name}")
            time.sleep(poll)
        try:  # the pid only names the holder in messages: a full disk must not cost the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
    with _held_mu:
        _held[key] = [fd, 1]
    try:
        yield path
    finally:
        with _held_mu:
            del _held[key]
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still holding it: a waiter re-checks the inode and retries
        os.close(fd)


# --------------------------------------------------------------------------- folders
def publish_dir(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``dst``; an existing ``dst`` is replaced only with
    ``overwrite``, and is put back if the move fails."""
    if dst.exists() or dst.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists (pass overwrite=True to replace it)")
        old = dst.parent / temp_name(dst.name, "old")
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        _remove(old)
    else:
        os.replace(tmp, dst)
    fsync_dir(dst.parent)


def fsync_dir(p: Path) -> None:
    """Make a folder's entries (renames, new files) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class FolderBuild:
    """Build a folder aside, then publish it onto ``dst``.

    ``FolderBuild(dst, ...)`` locks ``dst``, removes stale temporaries beside it, refuses an
    existing ``dst`` without ``overwrite``, checks ``need`` bytes of free space and makes the
    temp folder ``.tmp``. Write into it, then call :meth:`publish`; on failure raise
    ``build.fail(e)`` (removes the temp folder, releases the lock, returns the exception to
    raise: full-disk and permission errors translated). Use :func:`build_folder` for the
    ``with`` form.
    """

    def __init__(self, dst: PathLike, *, overwrite: bool = False, need: Optional[int] = None,
                 what: str = "", kind: str = "tmp"):
        self.dst = Path(dst).expanduser()
        self.overwrite, self.need, self.what = overwrite, need, what or str(self.dst)
        self._stack = contextlib.ExitStack()
        try:
            self._stack.enter_context(destination_lock(self.dst))
            clean_stale(self.dst.parent, depth=1)
            if (self.dst.exists() or self.dst.is_symlink()) and not overwrite:
                raise FileExistsError(f"{self.dst} already exists (pass overwrite=True to replace it)")
            if need:
                check_space(self.dst.parent, need, self.what)
            with translate_write_errors(self.dst, need=need, what=self.what):
                self.tmp = make_temp_dir(self.dst, kind)
        except BaseException:
            self._stack.close()
            raise

    def publish(self) -> Path:
        try:
            with translate_write_errors(self.dst, need=self.need, what=self.what):
                publish_dir(self.tmp, self.dst, self.overwrite)
        except BaseException:
            _remove(self.tmp)
            self._stack.close()
            raise
        self._stack.close()
        return self.dst

    def fail(self, e: BaseException) -> BaseException:
        _remove(self.tmp)
        self._stack.close()
        if isinstance(e, (OSError, RuntimeError)):
            t = write_error(e, self.dst, need=self.need, what=self.what)
            if t is not e:
                t.__cause__ = e
            return t
        return e


@contextlib.contextmanager
def build_folder(dst: PathLike, *, overwrite: bool = False, need: Optional[int] = None,
                 what: str = "", kind: str = "tmp") -> Iterator[Path]:
    """``with build_folder(dst) as tmp:`` write ``tmp``; it becomes ``dst`` when the block ends
    without error (see :class:`FolderBuild`)."""
    b = FolderBuild(dst, overwrite=overwrite, need=need, what=what, kind=kind)
    try:
        yield b.tmp
    except BaseException as e:
        t = b.fail(e)
        if t is e:
            raise
        raise t from e
    b.publish()


@contextlib.contextmanager
def scratch_dir(dst: PathLike, kind: str = "work") -> Iterator[Path]:
    """A hidden folder beside ``dst`` owned by this process for intermediate files; removed when
    the block ends, however it ends (a killed process's is removed by :func:`clean_stale`)."""
    with translate_write_errors(dst):
        p = make_temp_dir(dst, kind)
    try:
        yield p
    finally:
        _remove(p)


# --------------------------------------------------------------------------- files
@contextlib.contextmanager
def atomic_path(path: PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    The caller writes the temporary path however it likes (``mx.save_safetensors``, ``open``...).
    On any exception the temporary file is removed and the exception propagates (a full disk or
    a permission problem as a one-line :class:`WriteError`).
    """
    path = Path(path)
    with translate_write_errors(path, what=str(path)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_name(path.name, "tmp") + ".", suffix=suffix, dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model folder's other files are world-readable
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
