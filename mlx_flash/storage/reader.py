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
4. the calling thread and up to ``threads - 1`` pool threads take requests from a
   shared counter (no fixed shares: a slow request holds up nobody else's); each
   ``os.preadv``-reads them one after another into the next free part of its own
   preallocated, page-aligned buffer (``mmap``; the GIL is released during the read)
   and, when the next one does not fit, copies the bundles of all buffered requests
   out with one numpy gather (few Python steps per buffer, not per request: with
   many small requests the per-request Python work under the GIL was what limited
   the reader). O_DIRECT cannot scatter straight into the destination rows: iovec
   segments must be multiples of the block size, bundles are not.

Duplicate ids are allowed: every row asking for a neuron receives its bundle;
the disk is read once and ``bytes_useful`` counts distinct neurons.

Buffers are allocated once in ``__init__`` (``threads`` × ``chunk_bytes``);
steady-state reads allocate only small numpy index arrays.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from .format import FlashFiles, FlashFormatError
from .platform_io import UncachedFile, aligned_buffer, open_uncached


@dataclass
class ReadStats:
    """What one read (or a reader's lifetime, for :attr:`FlashReader.totals`) cost.

    bytes_read:   bytes actually read from disk, alignment padding and coalesced gaps included.
    bytes_useful: distinct neurons read × bundle_bytes.
    requests:     read system calls issued (one per chunk; a short read's retry adds one).
    seconds:      wall time of the call(s).
    """

    bytes_read: int = 0
    bytes_useful: int = 0
    requests: int = 0
    seconds: float = 0.0

    def add(self, other: "ReadStats") -> None:
        self.bytes_read += other.bytes_read
        self.bytes_useful += other.bytes_useful
        self.requests += other.requests
        self.seconds += other.seconds

    @property
    def gbps(self) -> float:
        """Disk throughput of the read(s) in GB/s (10^9 bytes)."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


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


class FlashReader:
    """Reads neuron bundles of one flash model. Thread-safe for one caller at a
    time (calls are serialised by a lock; each call is parallel inside).

    threads:       parallel positional reads per call.
    chunk_bytes:   largest single request (rounded down to the alignment, at least one block).
    max_gap_bytes: aligned runs separated by at most this many bytes are read as one
                   request (the gap is read and dropped). 0 still merges runs that touch.
    direct:        bypass the page cache (O_DIRECT / F_NOCACHE); see :attr:`mode`.
    """

    def __init__(self, files: FlashFiles, *, threads: int = 8, chunk_bytes: int = 1 << 20,
                 max_gap_bytes: int = 16384, direct: bool = True):
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
        self._bufs = [aligned_buffer(self.chunk_bytes) for _ in range(self.threads)]
        self._views = [np.frombuffer(b, dtype=np.uint8) for b in self._bufs]
        # each buffer as rows of one bundle starting at every byte: a gather of bundles at any offsets
        self._windows = [np.lib.stride_tricks.sliding_window_view(v, self.bundle_bytes)
                         if len(v) >= self.bundle_bytes else None for v in self._views]
        self._pool: Optional[ThreadPoolExecutor] = (
            ThreadPoolExecutor(self.threads - 1, thread_name_prefix="flash-read") if self.threads > 1 else None
        )
        self._lock = threading.Lock()
        self.totals = ReadStats()
        self._offsets = np.array([e.offset for e in m.layers], dtype=np.int64)

    # ------------------------------------------------------------------ public
    def read(self, layer: int, ids: Union[Sequence[int], np.ndarray], out: np.ndarray,
             rows: Optional[np.ndarray] = None) -> ReadStats:
        """Read the bundles of neurons ``ids`` of ``layer`` into ``out``.

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
        if n == 0:
            return ReadStats(seconds=time.perf_counter() - t0)
        lo_id, hi_id = int(ids_arr.min()), int(ids_arr.max())
        if lo_id < 0 or hi_id >= self.intermediate_size:
            bad = lo_id if lo_id < 0 else hi_id
            raise IndexError(f"neuron id {bad} out of range for layer {layer}: "
                             f"valid ids are 0..{self.intermediate_size - 1}")

        with self._lock:
            plan, dup_rows, dup_src = self._plan(layer, ids_arr)
            if rows is not None:
                plan.rows = rows[plan.rows]
                if dup_rows is not None:
                    dup_rows, dup_src = rows[dup_rows], rows[dup_src]
            requests = self._run(plan, out)
            if dup_rows is not None:
                if isinstance(out, SplitRows):
                    out.copy_rows(dup_rows, dup_src)
                else:
                    out[dup_rows] = out[dup_src]
            stats = ReadStats(
                bytes_read=int((plan.req_hi - plan.req_lo).sum()),
                bytes_useful=len(plan.starts) * bb,
                requests=requests,
                seconds=time.perf_counter() - t0,
            )
            self.totals.add(stats)
        return stats

    def read_all(self, layer: int, out: np.ndarray) -> ReadStats:
        """Read every neuron of ``layer`` into ``out`` (``(intermediate_size, bundle_bytes)`` uint8)."""
        return self.read(layer, np.arange(self.intermediate_size, dtype=np.int64), out)

    def reset_totals(self) -> ReadStats:
        """Return the cumulative totals and start counting from zero."""
        t, self.totals = self.totals, ReadStats()
        return t

    def close(self) -> None:
        """Stop the worker threads, close the file and free the buffers (idempotent)."""
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._file.close()
            self._views = []
            self._windows = []
            for b in self._bufs:
                try:
                    b.close()
                except BufferError:  # a view is still exported somewhere; GC will free it
                    pass
            self._bufs = []

    def __enter__(self) -> "FlashReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._file.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"FlashReader({self.files.root}, mode={self.mode}, threads={self.threads}, "
                f"chunk_bytes={self.chunk_bytes}, max_gap_bytes={self.max_gap_bytes})")

    # ------------------------------------------------------------------ planning
    def _plan(self, layer: int, ids: np.ndarray) -> Tuple[_Plan, Optional[np.ndarray], Optional[np.ndarray]]:
        a, bb = self.alignment, self.bundle_bytes
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        dup_rows = dup_src = None
        if len(uniq) != len(ids):
            src_rows = first[inverse]
            mask = src_rows != np.arange(len(ids))
            dup_rows, dup_src = np.flatnonzero(mask), src_rows[mask]
        starts = self._offsets[layer] + uniq * bb
        req_lo, req_hi, n_lo, n_hi = plan_requests(starts, bb, a, self.max_gap_bytes, self.chunk_bytes)
        return _Plan(starts, first.astype(np.int64), req_lo, req_hi, n_lo, n_hi), dup_rows, dup_src

    # ------------------------------------------------------------------ work
    def _run(self, plan: _Plan, out) -> int:
        """Read every request of ``plan`` and copy its bundles out; returns the system calls.

        Up to ``threads`` workers, the calling thread one of them (no hand-off when one
        worker is enough), each with its own aligned buffer, take the next request from a
        shared counter until none is left (a slow request does not hold up a fixed share
        of others)."""
        nreq = len(plan.req_lo)
        job = _Job(plan, nreq, self.bundle_bytes)
        k = min(self.threads, nreq)
        if k <= 1 or self._pool is None:
            return self._work(0, job, out)
        futs = [self._pool.submit(self._work, slot, job, out) for slot in range(1, k)]
        try:
            n = self._work(0, job, out)
        except BaseException:
            job.stop = True  # the others finish their current request and stop
            raise
        finally:
            for f in futs:  # every worker is done before the call returns or raises (buffers, out)
                if f.exception() is not None:
                    job.stop = True
        return n + sum(f.result() for f in futs)

    def _work(self, slot: int, job: "_Job", out) -> int:
        """Worker ``slot``: take requests from ``job`` until none is left, reading each into the
        next free part of the slot's buffer; when the next one does not fit, copy the bundles of
        the buffered requests out in one gather (few numpy calls per buffer, not per request)."""
        view = self._views[slot]
        windows = self._windows[slot]
        fd = self._file.fd
        bb = self.bundle_bytes
        cap = len(view)
        starts, rows = job.plan.starts, job.plan.rows
        req_lo, req_hi, need, j0s, j1s = job.lo, job.hi, job.need, job.j0, job.j1
        left, right = job.left, job.right
        take = job.take
        requests = 0
        batch: List[Tuple[int, int]] = []  # (request, its offset in the buffer) with whole bundles to copy
        used = 0
        with memoryview(self._bufs[slot]) as mv:
            while not job.stop:
                r = next(take)
                if r >= job.n:
                    break
                lo = req_lo[r]
                length = req_hi[r] - lo
                if used + length > cap:
                    self._copy_out(batch, job, windows, view, out)
                    batch, used = [], 0
                got = 0
                while got < need[r]:
                    nread = os.preadv(fd, [mv[used + got : used + length]], lo + got)
                    requests += 1
                    if nread <= 0:
                        raise FlashFormatError(
                            f"{self.files.ffn_path}: unexpected end of file at byte {lo + got} "
                            f"(read {lo}..{lo + length}); the file is shorter than the manifest says"
                        )
                    got += nread
                for j in (left[r], right[r]):  # bundles straddling the request's edges: the part inside
                    if j >= 0:
                        s0 = int(starts[j])
                        a, b = max(s0, lo), min(s0 + bb, lo + length)
                        _set_bytes(out, int(rows[j]), a - s0, b - s0, view[used + a - lo : used + b - lo])
                if j0s[r] < j1s[r]:
                    batch.append((r, used))
                used += length
            self._copy_out(batch, job, windows, view, out)
        return requests

    def _copy_out(self, batch, job: "_Job", windows, view: np.ndarray, out) -> None:
        """Copy the whole bundles of the buffered requests ``batch`` (``(request, offset in the
        buffer)``) into their rows of ``out``."""
        if not batch:
            return
        bb = self.bundle_bytes
        starts, rows = job.plan.starts, job.plan.rows
        if len(batch) == 1:
            r, boff = batch[0]
            j0, j1 = job.j0[r], job.j1[r]
            offs = starts[j0:j1] - (job.lo[r] - boff)
            dst = rows[j0:j1]
        else:
            offs = np.concatenate([starts[job.j0[r] : job.j1[r]] - (job.lo[r] - boff) for r, boff in batch])
            dst = np.concatenate([rows[job.j0[r] : job.j1[r]] for r, _ in batch])
        k = len(offs)
        o0 = int(offs[0])
        if int(offs[-1]) - o0 == (k - 1) * bb:  # offsets increase by >= bb: consecutive bundles, a view
            block = view[o0 : o0 + k * bb].reshape(k, bb)
        else:  # one gather of rows starting at any byte offset
            block = windows[offs]
        r0 = int(dst[0])
        if int(dst[-1]) - r0 == k - 1 and (k <= 2 or bool(np.all(np.diff(dst) == 1))):
            set_rows(out, slice(r0, r0 + k), block)
        else:
            set_rows(out, dst, block)


class _Job:
    """The requests of one read call, shared by its workers: ``take`` hands out request
    indices (``next`` on an ``itertools.count`` is atomic in CPython); ``stop`` ends the
    call early after an error. Per request (Python lists, computed with numpy once per call):
    ``lo``/``hi``, ``need`` (bytes up to the end of its last bundle: a short read at the end
    of the file past that is fine), ``j0``/``j1`` (the bundles wholly inside it), ``left``/
    ``right`` (a bundle straddling its start / end, -1 when none)."""

    def __init__(self, plan: _Plan, n: int, bundle_bytes: int):
        self.plan = plan
        self.n = n
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
        self.take = itertools.count()
        self.stop = False


__all__ = ["FlashReader", "ReadStats", "SplitRows", "set_rows"]
