"""FlashReader returns exactly the bytes on disk, however the reads are cut."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.storage import platform_io
from mlx_flash.storage.format import FlashFormatError, open_flash, read_layer_weights
from mlx_flash.storage.platform_io import UncachedIOWarning, drop_page_cache, open_uncached
from mlx_flash.storage.reader import FlashReader, ReadStats, SplitRows
from tests.tiny import make_tiny_flash


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """float16, hidden 64: 384-byte bundles, ~10 per 4 KiB block; 300 neurons, 2 layers."""
    return open_flash(make_tiny_flash(tmp_path_factory.mktemp("small"), layers=2, hidden=64, ffn=300))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """float32, hidden 384: 4608-byte bundles, larger than a 4 KiB block (they straddle requests)."""
    return open_flash(make_tiny_flash(tmp_path_factory.mktemp("wide"), layers=2, hidden=384, ffn=48,
                                      heads=4, kv_heads=2, dtype="float32"))


def _expected(files, layer, ids) -> np.ndarray:
    """The bundles straight from the file with a plain read (the oracle)."""
    m = files.manifest
    raw = np.fromfile(files.ffn_path, dtype=np.uint8)
    return np.stack([raw[m.neuron_offset(layer, int(i)) : m.neuron_offset(layer, int(i)) + m.bundle_bytes]
                     for i in ids]) if len(ids) else np.zeros((0, m.bundle_bytes), np.uint8)


def _random_ids(rng, n_neurons):
    kind = rng.integers(4)
    if kind == 0:  # sparse random, unsorted, with duplicates
        return rng.integers(0, n_neurons, rng.integers(1, n_neurons // 3))
    if kind == 1:  # a random subset without duplicates, shuffled
        return rng.permutation(n_neurons)[: rng.integers(1, n_neurons)]
    if kind == 2:  # a few clustered runs
        starts = rng.integers(0, n_neurons, 4)
        ids = np.concatenate([np.arange(s, min(s + rng.integers(1, 20), n_neurons)) for s in starts])
        return rng.permutation(ids)
    return np.array([rng.integers(n_neurons)])  # a single neuron


@pytest.mark.parametrize("threads", [1, 8])
@pytest.mark.parametrize("chunk_bytes", [512, 4096, 1 << 20])
@pytest.mark.parametrize("max_gap", [0, 1 << 20])
@pytest.mark.parametrize("which", ["small", "wide"])
def test_reader_returns_exact_bytes(request, which, threads, chunk_bytes, max_gap):
    files = request.getfixturevalue(which)
    m = files.manifest
    raw = np.fromfile(files.ffn_path, dtype=np.uint8)
    with FlashReader(files, threads=threads, chunk_bytes=chunk_bytes, max_gap_bytes=max_gap) as r:
        for seed in range(25):
            rng = np.random.default_rng(seed)
            layer = int(rng.integers(m.num_layers))
            ids = _random_ids(rng, m.intermediate_size)
            out = np.full((len(ids), m.bundle_bytes), 0xAB, dtype=np.uint8)
            st = r.read(layer, ids, out)
            offs = np.array([m.neuron_offset(layer, int(i)) for i in ids])
            expect = raw[offs[:, None] + np.arange(m.bundle_bytes)]
            np.testing.assert_array_equal(out, expect, err_msg=f"seed {seed}")
            n_unique = len(np.unique(ids))
            assert st.bytes_useful == n_unique * m.bundle_bytes
            assert st.bytes_read >= st.bytes_useful and st.bytes_read % r.alignment == 0
            assert st.requests >= 1 and st.seconds > 0
            if chunk_bytes <= 4096:
                assert st.requests * chunk_bytes >= st.bytes_read


def test_mode_is_o_direct_on_this_disk(small):
    if not sys.platform.startswith("linux"):
        pytest.skip("O_DIRECT is Linux-only")
    fstype = _fstype(small.ffn_path)
    if fstype in ("tmpfs", "ramfs", "overlay", "9p", "fuse"):
        pytest.skip(f"{fstype} may refuse O_DIRECT")
    with FlashReader(small) as r:
        assert r.mode == "O_DIRECT"
        flags = int(open(f"/proc/self/fdinfo/{r._file.fd}").read().split("flags:")[1].split()[0], 8)
        assert flags & os.O_DIRECT


def _fstype(path: Path) -> str:
    best, fs = "", ""
    real = str(Path(path).resolve())
    for line in open("/proc/self/mounts"):
        parts = line.split()
        mnt = parts[1]
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fs = mnt, parts[2]
    return fs


def test_coalescing_and_splitting(small):
    m = small.manifest
    bb = m.bundle_bytes
    # all neurons: one contiguous run of the layer's aligned span
    out = np.empty((m.intermediate_size, bb), np.uint8)
    with FlashReader(small, threads=1, chunk_bytes=1 << 20) as r:
        span = -(-(m.layers[0].size) // r.alignment) * r.alignment
        st = r.read_all(0, out)
        assert st.requests == 1 and st.bytes_read == span
    with FlashReader(small, threads=4, chunk_bytes=8192) as r:
        st = r.read_all(1, out)
        assert st.requests == -(-span // 8192) and st.bytes_read == span
        np.testing.assert_array_equal(out, _expected(small, 1, range(m.intermediate_size)))
    # two far-apart neurons: one request each without a large gap allowance, one with it
    ids = np.array([0, 200])
    out2 = np.empty((2, bb), np.uint8)
    with FlashReader(small, threads=1, max_gap_bytes=0) as r:
        assert r.read(0, ids, out2).requests == 2
    with FlashReader(small, threads=1, max_gap_bytes=1 << 20) as r:
        st = r.read(0, ids, out2)
        assert st.requests == 1 and st.bytes_read > 2 * bb
    np.testing.assert_array_equal(out2, _expected(small, 0, ids))
    # a coalesced run split into small chunks skips the chunks that hold only gap
    with FlashReader(small, threads=1, max_gap_bytes=1 << 20, chunk_bytes=4096) as r:
        st = r.read(0, ids, out2)
        assert st.requests == 2 and 2 * bb < st.bytes_read <= 2 * 4096  # not the 77 KB run
    np.testing.assert_array_equal(out2, _expected(small, 0, ids))


def test_duplicates_and_order(small):
    m = small.manifest
    ids = np.array([5, 3, 5, 299, 3, 0, 5])
    out = np.empty((len(ids), m.bundle_bytes), np.uint8)
    with FlashReader(small, threads=2) as r:
        st = r.read(1, ids, out)
    np.testing.assert_array_equal(out, _expected(small, 1, ids))
    assert st.bytes_useful == 4 * m.bundle_bytes


def test_reads_into_mlx_memory_and_strided_rows(small):
    m = small.manifest
    ids = np.array([7, 1, 250, 251, 252])
    cache = mx.zeros((10, m.bundle_elems), dtype=mx.float16)
    mx.eval(cache)
    host = np.array(cache.view(mx.uint8), copy=False)  # (10, bundle_bytes), writable view of MLX memory
    with FlashReader(small, threads=4) as r:
        r.read(0, ids, host[2:7])
        r.read(1, ids, host[::2])  # rows 0, 2, ..., 8: strided rows, each contiguous
    np.testing.assert_array_equal(host[::2], _expected(small, 1, ids))
    g, u, d = (np.asarray(t) for t in read_layer_weights(small, 1))
    h = m.hidden_size
    np.testing.assert_array_equal(np.asarray(cache[8, :h]), g[252])
    np.testing.assert_array_equal(np.asarray(cache[8, 2 * h :]), d[:, 252])


def test_empty_read(small):
    with FlashReader(small) as r:
        st = r.read(0, np.array([], dtype=np.int64), np.empty((0, small.manifest.bundle_bytes), np.uint8))
        assert (st.bytes_read, st.bytes_useful, st.requests) == (0, 0, 0)


def test_bounds_and_argument_errors(small):
    m = small.manifest
    bb = m.bundle_bytes
    out = np.empty((1, bb), np.uint8)
    with FlashReader(small, threads=2) as r:
        for layer, ids in [(-1, [0]), (2, [0]), (0, [-1]), (0, [300]), (1, [10**9])]:
            with pytest.raises(IndexError, match="out of range"):
                r.read(layer, np.array(ids), out)
        with pytest.raises(ValueError, match="shape"):
            r.read(0, np.array([1, 2]), out)
        with pytest.raises(ValueError, match="uint8"):
            r.read(0, np.array([1]), np.empty((1, bb), np.float32))
        with pytest.raises(TypeError):
            r.read(0, np.array([1.5]), out)
        ro = np.empty((1, bb), np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            r.read(0, np.array([1]), ro)
    with pytest.raises(ValueError, match="closed"):
        r.read(0, np.array([1]), out)
    r.close()  # idempotent


def test_totals_accumulate(small):
    bb = small.manifest.bundle_bytes
    with FlashReader(small, threads=2) as r:
        a = r.read(0, np.array([1, 2, 3]), np.empty((3, bb), np.uint8))
        b = r.read(1, np.array([100]), np.empty((1, bb), np.uint8))
        t = r.totals
        assert t.bytes_read == a.bytes_read + b.bytes_read
        assert t.bytes_useful == 4 * bb and t.requests == a.requests + b.requests
        assert isinstance(r.reset_totals(), ReadStats) and r.totals.bytes_read == 0


def test_end_of_file_is_a_format_error(tmp_path):
    files = open_flash(make_tiny_flash(tmp_path, layers=2, hidden=64, ffn=300))
    m = files.manifest
    with FlashReader(files, threads=1) as r:
        os.truncate(files.ffn_path, m.layers[1].offset + 4096)  # damaged after validation
        out = np.empty((1, m.bundle_bytes), np.uint8)
        r.read(1, np.array([0]), out)  # still inside the file
        with pytest.raises(FlashFormatError, match="unexpected end of file"):
            r.read(1, np.array([m.intermediate_size - 1]), out)


def test_submitted_reads_of_several_layers_in_flight(small, wide):
    """Reads of several layers submitted at once (no wait in between), into plain rows, chosen
    rows and role-split rows, waited for in another order than submitted: each gets exactly
    its bytes; a read waited for first is served first, the others finish meanwhile."""
    for files in (small, wide):
        m = files.manifest
        raw = np.fromfile(files.ffn_path, dtype=np.uint8)
        with FlashReader(files, threads=4, chunk_bytes=512, max_gap_bytes=0) as r:
            rng = np.random.default_rng(7)
            jobs = []
            for k in range(12):
                layer = k % m.num_layers
                ids = _random_ids(rng, m.intermediate_size)
                if k % 3 == 0:  # every neuron, many requests
                    ids = rng.permutation(m.intermediate_size)
                out = np.full((len(ids) + 2, m.bundle_bytes), 0xCD, dtype=np.uint8)
                rows = rng.permutation(len(ids) + 2)[: len(ids)] if k % 2 else None
                dest = out if rows is not None else out[: len(ids)]
                jobs.append((layer, ids, out, rows, r.submit(layer, ids, dest, rows)))
            for i in [5, 11, 0, 3, 1, 2, 4, 6, 7, 8, 9, 10]:  # out of order
                layer, ids, out, rows, h = jobs[i]
                st = h.wait()
                assert h.done() and h.finished is not None and h.finished >= h.started
                offs = np.array([m.neuron_offset(layer, int(j)) for j in ids])
                got = out[rows] if rows is not None else out[: len(ids)]
                np.testing.assert_array_equal(got, raw[offs[:, None] + np.arange(m.bundle_bytes)], err_msg=str(i))
                if rows is not None:  # the other rows are left alone
                    assert (np.delete(out, rows, axis=0) == 0xCD).all()
                else:
                    assert (out[len(ids):] == 0xCD).all()
                assert st.bytes_useful == len(np.unique(ids)) * m.bundle_bytes
                assert h.wait() is st  # waiting again returns the same figures
            t = r.reset_totals()
            assert t.bytes_read == sum(h.wait().bytes_read for *_, h in jobs)
            assert t.requests == sum(h.wait().requests for *_, h in jobs)
            assert t.seconds <= sum(h.wait().seconds for *_, h in jobs)  # wall time with reads in flight
            assert 0 < t.service_seconds <= t.seconds  # ... of which a read thread was at work


def test_submit_with_one_thread_and_close_with_reads_queued(small):
    """threads=1: no workers, the waiting thread reads; close() finishes reads nobody waited for."""
    m = small.manifest
    raw = np.fromfile(small.ffn_path, dtype=np.uint8)
    r = FlashReader(small, threads=1, chunk_bytes=512)
    out = np.zeros((m.intermediate_size, m.bundle_bytes), np.uint8)
    h = r.submit(1, np.arange(m.intermediate_size), out)
    assert not h.done()  # nobody has read it yet
    r.close()
    assert h.done()
    np.testing.assert_array_equal(out.reshape(-1), raw[m.layers[1].offset : m.layers[1].offset + out.size])
    with pytest.raises(ValueError, match="closed"):
        r.submit(0, np.array([1]), out[:1])


def test_a_failed_request_surfaces_from_wait(tmp_path):
    """A read past the end of a damaged file raises the same FlashFormatError from wait(),
    whichever thread hit it; reads submitted with it still return their bytes, and the
    reader keeps working."""
    files = open_flash(make_tiny_flash(tmp_path, layers=2, hidden=64, ffn=300))
    m = files.manifest
    raw = np.fromfile(files.ffn_path, dtype=np.uint8)
    with FlashReader(files, threads=4, chunk_bytes=512, max_gap_bytes=0) as r:
        os.truncate(files.ffn_path, m.layers[1].offset + 4096)  # damaged after validation
        good0 = np.empty((m.intermediate_size, m.bundle_bytes), np.uint8)
        bad = np.empty((m.intermediate_size, m.bundle_bytes), np.uint8)
        h0 = r.submit(0, np.arange(m.intermediate_size), good0)
        hb = r.submit(1, np.arange(m.intermediate_size), bad)
        with pytest.raises(FlashFormatError, match="unexpected end of file"):
            hb.wait()
        with pytest.raises(FlashFormatError, match="unexpected end of file"):
            hb.wait()  # every wait says so
        h0.wait()
        o0 = m.layers[0].offset
        np.testing.assert_array_equal(good0.reshape(-1), raw[o0 : o0 + good0.size])
        with pytest.raises(FlashFormatError, match="unexpected end of file"):
            r.read(1, np.array([m.intermediate_size - 1]), bad[:1])
        one = np.empty((1, m.bundle_bytes), np.uint8)
        r.read(1, np.array([0]), one)  # still inside the file
        off = m.neuron_offset(1, 0)
        np.testing.assert_array_equal(one[0], raw[off : off + m.bundle_bytes])


# --------------------------------------------------------------------------- platform_io
def test_buffered_on_request(small):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with FlashReader(small, direct=False) as r:
            assert r.mode == "buffered"
            out = np.empty((2, small.manifest.bundle_bytes), np.uint8)
            r.read(0, np.array([9, 4]), out)
    np.testing.assert_array_equal(out, _expected(small, 0, [9, 4]))


def test_fallback_warns_when_direct_io_is_unavailable(small, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    monkeypatch.setattr(platform_io.sys, "platform", "linux")
    with pytest.warns(UncachedIOWarning, match="page cache"):
        f = open_uncached(small.ffn_path)
    with f:
        assert f.mode == "buffered"


def test_aligned_buffer_and_drop_page_cache(small):
    buf = platform_io.aligned_buffer(5000)
    assert len(buf) == 8192
    addr = np.frombuffer(buf, np.uint8).__array_interface__["data"][0]
    assert addr % 4096 == 0
    buf.close()
    if hasattr(os, "posix_fadvise"):
        assert drop_page_cache(small.ffn_path) is True
    assert drop_page_cache(Path("/nonexistent/file")) is False


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("chunk_bytes", [4096, 1 << 20])
@pytest.mark.parametrize("which", ["small", "wide"])
def test_split_rows_scatter_bundles_by_role(request, which, threads, chunk_bytes):
    """Reading into a SplitRows (role-major destination) gives each part exactly its
    columns of the bundles, also for bundles that straddle two requests."""
    files = request.getfixturevalue(which)
    m = files.manifest
    bb = m.bundle_bytes
    cuts = [0, bb // 3, bb // 3 + 2, 2 * bb // 3, bb]  # uneven parts, one of 2 bytes
    with FlashReader(files, threads=threads, chunk_bytes=chunk_bytes, max_gap_bytes=1 << 16) as r:
        for seed in range(15):
            rng = np.random.default_rng(100 + seed)
            layer = int(rng.integers(m.num_layers))
            ids = _random_ids(rng, m.intermediate_size)
            parts = [(a, b, np.full((len(ids), b - a), 0xCD, np.uint8)) for a, b in zip(cuts, cuts[1:])]
            r.read(layer, ids, SplitRows(parts, len(ids), bb))
            got = np.concatenate([p[2] for p in parts], axis=1)
            np.testing.assert_array_equal(got, _expected(files, layer, ids), err_msg=f"seed {seed}")
            # a dropped part (None: the gate rows a gate-first chooser holds) is read and not copied
            kept = [(a, b, np.full((len(ids), b - a), 0xCD, np.uint8)) for a, b in zip(cuts[1:], cuts[2:])]
            dest = SplitRows([(cuts[0], cuts[1], None)] + kept, len(ids), bb)
            half = len(ids) // 2
            r.read(layer, ids[:half], dest[:half])  # a row slice keeps the dropped range dropped
            r.read(layer, ids[half:], dest[half:])
            got = np.concatenate([p[2] for p in kept], axis=1)
            np.testing.assert_array_equal(got, _expected(files, layer, ids)[:, cuts[1]:], err_msg=f"seed {seed}")
    with pytest.raises(ValueError, match="tile"):
        SplitRows([(0, 4, np.zeros((2, 4), np.uint8)), (5, 8, np.zeros((2, 3), np.uint8))], 2, 8)
    with pytest.raises(ValueError, match="cover"):
        SplitRows([(0, 4, np.zeros((2, 4), np.uint8))], 2, 8)


@pytest.mark.parametrize("max_gap", [0, 2048, 1 << 20])
def test_covered_neurons_cost_no_extra_byte(small, max_gap):
    """``covered``: the asked neurons plus every neuron wholly inside the runs their read reads;
    reading all of them reads the same bytes in the same requests, one more neuron reads more."""
    rng = np.random.default_rng(max_gap)
    m = small.manifest
    bb = m.bundle_bytes
    with FlashReader(small, threads=2, chunk_bytes=1 << 20, max_gap_bytes=max_gap) as r:
        for _ in range(12):
            ids = _random_ids(rng, m.intermediate_size)
            cov = r.covered(1, ids)
            assert np.all(np.diff(cov) > 0) and np.isin(ids, cov).all()
            want = r.read(1, ids, np.empty((len(ids), bb), np.uint8))
            out = np.empty((len(cov), bb), np.uint8)
            got = r.read(1, cov, out)
            assert (got.bytes_read, got.requests) == (want.bytes_read, want.requests)
            np.testing.assert_array_equal(out, _expected(small, 1, cov))
            rest = np.setdiff1d(np.arange(m.intermediate_size), cov)
            for j in rng.choice(rest, min(3, len(rest)), replace=False):
                more = r.read(1, np.append(cov, j), np.empty((len(cov) + 1, bb), np.uint8))
                assert more.bytes_read > want.bytes_read
        assert len(r.covered(0, np.array([], dtype=np.int64))) == 0
