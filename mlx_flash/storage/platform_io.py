"""Platform shim for reads that bypass the operating system's page cache.

The paper measures flash reads, not RAM copies: if a neuron read were served by
the page cache, the measured I/O would be fiction. So the flash reader opens
``ffn.bin`` through :func:`open_uncached`:

- Linux: ``O_DIRECT``. Offsets and lengths must be multiples of the device's
  logical block size (:func:`direct_alignment`: ``/sys/dev/block/MAJ:MIN/queue/
  logical_block_size`` of the file's device, the parent disk's for a partition; 512
  on most disks, :data:`DIRECT_ALIGNMENT` = 4096 when unknown), the memory buffer too
  (:func:`aligned_buffer` gives page-aligned anonymous ``mmap`` buffers). Smaller
  alignment means fewer padding bytes around small reads. The alignment is checked
  with one read at it when the file is opened (4096 when that read fails). Some
  filesystems (tmpfs, some FUSE) refuse ``O_DIRECT`` at open or at the first read
  (``EINVAL``): then the file is reopened buffered with a warning.
- macOS: ``fcntl(fd, F_NOCACHE, 1)`` (F_NOCACHE is 48 when Python's ``fcntl``
  lacks the constant). No alignment is required, aligned reads are faster.
- elsewhere / fallback: a normal buffered descriptor plus
  ``posix_fadvise(POSIX_FADV_DONTNEED)`` where available, and a
  :class:`UncachedIOWarning` saying measured I/O may come from the page cache.
"""

from __future__ import annotations

import errno
import mmap
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

DIRECT_ALIGNMENT = 4096
"""Alignment that O_DIRECT accepts on all common disks (offsets, lengths, buffers): the fallback when
the device's logical block size is unknown, and the alignment of reads in the other modes."""

MODE_O_DIRECT = "O_DIRECT"
MODE_F_NOCACHE = "F_NOCACHE"
MODE_BUFFERED = "buffered"

F_NOCACHE = 48  # <sys/fcntl.h> on macOS


class UncachedIOWarning(UserWarning):
    """Reads could not bypass the page cache: measured I/O may be served from RAM."""


@dataclass
class UncachedFile:
    """A read-only descriptor opened by :func:`open_uncached`.

    fd:    the OS file descriptor (use ``os.preadv``/``os.pread``).
    mode:  "O_DIRECT", "F_NOCACHE" or "buffered".
    path:  the file.
    alignment: the alignment reads must respect in this mode (O_DIRECT: the device's
           logical block size, see :func:`direct_alignment`; 1 otherwise).
    """

    fd: int
    mode: str
    path: Path
    alignment: int = 1

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "UncachedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def read_alignment(self) -> int:
        """The alignment readers should use: what O_DIRECT requires, and
        :data:`DIRECT_ALIGNMENT` in the other modes (not required there, but whole
        pages read faster; macOS F_NOCACHE keeps it)."""
        return self.alignment if self.mode == MODE_O_DIRECT else DIRECT_ALIGNMENT


def logical_block_size(path: Union[str, Path]) -> Optional[int]:
    """Linux: the logical block size of the block device holding ``path``, from
    ``/sys/dev/block/MAJ:MIN/queue/logical_block_size`` (a partition has no ``queue``:
    its parent disk's is used). None where unknown: not Linux, no sysfs, or a device
    that is not a block device (overlayfs, tmpfs, NFS, FUSE: major 0)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return None
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None
    return sysfs_block_size(Path("/sys/dev/block"), major, minor)


def sysfs_block_size(dev_block: Path, major: int, minor: int) -> Optional[int]:
    """The logical block size of device ``major:minor`` from a sysfs ``dev/block`` folder
    (``dev_block/MAJ:MIN`` links to the device's folder; a partition's folder sits inside
    its disk's and has no ``queue``). None when absent or not a power of two."""
    try:
        node = (dev_block / f"{major}:{minor}").resolve(strict=True)
    except OSError:
        return None
    for d in (node, node.parent):
        try:
            v = int((d / "queue" / "logical_block_size").read_text().strip())
        except (OSError, ValueError):
            continue
        if v > 0 and v & (v - 1) == 0:
            return v
    return None


def direct_alignment(path: Union[str, Path]) -> int:
    """The alignment O_DIRECT reads of ``path`` need: the device's logical block size
    (:func:`logical_block_size`), :data:`DIRECT_ALIGNMENT` when unknown."""
    return logical_block_size(path) or DIRECT_ALIGNMENT


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zero-filled, page-aligned, writable anonymous buffer of at least ``nbytes``
    (rounded up to whole pages; ``mmap`` memory is always page aligned)."""
    page = max(mmap.PAGESIZE, DIRECT_ALIGNMENT)
    n = max(page, -(-int(nbytes) // page) * page)
    return mmap.mmap(-1, n)


def _fadvise_dontneed(fd: int) -> bool:
    if hasattr(os, "posix_fadvise") and hasattr(os, "POSIX_FADV_DONTNEED"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return True
        except OSError:
            return False
    return False


def _direct_read_works(fd: int, alignment: int = DIRECT_ALIGNMENT) -> bool:
    """Some filesystems accept O_DIRECT at open but fail the read, some need more
    alignment than the device says: try one ``alignment``-sized read at offset
    ``alignment`` (the start of the file when it is shorter)."""
    buf = aligned_buffer(alignment)
    try:
        size = os.fstat(fd).st_size
        offset = alignment if size >= 2 * alignment else 0
        with memoryview(buf) as mv:
            os.preadv(fd, [mv[:alignment]], offset)
        return True
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return False
        raise
    finally:
        buf.close()


def open_uncached(path: Union[str, Path], *, direct: bool = True, warn: bool = True) -> UncachedFile:
    """Open ``path`` read-only so that reads bypass the page cache when possible.

    ``direct=False`` opens a plain buffered descriptor (mode "buffered") without
    a warning: the caller asked for it. When ``direct`` is true but the platform
    or filesystem cannot bypass the cache, the buffered descriptor comes with an
    :class:`UncachedIOWarning` (unless ``warn`` is false).
    Raises ``FileNotFoundError``/``OSError`` like ``os.open``.
    """
    p = Path(path)
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
            reason = f"O_DIRECT refused at open ({os.strerror(e.errno)})"
        else:
            align = direct_alignment(p)
            if align < DIRECT_ALIGNMENT and not _direct_read_works(fd, align):
                align = DIRECT_ALIGNMENT
            if _direct_read_works(fd, align):
                return UncachedFile(fd, MODE_O_DIRECT, p, align)
            os.close(fd)
            reason = "O_DIRECT refused at read (EINVAL)"
    elif direct and sys.platform == "darwin":
        import fcntl  # noqa: PLC0415 - POSIX only (no fcntl on Windows); only macOS uses it

        fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
        except OSError as e:
            os.close(fd)
            fd = -1
            reason = f"F_NOCACHE refused ({os.strerror(e.errno)})"
        else:
            return UncachedFile(fd, MODE_F_NOCACHE, p, 1)
    else:
        reason = "this platform has neither O_DIRECT nor F_NOCACHE" if direct else ""

    fd = os.open(p, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    _fadvise_dontneed(fd)
    if direct and warn:
        warnings.warn(
            f"{p}: cannot bypass the page cache ({reason}); reads are buffered and "
            "measured I/O may be served by the page cache, not the disk",
            UncachedIOWarning,
            stacklevel=2,
        )
    return UncachedFile(fd, MODE_BUFFERED, p, 1)


def drop_page_cache(path: Union[str, Path]) -> bool:
    """Ask the OS to evict ``path``'s pages from the page cache (for benchmarks).

    Uses ``posix_fadvise(POSIX_FADV_DONTNEED)`` after an ``fdatasync`` (dirty
    pages cannot be dropped). Returns False where the platform has no way to do
    it (macOS: use F_NOCACHE reads instead, or ``purge``).
    """
    try:
        fd = os.open(Path(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        if hasattr(os, "fdatasync"):
            try:
                os.fdatasync(fd)
            except OSError:
                pass
        return _fadvise_dontneed(fd)
    finally:
        os.close(fd)


def set_nocache(fd: int) -> bool:
    """macOS: mark ``fd`` F_NOCACHE so data written through it does not linger in
    the unified buffer cache (where later F_NOCACHE reads could still find it).
    Elsewhere a no-op returning False (Linux: O_DIRECT reads are coherent with
    the page cache; use :func:`drop_page_cache` after writing)."""
    if sys.platform != "darwin":
        return False
    import fcntl  # noqa: PLC0415 - POSIX only (no fcntl on Windows); only macOS uses it

    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", F_NOCACHE), 1)
        return True
    except OSError:
        return False


# sched_setattr / sched_getattr system call numbers of the Linux architectures that have them
_SCHED_SYSCALLS = {"x86_64": (314, 315), "amd64": (314, 315), "aarch64": (274, 275), "arm64": (274, 275)}
IO_THREAD_SLICE_NS = 100_000
"""Linux: the scheduler time slice a read thread asks for (the smallest EEVDF accepts, 0.1 ms)."""
_QOS_CLASS_USER_INTERACTIVE = 0x21  # <sys/qos.h> on macOS


def favour_io_thread() -> str:
    """Ask the OS to run the calling thread soon after it wakes (a read thread: it sleeps in a
    read or a queue most of the time and runs briefly), without raising its share of the CPU
    and without privileges. Returns what was done ("" when nothing could be).

    - Linux 6.12+ (EEVDF): ``sched_setattr`` with a custom slice of :data:`IO_THREAD_SLICE_NS`
      for the thread (``sched_runtime`` of a SCHED_OTHER thread; allowed unprivileged): its
      earlier deadline lets a woken read thread preempt a running compute thread instead of
      queueing behind it for a whole default slice (about 1-3 ms). Older kernels, other
      architectures, or a thread that is not SCHED_OTHER: nothing.
    - macOS: ``pthread_set_qos_class_self_np(QOS_CLASS_USER_INTERACTIVE)``.
    - elsewhere: nothing.
    """
    try:
        import ctypes  # noqa: PLC0415 - only the read threads' start needs it

        if sys.platform == "darwin":
            libc = ctypes.CDLL(None)
            return "qos user-interactive" if libc.pthread_set_qos_class_self_np(
                _QOS_CLASS_USER_INTERACTIVE, 0) == 0 else ""
        import platform  # noqa: PLC0415

        nums = _SCHED_SYSCALLS.get(platform.machine().lower())
        if not sys.platform.startswith("linux") or nums is None:
            return ""

        class _SchedAttr(ctypes.Structure):
            _fields_ = [("size", ctypes.c_uint32), ("sched_policy", ctypes.c_uint32),
                        ("sched_flags", ctypes.c_uint64), ("sched_nice", ctypes.c_int32),
                        ("sched_priority", ctypes.c_uint32), ("sched_runtime", ctypes.c_uint64),
                        ("sched_deadline", ctypes.c_uint64), ("sched_period", ctypes.c_uint64)]

        libc = ctypes.CDLL(None, use_errno=True)
        attr = _SchedAttr()
        attr.size = ctypes.sizeof(attr)
        if libc.syscall(nums[1], 0, ctypes.byref(attr), ctypes.sizeof(attr), 0) != 0 or attr.sched_policy != 0:
            return ""
        if attr.sched_runtime and attr.sched_runtime <= IO_THREAD_SLICE_NS:
            return f"slice {attr.sched_runtime / 1e6:g} ms"
        attr.size = ctypes.sizeof(attr)
        attr.sched_runtime = IO_THREAD_SLICE_NS
        if libc.syscall(nums[0], 0, ctypes.byref(attr), 0) != 0:
            return ""
        check = _SchedAttr()  # kernels before EEVDF's custom slices accept and ignore it
        if libc.syscall(nums[1], 0, ctypes.byref(check), ctypes.sizeof(check), 0) != 0 \
                or check.sched_runtime != IO_THREAD_SLICE_NS:
            return ""
        return f"slice {IO_THREAD_SLICE_NS / 1e6:g} ms"
    except (OSError, AttributeError, TypeError):  # no libc symbol, no ctypes support
        return ""


def thread_sched_seconds(native_ids) -> Optional[Tuple[float, float]]:
    """``(seconds on a CPU, seconds runnable but waiting for a CPU)`` summed over the threads
    of this process with these native ids (``threading.Thread.native_id``), from Linux's
    ``/proc/self/task/TID/schedstat``; None where that is not available (other platforms,
    no schedstat). What the reader's threads cost, and how long they queued behind other
    threads (the engine's compute, other processes) for a CPU."""
    cpu = wait = 0.0
    for tid in native_ids:
        try:
            with open(f"/proc/self/task/{int(tid)}/schedstat", "rb") as f:
                fields = f.read().split()
            cpu += int(fields[0]) / 1e9
            wait += int(fields[1]) / 1e9
        except (OSError, ValueError, IndexError, TypeError):
            return None
    return cpu, wait


def pread_exact(fd: int, buf: Union[mmap.mmap, memoryview, bytearray], offset: int, nbytes: int) -> int:
    """Read exactly ``nbytes`` at ``offset`` into the start of ``buf``.

    Loops over short reads; returns the number of bytes read, which is less
    than ``nbytes`` only at end of file. Releases the GIL while reading.
    """
    got = 0
    with memoryview(buf) as mv:
        while got < nbytes:
            if hasattr(os, "preadv"):
                n = os.preadv(fd, [mv[got:nbytes]], offset + got)
            else:  # pragma: no cover - macOS < 11
                data = os.pread(fd, nbytes - got, offset + got)
                n = len(data)
                mv[got : got + n] = data
            if n == 0:
                break
            got += n
    return got


__all__ = [
    "DIRECT_ALIGNMENT",
    "MODE_BUFFERED",
    "MODE_F_NOCACHE",
    "MODE_O_DIRECT",
    "UncachedFile",
    "UncachedIOWarning",
    "aligned_buffer",
    "direct_alignment",
    "drop_page_cache",
    "favour_io_thread",
    "logical_block_size",
    "sysfs_block_size",
    "open_uncached",
    "pread_exact",
    "set_nocache",
    "thread_sched_seconds",
]
