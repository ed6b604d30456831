"""Measure a disk the way the paper's flash-throughput figure does.

:func:`probe_disk` writes a temporary file of random bytes on the filesystem of a
folder, then for every (chunk size, thread count) cell reads random aligned
chunks with page-cache-bypassing reads (:mod:`mlx_flash.storage.platform_io`)
from that many threads for a fixed time, and reports GB/s (10^9 bytes/s).
Small random reads are slow and parallelism helps; the table shows by how much,
and :meth:`ProbeResult.choose` turns it into the reader's ``(chunk_bytes, threads)``.

:func:`cached_probe` keeps results in ``<data dir>/probe.json`` keyed by the
folder's device (``os.stat(dir).st_dev``) so a disk is measured once a month,
and :func:`load_cached_choice` gives the engine a choice without probing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..atomic import atomic_write_text
from ..paths import data_dir
from ..progress import ProgressCallback, report, scaled
from .platform_io import DIRECT_ALIGNMENT, aligned_buffer, drop_page_cache, open_uncached, set_nocache

KiB = 1024
MiB = 1024 * 1024
DEFAULT_CHUNKS: Tuple[int, ...] = (4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB)
DEFAULT_THREADS: Tuple[int, ...] = (1, 2, 4, 8, 16, 32)
DEFAULT_CHOICE: Tuple[int, int] = (256 * KiB, 16)
"""(chunk_bytes, threads) when no probe result is known (a sound choice on the
SSDs and virtual disks measured so far)."""

DEFAULT_GAP: int = 16 * KiB
"""Largest gap the reader reads through (coalescing neighbouring runs) when no probe is known."""

PROBE_FILE = "probe.json"


def _fmt_bytes(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


@dataclass
class ProbeResult:
    """Throughput of one filesystem.

    table: chunk bytes -> thread count -> GB/s (10^9 bytes per second).
    mode:  how reads bypassed the page cache ("O_DIRECT", "F_NOCACHE"; "buffered"
           means the numbers may be the page cache's, not the disk's).
    """

    table: Dict[int, Dict[int, float]]
    mode: str = ""
    directory: str = ""
    device: int = 0
    file_bytes: int = 0
    seconds_per_cell: float = 0.0
    created: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def chunk_sizes(self) -> Tuple[int, ...]:
        return tuple(sorted(self.table))

    @property
    def thread_counts(self) -> Tuple[int, ...]:
        return tuple(sorted({t for row in self.table.values() for t in row}))

    def best(self, chunk: int) -> Tuple[int, float]:
        """``(threads, GB/s)`` of the fastest thread count at ``chunk`` bytes
        (the nearest measured chunk size when ``chunk`` was not measured)."""
        if not self.table:
            raise ValueError("empty probe result")
        c = chunk if chunk in self.table else min(self.table, key=lambda k: abs(np.log2(k) - np.log2(max(1, chunk))))
        row = self.table[c]
        t = max(row, key=lambda k: (row[k], -k))
        return t, row[t]

    def choose(self, min_chunk: int = 16 * KiB, max_chunk: int = 1 * MiB, tolerance: float = 0.95) -> Tuple[int, int]:
        """``(chunk_bytes, threads)`` for the flash reader.

        Policy: coalesced neuron runs produce requests between ``min_chunk`` and
        ``max_chunk`` (a run of a few bundles is 16-64 KiB; long runs are split at
        chunk_bytes; 4 KiB requests are rare once runs coalesce), so one thread count must
        serve that whole range: score each thread count by the geometric mean of
        its throughput over the measured chunk sizes in the range, and take the
        fewest threads within ``tolerance`` of the best score (threads cost CPU
        that the matmuls want). The chunk size is then the fastest one at that
        thread count, ties going to the larger chunk (fewer requests).
        """
        if not self.table:
            return DEFAULT_CHOICE
        chunks = [c for c in self.chunk_sizes if min_chunk <= c <= max_chunk] or list(self.chunk_sizes)
        threads = [t for t in self.thread_counts if all(t in self.table[c] for c in chunks)]
        if not threads:
            return DEFAULT_CHOICE
        score = {t: float(np.exp(np.mean([np.log(max(self.table[c][t], 1e-9)) for c in chunks]))) for t in threads}
        top = max(score.values())
        t_best = min(t for t in threads if score[t] >= tolerance * top)
        c_best = max(chunks, key=lambda c: (self.table[c][t_best], c))
        return c_best, t_best

    def at(self, nbytes: float, threads: int) -> Optional[float]:
        """GB/s at a request size of ``nbytes`` with ``threads`` threads: interpolated in
        log2(chunk size) between the measured sizes (the end values beyond them); None when
        that thread count was not measured."""
        pts = [(c, self.table[c][threads]) for c in self.chunk_sizes if threads in self.table[c]]
        if not pts:
            return None
        x = np.log2([c for c, _ in pts])
        return float(np.interp(np.log2(max(1.0, float(nbytes))), x, [g for _, g in pts]))

    def request_cost(self, threads: int) -> Tuple[float, float]:
        """``(seconds per request, bytes per second)`` at ``threads`` threads (the nearest
        measured count): the fit ``time = requests * t0 + bytes / bandwidth`` over the
        measured chunk sizes (each cell gives the time of one request of that size,
        ``chunk / GB/s``; least squares on relative error, so small chunks weigh as
        much as large ones). t0 is what one more request costs, the bandwidth what one
        more byte costs."""
        t = min(self.thread_counts, key=lambda k: (abs(np.log2(k) - np.log2(max(1, threads))), k))
        c = np.array([x for x in self.chunk_sizes if t in self.table[x]], dtype=np.float64)
        per_req = np.array([x / max(self.table[int(x)][t] * 1e9, 1.0) for x in c])
        if len(c) < 2:
            return 0.0, float(c[0] / per_req[0]) if len(c) else 1e9
        w = 1.0 / per_req
        a = np.vstack([np.ones_like(c), c]).T * w[:, None]
        (t0, slope), *_ = np.linalg.lstsq(a, per_req * w, rcond=None)
        if slope <= 0:  # not a disk-like table (bigger requests no slower): gaps cost nothing
            return max(float(t0), 0.0), float("inf")
        return max(float(t0), 0.0), float(1.0 / slope)

    def gap_bytes(self, threads: int, alignment: int = 512) -> int:
        """The largest gap between two runs of bundles worth reading through instead of
        issuing a second request: what a request costs, in bytes (``t0 * bandwidth`` of
        :meth:`request_cost`), rounded down to ``alignment`` and capped at 1 MiB."""
        t0, bw = self.request_cost(threads)
        gap = MiB if not np.isfinite(bw) else min(MiB, int(t0 * bw))
        return max(0, (gap // alignment) * alignment)

    def format_table(self) -> str:
        """A Markdown table like FACTS.md's: rows are chunk sizes, columns thread counts."""
        ts = self.thread_counts
        head = "| chunk | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in ts) + " |"
        sep = "|---|" + "---|" * len(ts)
        lines = [head, sep]
        for c in self.chunk_sizes:
            cells = [f"{self.table[c][t]:.2f}" if t in self.table[c] else "" for t in ts]
            lines.append(f"| {_fmt_bytes(c)} | " + " | ".join(cells) + " |")
        note = f"GB/s, random {self.mode or '?'} reads"
        if self.file_bytes:
            note += f" of a {self.file_bytes / 2**30:.2f} GiB file"
        if self.seconds_per_cell:
            note += f", {self.seconds_per_cell:g} s per cell"
        return "\n".join(lines) + "\n" + note

    def to_dict(self) -> Dict[str, Any]:
        return {
            "table": {str(c): {str(t): v for t, v in row.items()} for c, row in self.table.items()},
            "mode": self.mode,
            "directory": self.directory,
            "device": self.device,
            "file_bytes": self.file_bytes,
            "seconds_per_cell": self.seconds_per_cell,
            "created": self.created,
            **self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ProbeResult":
        table = {int(c): {int(t): float(v) for t, v in row.items()} for c, row in d["table"].items()}
        known = {"table", "mode", "directory", "device", "file_bytes", "seconds_per_cell", "created"}
        return cls(
            table=table,
            mode=str(d.get("mode", "")),
            directory=str(d.get("directory", "")),
            device=int(d.get("device", 0)),
            file_bytes=int(d.get("file_bytes", 0)),
            seconds_per_cell=float(d.get("seconds_per_cell", 0.0)),
            created=str(d.get("created", "")),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_json(cls, text: Union[str, bytes, Mapping[str, Any]]) -> "ProbeResult":
        return cls.from_dict(text if isinstance(text, Mapping) else json.loads(text))

    def age(self) -> Optional[timedelta]:
        """How old the measurement is (None if unknown)."""
        try:
            return datetime.now(timezone.utc) - datetime.fromisoformat(self.created)
        except (ValueError, TypeError):
            return None


def _write_random_file(path: Path, nbytes: int, progress: Optional[ProgressCallback]) -> None:
    rng = np.random.default_rng()
    block = 4 * MiB
    with open(path, "wb") as f:
        set_nocache(f.fileno())
        done = 0
        while done < nbytes:
            n = min(block, nbytes - done)
            f.write(rng.bytes(n))
            done += n
            report(progress, done / nbytes, f"writing probe file {done >> 20}/{nbytes >> 20} MiB")
        f.flush()
        os.fsync(f.fileno())


def probe_disk(
    directory: Union[str, Path],
    *,
    file_bytes: int = 512 * MiB,
    chunk_sizes: Sequence[int] = DEFAULT_CHUNKS,
    threads: Sequence[int] = DEFAULT_THREADS,
    seconds_per_cell: float = 0.25,
    progress: Optional[ProgressCallback] = None,
) -> ProbeResult:
    """Measure random-read throughput of ``directory``'s filesystem.

    Writes a temporary file of ``file_bytes`` random bytes in ``directory``
    (deleted afterwards, also on error or cancel), then for each chunk size and
    thread count reads random ``DIRECT_ALIGNMENT``-aligned chunks for
    ``seconds_per_cell`` seconds. Takes about ``len(chunk_sizes) * len(threads) *
    seconds_per_cell`` seconds plus the time to write the file. The progress
    callback may cancel (``Cancelled``).
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise NotADirectoryError(f"{d}: not a directory")
    a = DIRECT_ALIGNMENT
    chunk_sizes = sorted({int(c) for c in chunk_sizes})
    threads = sorted({int(t) for t in threads})
    if not chunk_sizes or not threads or min(threads) < 1:
        raise ValueError("chunk_sizes and threads must be non-empty, threads >= 1")
    bad = [c for c in chunk_sizes if c <= 0 or c % a]
    if bad:
        raise ValueError(f"chunk sizes must be positive multiples of {a}: {bad}")
    file_bytes = max(-(-int(file_bytes) // a) * a, max(chunk_sizes))
    free = shutil.disk_usage(d).free
    if free < file_bytes + 64 * MiB:
        raise OSError(f"not enough free space in {d} for a {file_bytes >> 20} MiB probe file ({free >> 20} MiB free)")

    fd, name = tempfile.mkstemp(prefix=".mlx-flash-probe-", suffix=".bin", dir=d)
    os.close(fd)
    path = Path(name)
    pool: Optional[ThreadPoolExecutor] = None
    bufs = []
    try:
        _write_random_file(path, file_bytes, scaled(progress, 0.0, 0.15))
        drop_page_cache(path)
        f = open_uncached(path)  # warns (UncachedIOWarning) when it cannot bypass the cache
        with f:
            tmax = max(threads)
            cmax = max(chunk_sizes)
            bufs = [aligned_buffer(cmax) for _ in range(tmax)]
            pool = ThreadPoolExecutor(tmax, thread_name_prefix="flash-probe")
            barrier_noop = [pool.submit(time.sleep, 0) for _ in range(tmax)]  # start the threads now
            for b in barrier_noop:
                b.result()
            table: Dict[int, Dict[int, float]] = {c: {} for c in chunk_sizes}
            cells = [(c, t) for c in chunk_sizes for t in threads]
            for k, (c, t) in enumerate(cells):
                report(progress, 0.15 + 0.85 * k / len(cells), f"{_fmt_bytes(c)} × {t} threads")
                table[c][t] = _measure_cell(pool, f.fd, bufs, file_bytes, c, t, seconds_per_cell)
            report(progress, 1.0, "probe done")
            st = os.stat(d)
            return ProbeResult(
                table=table,
                mode=f.mode,
                directory=str(d.resolve()),
                device=int(st.st_dev),
                file_bytes=file_bytes,
                seconds_per_cell=float(seconds_per_cell),
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        for buf in bufs:
            buf.close()
        try:
            path.unlink()
        except OSError:
            pass


def probe_file(path: Union[str, Path], chunk: int, threads: int, seconds: float = 0.5) -> float:
    """GB/s of random page-cache-bypassing reads of ``chunk`` bytes (rounded down to the file's
    read alignment) from ``threads`` threads for ``seconds``, on an existing file (a model's
    ``ffn.bin``) at the alignment its reader uses
    (:attr:`~mlx_flash.storage.platform_io.UncachedFile.read_alignment`): one cell of
    :func:`probe_disk`, now, on the reader's own file, offsets and buffers. A reference for the
    reader measured at the same moment (same load, same other traffic on the disk) instead of
    the stored probe's quiet moment."""
    with open_uncached(path) as f:
        a = f.read_alignment
        size = os.fstat(f.fd).st_size
        chunk = max(a, min(int(chunk) // a * a, size // a * a))
        bufs = [aligned_buffer(chunk) for _ in range(threads)]
        try:
            with ThreadPoolExecutor(threads, thread_name_prefix="flash-probe") as pool:
                return _measure_cell(pool, f.fd, bufs, size, chunk, threads, seconds, a)
        finally:
            for b in bufs:
                b.close()


def _measure_cell(pool: ThreadPoolExecutor, fd: int, bufs, file_bytes: int, chunk: int, threads: int,
                  seconds: float, alignment: int = DIRECT_ALIGNMENT) -> float:
    """GB/s of ``threads`` workers each reading random ``chunk``-byte blocks at multiples of
    ``alignment`` for ``seconds``."""
    a = alignment
    n_pos = (file_bytes - chunk) // a + 1
    start = threading.Event()
    deadline = [0.0]

    def worker(k: int) -> int:
        rng = np.random.default_rng()
        offs = (rng.integers(0, n_pos, 4096) * a).tolist()
        with memoryview(bufs[k]) as mv:
            target = mv[:chunk]
            total = 0
            i = 0
            start.wait()
            end = deadline[0]
            while time.perf_counter() < end:
                n = os.preadv(fd, [target], offs[i & 4095])
                if n <= 0:
                    break
                total += n
                i += 1
            target.release()
        return total

    futs = [pool.submit(worker, k) for k in range(threads)]
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.set()
    total = sum(f.result() for f in futs)
    elapsed = time.perf_counter() - t0
    return total / elapsed / 1e9 if elapsed > 0 else 0.0


# --------------------------------------------------------------------------- cache
def _probe_path() -> Path:
    return data_dir() / PROBE_FILE


def _load_all(path: Path) -> Dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def cached_result(directory: Union[str, Path], max_age_days: Optional[float] = None) -> Optional[ProbeResult]:
    """The stored probe of ``directory``'s device, if any (and younger than ``max_age_days``)."""
    key = str(os.stat(Path(directory).expanduser()).st_dev)
    entry = _load_all(_probe_path()).get(key)
    if not entry:
        return None
    try:
        res = ProbeResult.from_dict(entry)
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    if max_age_days is not None:
        age = res.age()
        if age is None or age > timedelta(days=max_age_days):
            return None
    return res


def cached_probe(directory: Union[str, Path], max_age_days: float = 30, *, refresh: bool = False,
                 **kw: Any) -> ProbeResult:
    """The probe of ``directory``'s device from ``<data dir>/probe.json`` when it is
    younger than ``max_age_days``; otherwise run :func:`probe_disk` (``**kw`` go to
    it), store the result and return it. ``refresh`` forces a new probe."""
    d = Path(directory).expanduser()
    if not refresh:
        res = cached_result(d, max_age_days)
        if res is not None:
            return res
    res = probe_disk(d, **kw)
    path = _probe_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    allres = _load_all(path)
    allres[str(res.device)] = res.to_dict()

    atomic_write_text(path, json.dumps(allres, indent=2))
    return res


def load_cached_choice(directory: Union[str, Path]) -> Tuple[int, int]:
    """``(threads, chunk_bytes)`` for a model stored in ``directory``, from the
    stored probe of its device (any age), else from :data:`DEFAULT_CHOICE`.
    Never probes. NB: the order is (threads, chunk_bytes), unlike
    :meth:`ProbeResult.choose`."""
    try:
        res = cached_result(directory)
    except OSError:
        res = None
    chunk, threads = res.choose() if res is not None else DEFAULT_CHOICE
    return threads, chunk


def load_cached_gap(directory: Union[str, Path], threads: int, alignment: int = 512) -> int:
    """``max_gap_bytes`` for a reader with ``threads`` threads on the disk of ``directory``:
    :meth:`ProbeResult.gap_bytes` of its stored probe (any age), else :data:`DEFAULT_GAP`.
    Never probes."""
    try:
        res = cached_result(directory)
    except OSError:
        res = None
    if res is None or not res.table:
        return DEFAULT_GAP
    return res.gap_bytes(threads, alignment)


__all__ = [
    "DEFAULT_CHOICE",
    "DEFAULT_GAP",
    "DEFAULT_CHUNKS",
    "DEFAULT_THREADS",
    "ProbeResult",
    "cached_probe",
    "cached_result",
    "load_cached_choice",
    "load_cached_gap",
    "probe_disk",
    "probe_file",
]
