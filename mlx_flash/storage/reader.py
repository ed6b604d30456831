"""Parallel, page-cache-bypassing reads of neuron bundles from ``ffn.bin``.

``FlashReader.read(layer, ids, out)`` fetches the bundles of neurons ``ids`` of
``layer`` into the rows of ``out`` (a writable uint8 array, often a view into
MLX memory such as rows of the neuron cache). How (the paper's §3.2):

1. deduplicate and sort the ids; each neuron's bundle is one contiguous byte
   range (row-column bundling, see :mod:`mlx_flash.storage.format`);
2. expand every range to the direct-I/O alignment (the device's logical block
   size, :func:`~mlx_flash.storage.platform_io.direct_alignment`: 512 bytes on most
   disks, 4 KiB in the other modes) and coalesce neighbours whose aligned gap is at
   most ``max_gap_bytes`` into one run (reading a small gap beats issuing another
   request; the engine's default gap comes from the disk probe's cost of a request,
   :meth:`~mlx_flash.storage.probe.ProbeResult.gap_bytes`);
3. split runs into requests of at most ``chunk_bytes`` (split points are
   aligned; a bundle may straddle two requests, each copies its part);
4. queue the requests (:meth:`FlashReader.submit` returns a :class:`ReadHandle` at once):
   ``threads - 1`` worker threads, and the thread that waits for a read, take the next
   request of the first queued read (a read someone waits for goes to the front); each
   ``os.preadv``-reads it into its own preallocated, page-aligned buffer (``mmap``; the
   GIL is released during the read) and copies its bundles out with one numpy gather
   (consecutive bundles into consecutive rows of a plain array: one ``memcpy`` that keeps
   the GIL, where numpy's copy would drop it and queue for it again behind the engine's
   Python). The workers ask the OS for a short time slice
   (:func:`~mlx_flash.storage.platform_io.favour_io_thread`) so that a woken worker need not
   queue behind a compute thread for a whole default slice. There is no barrier per read:
   the requests of the next reads (the engine's next scratch chunk, the pipeline's prefetch
   of the next layer) are in flight while the caller computes, and a wait waits for its own
   read's requests only. O_DIRECT cannot scatter straight into the destination rows: iovec
   segments must be multiples of the block size, bundles are not.

Duplicate ids are allowed: every row asking for a neuron receives its bundle;
the disk is read once and ``bytes_useful`` counts distinct neurons.

Where a request's time goes (submit's planning, the queue, ``preadv``, the copy-out, the
waiter's wake-up, the workers' CPU and run-queue seconds) is counted in a reader's
:attr:`FlashReader.totals` (:meth:`ReadStats.split`).

Buffers and worker threads are allocated once in ``__init__`` (``threads`` ×
``chunk_bytes``); steady-state reads allocate only small numpy index arrays.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Deque, Optional, Sequence, Tuple, Union

import numpy as np

from .format import FlashFiles, FlashFormatError
from .platform_io import UncachedFile, aligned_buffer, favour_io_thread, open_uncached, thread_sched_seconds


@dataclass
class ReadStats:
    """What one read (or a reader's lifetime, for :attr:`FlashReader.totals`) cost.

    bytes_read:   bytes actually read from disk, alignment padding and coalesced gaps included.
    bytes_useful: distinct neurons read × bundle_bytes.
    requests:     read system calls issued (one per chunk; a short read's retry adds one).
    seconds:      wall time of the read (submit to its last request's end); of a reader's
                  totals: wall time during which at least one read was submitted and not finished.
    service_seconds: (a reader's totals only) wall time during which at least one read thread
                  was reading or copying out a request: ``seconds`` without the time requests
                  waited in the queue for a thread (on a loaded CPU: for a CPU or the GIL).
    """

    bytes_read: int = 0
    bytes_useful: int = 0
    requests: int = 0
    seconds: float = 0.0
    service_seconds: float = 0.0
    # Where a request's life goes (a reader's totals only; sums over requests or reads, seconds):
    plan_seconds: float = 0.0     # submit: checks and planning, before the read is queued
    queue_seconds: float = 0.0    # queued: from the read's enqueue to a thread taking the request
    syscall_seconds: float = 0.0  # inside os.preadv (the disk, and the CPU it needs)
    copy_seconds: float = 0.0     # copying the request's bundles out of the aligned buffer
    wake_seconds: float = 0.0     # a blocked waiter: from the read's last request's end to it running again
    waits_blocked: int = 0        # waits that blocked (the read was not finished when the waiter had nothing to read)
    waiter_requests: int = 0      # requests the waiting thread read itself (no hand-off)
    thread_cpu_seconds: float = 0.0   # the worker threads on a CPU (Linux schedstat; 0 elsewhere)
    thread_runq_seconds: float = 0.0  # the worker threads runnable but waiting for a CPU

    def add(self, other: "ReadStats") -> None:
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)

    def split(self) -> dict:
        """The request-life figures of a reader's totals: per request, in microseconds
        (``plan_us`` per read call: ``plan_seconds`` over the reads' count is unknown here,
        so per request too), the mean number of ``preadv`` calls in flight while a read
        thread was at work (``syscall_depth``), and the share of requests read by their
        waiter. Empty when nothing was read."""
        n = self.requests
        if n <= 0:
            return {}
        us = 1e6 / n
        return {
            "plan_us": self.plan_seconds * us,
            "queue_us": self.queue_seconds * us,
            "syscall_us": self.syscall_seconds * us,
            "copy_us": self.copy_seconds * us,
            "wake_us_per_blocked_wait": self.wake_seconds * 1e6 / max(1, self.waits_blocked),
            "waits_blocked": float(self.waits_blocked),
            "syscall_depth": self.syscall_seconds / self.service_seconds if self.service_seconds > 0 else 0.0,
            "syscall_gbps": self.bytes_read / self.syscall_seconds / 1e9 if self.syscall_seconds > 0 else 0.0,
            "waiter_share": self.waiter_requests / n,
            "cpu_us": self.thread_cpu_seconds * us,
            "runq_us": self.thread_runq_seconds * us,
        }

    @property
    def gbps(self) -> float:
        """Disk throughput of the read(s) in GB/s (10^9 bytes)."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def service_gbps(self) -> float:
        """GB/s while a read thread was at work (``service_seconds``; 0 when not measured)."""
        return self.bytes_read / self.service_seconds / 1e9 if self.service_seconds > 0 else 0.0


class SplitRows:
    """A read destination whose bundle bytes go to several arrays by byte column:
    ``parts`` = ``[(lo, hi, arr)]`` where ``arr`` (uint8, ``(n, hi - lo)``, rows
    C-contiguous) receives bytes ``[lo, hi)`` of each bundle. The parts tile
    ``[0, bundle_bytes)``. This is how a role-major neuron cache (separate gate /
    up / down matrices, see :class:`mlx_flash.neuron_cache.RowStore`) is filled
    straight from the reader's aligned buffers: the copy out of the buffer that
    direct I/O needs anyway does the scatter, no extra pass. A part whose ``arr`` is
    None is read and dropped (the gate rows a gate-first chooser holds already)."""

    def __init__(self, parts, n: int, bundle_bytes: int):
        self.parts = [(int(lo), int(hi), a) for lo, hi, a in parts]
        self.shape = (int(n), int(bundle_bytes))
        edge = 0
        for lo, hi, a in sorted(self.parts, key=lambda p: p[0]):
            if a is None and lo == edge and hi > lo:
                edge = hi
                continue
            if lo != edge or not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.shape != (n, hi - lo):
                raise ValueError("SplitRows parts must tile the bundle with uint8 (n, hi - lo) arrays")
            if not a.flags.writeable or (n and a.strides[1] != 1):
                raise ValueError("SplitRows parts must be writable with contiguous rows")
            edge = hi
        self.parts = [p for p in self.parts if p[2] is not None]  # dropped byte ranges: nothing to copy
        self.n = int(n)
        if edge != bundle_bytes:
            raise ValueError(f"SplitRows parts cover {edge} of {bundle_bytes} bytes")

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> "SplitRows":
        if not isinstance(rows, slice):
            raise TypeError("SplitRows supports row slices only")
        parts = [(lo, hi, a[rows]) for lo, hi, a in self.parts]
        n = len(range(*rows.indices(self.n)))
        edges = [0] + [e for lo, hi, _ in sorted(parts, key=lambda p: p[0]) for e in (lo, hi)] + [self.shape[1]]
        parts += [(a, b, None) for a, b in zip(edges[::2], edges[1::2]) if b > a]  # the dropped ranges
        return SplitRows(parts, n, self.shape[1])

    def __setitem__(self, rows: Union[int, np.integer, slice, Sequence[int], np.ndarray], block) -> None:
        """``dest[rows] = bundles`` like a ``(n, bundle_bytes)`` array (rows: int, slice or indices)."""
        block = np.asarray(block, dtype=np.uint8)
        if isinstance(rows, (int, np.integer)):  # one row (a float is no index, as in numpy)
            self.set_rows(slice(int(rows), int(rows) + 1), block.reshape(1, -1))
        else:
            self.set_rows(rows, block.reshape(-1, self.shape[1]))

    def set_rows(self, rows, block: np.ndarray) -> None:
        """``self[rows] = block`` (block: ``(k, bundle_bytes)`` uint8)."""
        for lo, hi, a in self.parts:
            a[rows] = block[:, lo:hi]

    def set_bytes(self, row: int, a0: int, b0: int, data: np.ndarray) -> None:
        """Bytes ``[a0, b0)`` of bundle ``row`` = ``data``."""
        for lo, hi, a in self.parts:
            x, y = max(lo, a0), min(hi, b0)
            if x < y:
                a[row, x - lo : y - lo] = data[x - a0 : y - a0]

    def copy_rows(self, dst, src) -> None:
        for _, _, a in self.parts:
            a[dst] = a[src]

    def to_array(self) -> np.ndarray:
        """The rows as one ``(n, bundle_bytes)`` array (a copy; for tests and debugging)."""
        out = np.zeros(self.shape, dtype=np.uint8)  # dropped ranges read as zeros
        for lo, hi, a in self.parts:
            out[:, lo:hi] = a
        return out


def set_rows(out, rows, block: np.ndarray) -> None:
    """``out[rows] = block`` for a read destination (uint8 array or :class:`SplitRows`);
    ``rows``: a slice or row indices, ``block``: ``(k, bundle_bytes)`` uint8 bundles."""
    if isinstance(out, SplitRows):
        out.set_rows(rows, block)
    else:
        out[rows] = block


def _set_bytes(out, row: int, a0: int, b0: int, data: np.ndarray) -> None:
    if isinstance(out, SplitRows):
        out.set_bytes(row, a0, b0, data)
    else:
        out[row, a0:b0] = data


@dataclass
class _Plan:
    """Requests of one read call, all int64 numpy arrays (vectorised bookkeeping)."""

    starts: np.ndarray  # byte offset of each distinct neuron's bundle (sorted)
    rows: np.ndarray  # the out row that receives each distinct neuron
    req_lo: np.ndarray  # request byte ranges [lo, hi), aligned
    req_hi: np.ndarray
    n_lo: np.ndarray  # first neuron (index into starts) overlapping each request
    n_hi: np.ndarray  # one past the last neuron overlapping each request


def coalesced_runs(starts: np.ndarray, bundle_bytes: int, alignment: int, max_gap_bytes: int,
                   breaks: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Aligned byte runs ``[lo, hi)`` covering bundles at sorted, distinct offsets ``starts``:
    each bundle expanded to ``alignment``, neighbours whose aligned gap is at most
    ``max_gap_bytes`` merged. ``breaks``: indices into ``starts`` where a new run must
    start anyway (separate read calls)."""
    a = alignment
    a_lo = (starts // a) * a
    a_hi = -(-(starts + bundle_bytes) // a) * a
    # runs: split where the aligned gap to the previous neuron exceeds max_gap
    split = a_lo[1:] - a_hi[:-1] > max_gap_bytes
    if breaks is not None and len(breaks):
        b = np.asarray(breaks, dtype=np.int64)
        split[b[(b >= 1) & (b < len(starts))] - 1] = True
    cut = np.flatnonzero(split) + 1
    run_first = np.concatenate(([0], cut))
    run_last = np.concatenate((cut, [len(starts)])) - 1
    return a_lo[run_first], a_hi[run_last]


def plan_requests(starts: np.ndarray, bundle_bytes: int, alignment: int, max_gap_bytes: int,
                  chunk_bytes: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The read requests for bundles at sorted, distinct byte offsets ``starts`` (int64).

    Steps 2-3 of the module docstring: align each bundle to ``alignment``, coalesce
    neighbours whose aligned gap is at most ``max_gap_bytes``, split runs at
    ``chunk_bytes`` (a multiple of ``alignment``), drop chunks wholly inside a gap.
    Returns ``(req_lo, req_hi, n_lo, n_hi)``: request byte ranges ``[lo, hi)`` and, per
    request, the first and one-past-last bundle (index into ``starts``) it overlaps.
    ``(req_hi - req_lo).sum()`` is what the read costs (``ReadStats.bytes_read``).
    """
    ends = starts + bundle_bytes
    run_lo, run_hi = coalesced_runs(starts, bundle_bytes, alignment, max_gap_bytes)
    # split runs into chunk-sized requests
    c = chunk_bytes
    nreq = -(-(run_hi - run_lo) // c)
    if int(nreq.max()) == 1:
        req_lo, req_hi = run_lo, run_hi
    else:
        rep = np.repeat(np.arange(len(run_lo)), nreq)
        k = np.arange(rep.size) - np.repeat(np.cumsum(nreq) - nreq, nreq)
        req_lo = run_lo[rep] + k * c
        req_hi = np.minimum(req_lo + c, run_hi[rep])
    n_lo = np.searchsorted(ends, req_lo, side="right")  # first bundle ending after lo
    n_hi = np.searchsorted(starts, req_hi, side="left")  # first bundle starting at/after hi
    keep = n_lo < n_hi  # a chunk that falls wholly inside a coalesced gap is not read
    if not keep.all():
        req_lo, req_hi, n_lo, n_hi = req_lo[keep], req_hi[keep], n_lo[keep], n_hi[keep]
    return req_lo, req_hi, n_lo, n_hi


class ReadHandle:
    """A read handed to :meth:`FlashReader.submit`: its requests are queued or in flight.

    :meth:`wait` returns the read's :class:`ReadStats` once every request has been read and its
    bundles copied out (the waiting thread reads requests of this read itself meanwhile, and the
    read goes to the front of the queue), or raises the error a request hit (the same exception
    :meth:`FlashReader.read` raises). :meth:`done` asks without waiting. ``started`` /
    ``finished`` are ``time.perf_counter`` times of the submit and of the last request's end
    (``finished`` is None until then)."""

    __slots__ = ("_pool", "_job")

    def __init__(self, pool: "_Pool", job: "_Job"):
        self._pool = pool
        self._job = job

    def done(self) -> bool:
        return self._job.finished.is_set()

    def wait(self) -> ReadStats:
        return self._pool.wait(self._job)

    @property
    def started(self) -> float:
        return self._job.t0

    @property
    def finished(self) -> Optional[float]:
        return self._job.t1


class FlashReader:
    """Reads neuron bundles of one flash model.

    Reads are submitted (:meth:`submit`, thread-safe) to one queue served by ``threads - 1``
    worker threads, plus the thread that waits for a read (:meth:`ReadHandle.wait` helps with
    its own read's requests); :meth:`read` is ``submit(...).wait()``. Reads of several layers
    (the engine's synchronous loads and the pipeline's prefetch) share the queue: requests stay
    in flight across them, a read's wait waits for its own requests only, and a read someone
    waits for is served before the ones nobody waits for yet. ``totals.seconds`` is the wall
    time during which at least one read was submitted and not finished (so ``totals.gbps`` is
    the throughput while the reader had work).

    threads:       parallel positional reads.
    chunk_bytes:   largest single request (rounded down to the alignment, at least one block).
    max_gap_bytes: aligned runs separated by at most this many bytes are read as one
                   request (the gap is read and dropped). 0 still merges runs that touch.
    direct:        bypass the page cache (O_DIRECT / F_NOCACHE); see :attr:`mode`.
    favour_threads: the worker threads ask the OS to run them soon after they wake
                   (:func:`~mlx_flash.storage.platform_io.favour_io_thread`; what it did:
                   :attr:`thread_priority`).
    """

    def __init__(self, files: FlashFiles, *, threads: int = 8, chunk_bytes: int = 1 << 20,
                 max_gap_bytes: int = 16384, direct: bool = True, favour_threads: bool = True):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_gap_bytes < 0:
            raise ValueError(f"max_gap_bytes must be >= 0, got {max_gap_bytes}")
        self.files = files
        m = files.manifest
        self.manifest = m
        self.num_layers = m.num_layers
        self.intermediate_size = m.intermediate_size
        self.bundle_bytes = m.bundle_bytes
        self.threads = int(threads)
        self.max_gap_bytes = int(max_gap_bytes)
        self._file: UncachedFile = open_uncached(files.ffn_path, direct=direct)
        self.mode: str = self._file.mode
        # reads are trimmed to this (O_DIRECT: the device's logical block size, often 512; layer
        # starts keep the format's 4096, the file is padded to it: no read runs past its end)
        self.alignment = self._file.read_alignment
        a = self.alignment
        self.chunk_bytes = max(a, (int(chunk_bytes) // a) * a)
        self._offsets = np.array([e.offset for e in m.layers], dtype=np.int64)
        # the workers hold the pool, not the reader: an unclosed reader is still collected (__del__)
        self._pool = _Pool(self._file, self.bundle_bytes, self.chunk_bytes, self.threads, favour_threads)

    @property
    def thread_priority(self) -> str:
        """What :func:`~mlx_flash.storage.platform_io.favour_io_thread` did for the worker
        threads ("" when nothing, or not asked; set as the workers start)."""
        return self._pool.priority

    @property
    def totals(self) -> ReadStats:
        """Cumulative :class:`ReadStats` of every finished read (busy wall time, see the class)."""
        return self._pool.snapshot()

    # ------------------------------------------------------------------ public
    def submit(self, layer: int, ids: Union[Sequence[int], np.ndarray], out,
               rows: Optional[np.ndarray] = None) -> ReadHandle:
        """Queue a read of the bundles of neurons ``ids`` of ``layer`` into ``out`` and return
        at once. Arguments and checks as :meth:`read` (a wrong argument raises here, a failed
        read from :meth:`ReadHandle.wait`). ``out`` must stay alive and untouched until the
        handle is waited for."""
        t0 = time.perf_counter()
        if self._file.closed:
            raise ValueError("FlashReader is closed")
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.num_layers} layers")
        ids_arr = np.asarray(ids)
        if ids_arr.ndim != 1:
            ids_arr = ids_arr.reshape(-1)
        if ids_arr.size and not np.issubdtype(ids_arr.dtype, np.integer):
            raise TypeError(f"neuron ids must be integers, got {ids_arr.dtype}")
        ids_arr = ids_arr.astype(np.int64, copy=False)
        n = ids_arr.size
        bb = self.bundle_bytes
        n_out = n
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            n_out = len(out)
            if len(rows) != n or (n and (int(rows.min()) < 0 or int(rows.max()) >= n_out)):
                raise ValueError(f"rows must give one row of out (0..{n_out - 1}) for each of the {n} ids")
        if isinstance(out, SplitRows):
            if out.shape != (n_out, bb):
                raise ValueError(f"out must have shape ({n_out}, {bb}), got SplitRows {out.shape}")
        else:
            if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.ndim != 2 or out.shape != (n_out, bb):
                desc = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
                raise ValueError(f"out must be a uint8 array of shape ({n_out}, {bb}), got {desc}")
            if not out.flags.writeable:
                raise ValueError("out is read-only")
            if n and out.strides[1] != 1:
                raise ValueError("out rows must be contiguous (strides[1] == 1)")
        if n:
            lo_id, hi_id = int(ids_arr.min()), int(ids_arr.max())
            if lo_id < 0 or hi_id >= self.intermediate_size:
                bad = lo_id if lo_id < 0 else hi_id
                raise IndexError(f"neuron id {bad} out of range for layer {layer}: "
                                 f"valid ids are 0..{self.intermediate_size - 1}")
            plan, dup_rows, dup_src = self._plan(layer, ids_arr)
            if rows is not None:
                plan.rows = rows[plan.rows]
                if dup_rows is not None:
                    dup_rows, dup_src = rows[dup_rows], rows[dup_src]
        else:
            plan, dup_rows, dup_src = None, None, None
        job = _Job(plan, out, dup_rows, dup_src, bb, self._file.path, t0)
        self._pool.submit(job)
        return ReadHandle(self._pool, job)

    def read(self, layer: int, ids: Union[Sequence[int], np.ndarray], out: np.ndarray,
             rows: Optional[np.ndarray] = None) -> ReadStats:
        """Read the bundles of neurons ``ids`` of ``layer`` into ``out`` (``submit(...).wait()``).

        ``out``: writable uint8 array of shape ``(len(ids), bundle_bytes)`` whose
        rows are C-contiguous (a row slice of a C-ordered matrix is fine), or a
        :class:`SplitRows` of that shape. After the call ``out[j]`` holds exactly
        the on-disk bytes of neuron ``ids[j]``. With ``rows`` (one distinct row index
        of ``out`` per id) ``out`` may have more rows and ``out[rows[j]]`` receives
        neuron ``ids[j]``: the other rows are left alone (the engine's pipeline fills
        the rest of a destination from its prefetched bundles).
        Ids may be unsorted and repeated. Raises IndexError for a layer or id out
        of range, ValueError for a wrong ``out``, FlashFormatError if the file ends early.
        """
        return self.submit(layer, ids, out, rows).wait()

    def read_all(self, layer: int, out: np.ndarray) -> ReadStats:
        """Read every neuron of ``layer`` into ``out`` (``(intermediate_size, bundle_bytes)`` uint8)."""
        return self.read(layer, np.arange(self.intermediate_size, dtype=np.int64), out)

    def covered(self, layer: int, ids: np.ndarray) -> np.ndarray:
        """Sorted ids of every neuron of ``layer`` whose bundle lies wholly inside the byte runs
        a read of ``ids`` reads (alignment and coalesced gaps): ``ids`` plus the gap neurons.
        Reading those too reads the same runs, so it costs no extra byte (the pipeline's
        prefetch stages them: a later miss among them is not read again)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if not len(ids):
            return ids
        bb, base = self.bundle_bytes, int(self._offsets[layer])
        lo, hi = coalesced_runs(base + ids * bb, bb, self.alignment, self.max_gap_bytes)
        first = -(-(lo - base) // bb)  # first bundle starting at or after the run's start
        stop = np.minimum((hi - base) // bb, self.intermediate_size)  # one past the last ending by its end
        n = stop - first
        return np.repeat(first - np.cumsum(n) + n, n) + np.arange(int(n.sum()), dtype=np.int64)

    def reset_totals(self) -> ReadStats:
        """Return the cumulative totals and start counting from zero."""
        return self._pool.reset_totals()

    def close(self) -> None:
        """Finish the queued reads, stop the worker threads, close the file and free the
        buffers (idempotent)."""
        self._pool.close()

    def __enter__(self) -> "FlashReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self._pool.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"FlashReader({self.files.root}, mode={self.mode}, threads={self.threads}, "
                f"chunk_bytes={self.chunk_bytes}, max_gap_bytes={self.max_gap_bytes})")

    # ------------------------------------------------------------------ planning
    def _plan(self, layer: int, ids: np.ndarray) -> Tuple[_Plan, Optional[np.ndarray], Optional[np.ndarray]]:
        a, bb = self.alignment, self.bundle_bytes
        dup_rows = dup_src = None
        if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):  # sorted, distinct (the engine's reads): as they are
            uniq, first = ids, np.arange(len(ids), dtype=np.int64)
        else:
            uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        if len(uniq) != len(ids):
            src_rows = first[inverse]
            mask = src_rows != np.arange(len(ids))
            dup_rows, dup_src = np.flatnonzero(mask), src_rows[mask]
        starts = self._offsets[layer] + uniq * bb
        req_lo, req_hi, n_lo, n_hi = plan_requests(starts, bb, a, self.max_gap_bytes, self.chunk_bytes)
        return _Plan(starts, first.astype(np.int64), req_lo, req_hi, n_lo, n_hi), dup_rows, dup_src


class _Job:
    """One submitted read: its plan and, per request (Python lists, computed with numpy once):
    ``lo``/``hi``, ``need`` (bytes up to the end of its last bundle: a short read at the end
    of the file past that is fine), ``j0``/``j1`` (the bundles wholly inside it), ``left``/
    ``right`` (a bundle straddling its start / end, -1 when none). ``next`` (the next request
    to hand out), ``pending`` (requests not finished), ``requests`` (system calls), ``error``
    and ``stop`` are guarded by the pool's lock; ``finished`` is set when the last request
    is done and the duplicate rows are filled."""

    def __init__(self, plan: Optional[_Plan], out, dup_rows, dup_src, bundle_bytes: int, path, t0: float):
        self.plan = plan
        self.out = out
        self.dup_rows, self.dup_src = dup_rows, dup_src
        self.path = path
        self.t0 = t0
        self.t_ready = t0  # when it was queued (the pool's submit)
        self.t1: Optional[float] = None
        self.next = 0
        self.requests = 0
        self.error: Optional[BaseException] = None
        self.stop = False
        self.finished = threading.Event()
        if plan is None or not len(plan.req_lo):
            self.n = 0
            self.bytes_read = self.bytes_useful = 0
        else:
            lo, hi, n_lo, n_hi = plan.req_lo, plan.req_hi, plan.n_lo, plan.n_hi
            s_first, e_last = plan.starts[n_lo], plan.starts[n_hi - 1] + bundle_bytes
            cut_left, cut_right = s_first < lo, e_last > hi
            left = np.where(cut_left, n_lo, -1)
            right = np.where(cut_right & (n_hi - 1 != left), n_hi - 1, -1)  # one bundle over both edges: once
            self.lo, self.hi = lo.tolist(), hi.tolist()
            self.need = (np.minimum(hi, e_last) - lo).tolist()
            self.j0 = (n_lo + cut_left).tolist()
            self.j1 = (n_hi - cut_right).tolist()
            self.left, self.right = left.tolist(), right.tolist()
            self.n = len(self.lo)
            self.bytes_read = int((hi - lo).sum())
            self.bytes_useful = len(plan.starts) * bundle_bytes
        self.pending = self.n
        self.stats = ReadStats()


class _Pool:
    """The reader's queue of submitted reads, its worker threads and aligned buffers (slot 0:
    the thread that waits, 1..threads-1: the workers), and its totals. Workers take the next
    request of the first read in the queue, ``os.preadv`` it into their own buffer (the GIL is
    released during the read) and copy its bundles out with one numpy gather. O_DIRECT cannot
    scatter straight into the destination rows: iovec segments must be multiples of the block
    size, bundles are not."""

    def __init__(self, file: UncachedFile, bundle_bytes: int, chunk_bytes: int, threads: int,
                 favour: bool = True):
        self.file = file
        self.favour = favour
        self.priority = ""  # what favour_io_thread did for the workers ("" : nothing)
        self.bb = bundle_bytes
        self.bufs = [aligned_buffer(chunk_bytes) for _ in range(threads)]
        self.mvs = [memoryview(b) for b in self.bufs]
        self.views = [np.frombuffer(b, dtype=np.uint8) for b in self.bufs]
        # each buffer as rows of one bundle starting at every byte: a gather of bundles at any offsets
        self.windows = [np.lib.stride_tricks.sliding_window_view(v, bundle_bytes)
                        if len(v) >= bundle_bytes else None for v in self.views]
        self.cv = threading.Condition()
        self.queue: Deque[_Job] = deque()
        self.waiter = threading.Lock()  # slot 0's buffer: one waiting thread reads at a time
        self.closed = False
        self.totals = ReadStats()
        self.active = 0  # submitted reads not finished
        self.busy_since = 0.0
        self.serving = 0  # requests taken and not finished
        self.serving_since = 0.0
        self.workers = [threading.Thread(target=_serve, args=(self, k), name=f"flash-read-{k}", daemon=True)
                        for k in range(1, threads)]
        for w in self.workers:
            w.start()
        self.sched_base = self._sched()

    def _sched(self) -> Tuple[float, float]:
        """The workers' (CPU, run-queue wait) seconds so far ((0, 0) where unknown)."""
        return thread_sched_seconds(w.native_id for w in self.workers) or (0.0, 0.0)

    def _add_sched(self, t: ReadStats, rebase: bool) -> None:
        now = self._sched()
        t.thread_cpu_seconds += now[0] - self.sched_base[0]
        t.thread_runq_seconds += now[1] - self.sched_base[1]
        if rebase:
            self.sched_base = now

    # ----------------------------------------------------------------- queue
    def submit(self, job: _Job) -> None:
        with self.cv:
            if self.closed:
                raise ValueError("FlashReader is closed")
            if self.active == 0:
                self.busy_since = job.t0
            self.active += 1
            job.t_ready = time.perf_counter()
            self.totals.plan_seconds += job.t_ready - job.t0
            if job.n:
                self.queue.append(job)
                self.cv.notify(min(job.n, len(self.workers)))
        if not job.n:
            self._finish(job)

    def take(self) -> Optional[Tuple[_Job, int]]:
        """The next request of the first queued read (the caller holds ``cv``), None when none."""
        if not self.queue:
            return None
        job = self.queue[0]
        r = job.next
        job.next += 1
        now = time.perf_counter()
        self.totals.queue_seconds += now - job.t_ready
        if self.serving == 0:
            self.serving_since = now
        self.serving += 1
        if job.next >= job.n:
            self.queue.popleft()
        return job, r

    def wait(self, job: _Job) -> ReadStats:
        if not job.finished.is_set() and self.waiter.acquire(blocking=False):
            try:
                while True:
                    with self.cv:
                        if job.next >= job.n:
                            break
                        if self.queue[0] is not job:  # waited for: served first
                            self.queue.remove(job)
                            self.queue.appendleft(job)
                        _, r = self.take()  # type: ignore[misc]
                    self.run(0, job, r)
            finally:
                self.waiter.release()
        if not job.finished.is_set():
            job.finished.wait()
            woke = time.perf_counter()
            with self.cv:
                self.totals.waits_blocked += 1
                self.totals.wake_seconds += max(0.0, woke - (job.t1 or woke))
        if job.error is not None:
            raise job.error
        return job.stats

    def run(self, slot: int, job: _Job, r: int) -> None:
        """Request ``r`` of ``job`` in buffer ``slot``; the last one finishes the job."""
        done = self.serve(slot, job, r)
        with self.cv:
            last = self.account(slot, job, done)
        if last:
            self._finish(job)

    def serve(self, slot: int, job: _Job, r: int) -> Tuple[int, Optional[BaseException], Tuple[float, float]]:
        """Read request ``r`` of ``job`` (no lock held): ``(system calls, error, times)`` for
        :meth:`account`."""
        if job.stop:
            return 0, None, (0.0, 0.0)
        try:
            k, times = self._read(slot, job, r)
        except BaseException as e:  # handed to whoever waits for the job
            return 0, e, (0.0, 0.0)
        return k, None, times

    def account(self, slot: int, job: _Job, done) -> bool:
        """Count a request :meth:`serve` read (the caller holds ``cv``); True when it was the
        job's last (the caller then calls :meth:`_finish`, without the lock)."""
        k, err, times = done
        job.requests += k
        tot = self.totals
        tot.syscall_seconds += times[0]
        tot.copy_seconds += times[1]
        if slot == 0:
            tot.waiter_requests += k
        if err is not None and job.error is None:
            job.error, job.stop = err, True
        job.pending -= 1
        self.serving -= 1
        if self.serving == 0:
            tot.service_seconds += time.perf_counter() - self.serving_since
        return job.pending == 0

    def _finish(self, job: _Job) -> None:
        if job.error is None and job.dup_rows is not None:
            out = job.out
            if isinstance(out, SplitRows):
                out.copy_rows(job.dup_rows, job.dup_src)
            else:
                out[job.dup_rows] = out[job.dup_src]
        t1 = time.perf_counter()
        with self.cv:
            job.t1 = t1
            job.stats = ReadStats(job.bytes_read, job.bytes_useful, job.requests, t1 - job.t0)
            self.totals.add(ReadStats(job.bytes_read, job.bytes_useful, job.requests, 0.0))
            self.active -= 1
            if self.active == 0:
                self.totals.seconds += t1 - self.busy_since
        job.out = None  # the destination is the caller's again
        job.finished.set()

    def _read(self, slot: int, job: _Job, r: int) -> Tuple[int, Tuple[float, float]]:
        """Read request ``r`` into the slot's buffer and copy its bundles out; returns the system
        calls and ``(seconds in preadv, seconds copying out)``."""
        mv, view = self.mvs[slot], self.views[slot]
        fd, bb = self.file.fd, self.bb
        out = job.out
        plan = job.plan
        assert plan is not None
        starts, rows = plan.starts, plan.rows
        lo = job.lo[r]
        length = job.hi[r] - lo
        need = job.need[r]
        got = calls = 0
        ta = time.perf_counter()
        while got < need:
            nread = os.preadv(fd, [mv[got:length]], lo + got)
            calls += 1
            if nread <= 0:
                raise FlashFormatError(
                    f"{job.path}: unexpected end of file at byte {lo + got} "
                    f"(read {lo}..{lo + length}); the file is shorter than the manifest says"
                )
            got += nread
        tb = time.perf_counter()
        for j in (job.left[r], job.right[r]):  # bundles straddling the request's edges: the part inside
            if j >= 0:
                s0 = int(starts[j])
                a, b = max(s0, lo), min(s0 + bb, lo + length)
                _set_bytes(out, int(rows[j]), a - s0, b - s0, view[a - lo : b - lo])
        j0, j1 = job.j0[r], job.j1[r]
        if j0 < j1:
            k = j1 - j0
            offs = starts[j0:j1] - lo
            o0 = int(offs[0])
            dst = rows[j0:j1]
            r0 = int(dst[0])
            run = int(dst[-1]) - r0 == k - 1 and (k <= 2 or bool(np.all(np.diff(dst) == 1)))
            flat = run and isinstance(out, np.ndarray) and out.strides[0] == bb  # rows r0.. are one block
            if int(offs[-1]) - o0 == (k - 1) * bb:  # offsets increase by >= bb: consecutive bundles
                if flat:  # one memcpy that keeps the GIL (numpy's copy would drop it and queue for it again)
                    with memoryview(out[r0 : r0 + k]).cast("B") as dmv:
                        dmv[:] = self.mvs[slot][o0 : o0 + k * bb]
                    return calls, (tb - ta, time.perf_counter() - tb)
                block = view[o0 : o0 + k * bb].reshape(k, bb)
            else:  # one gather of rows starting at any byte offset
                windows = self.windows[slot]
                assert windows is not None  # a buffer holds at least one bundle when a request has whole ones
                block = windows[offs]
            if run:
                set_rows(out, slice(r0, r0 + k), block)
            else:
                set_rows(out, dst, block)
        return calls, (tb - ta, time.perf_counter() - tb)

    # ----------------------------------------------------------------- totals, close
    def snapshot(self) -> ReadStats:
        with self.cv:
            t = ReadStats(**vars(self.totals))
            now = time.perf_counter()
            if self.active:
                t.seconds += now - self.busy_since
            if self.serving:
                t.service_seconds += now - self.serving_since
        self._add_sched(t, rebase=False)
        return t

    def reset_totals(self) -> ReadStats:
        with self.cv:
            t, self.totals = self.totals, ReadStats()
            now = time.perf_counter()
            if self.active:  # split the intervals in progress
                t.seconds += now - self.busy_since
                self.busy_since = now
            if self.serving:
                t.service_seconds += now - self.serving_since
                self.serving_since = now
            self._add_sched(t, rebase=True)
        return t

    def close(self) -> None:
        with self.cv:
            if self.closed:
                return
            pending = list(self.queue)
        for job in pending:  # without workers nobody else would read them
            try:
                self.wait(job)
            except BaseException:  # the error belongs to whoever waits for the read
                pass
        with self.cv:
            self.closed = True
            self.cv.notify_all()
        for w in self.workers:
            if w is not threading.current_thread():
                w.join()
        self.file.close()
        for mv in self.mvs:
            mv.release()
        self.mvs, self.views, self.windows = [], [], []
        for b in self.bufs:
            try:
                b.close()
            except BufferError:  # a view is still exported somewhere; GC will free it
                pass
        self.bufs = []


def _serve(pool: _Pool, slot: int) -> None:
    """A worker: take requests from the queue until the pool closes. Counting a finished
    request and taking the next one share one hold of the lock (one hand-off of the lock,
    and of the GIL, per request instead of two)."""
    if pool.favour:
        pool.priority = favour_io_thread()
    prev = None  # (job, what serve gave) of the request this worker read last, not yet counted
    while True:
        with pool.cv:
            if prev is not None and pool.account(slot, *prev):
                got = None  # it finished its read: _finish without the lock, then take again
            else:
                prev = None
                got = pool.take()
                while got is None:
                    if pool.closed:
                        return
                    pool.cv.wait()
                    got = pool.take()
        if got is None:
            assert prev is not None
            pool._finish(prev[0])
            prev = None
            continue
        job, r = got
        prev = (job, pool.serve(slot, job, r))


__all__ = ["FlashReader", "ReadHandle", "ReadStats", "SplitRows", "set_rows"]
