"""Where a read request's time goes (ReadStats' request-life counters), the workers' scheduler
figures, and the read threads' scheduling shim: real reads of a real tiny flash file."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from mlx_flash.storage.format import open_flash
from mlx_flash.storage.platform_io import favour_io_thread, thread_sched_seconds
from mlx_flash.storage.reader import FlashReader, ReadStats
from tests.tiny import make_tiny_flash


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return open_flash(make_tiny_flash(tmp_path_factory.mktemp("split"), layers=2, hidden=64, ffn=300))


def _expected(files, layer, ids) -> np.ndarray:
    m = files.manifest
    raw = np.fromfile(files.ffn_path, dtype=np.uint8)
    return np.stack([raw[m.neuron_offset(layer, int(i)) : m.neuron_offset(layer, int(i)) + m.bundle_bytes]
                     for i in ids])


def test_request_life_counters(small):
    """Every request is queued, read and copied out; the figures add up per request and the
    split gives one number per phase (reads submitted without waiting, so the workers serve them)."""
    m = small.manifest
    bb = m.bundle_bytes
    with FlashReader(small, threads=4, chunk_bytes=512, max_gap_bytes=0) as r:
        r.reset_totals()
        outs, handles = [], []
        for layer in (0, 1, 0):
            ids = np.arange(0, m.intermediate_size, 3)  # sorted and distinct
            outs.append((layer, ids, np.empty((len(ids), bb), np.uint8)))
            handles.append(r.submit(layer, ids, outs[-1][2]))
        for h, (layer, ids, out) in zip(handles, outs):
            h.wait()
            np.testing.assert_array_equal(out, _expected(small, layer, ids))
        t = r.reset_totals()
    assert t.requests > 0
    assert t.plan_seconds > 0 and t.syscall_seconds > 0 and t.copy_seconds > 0
    assert t.queue_seconds >= 0 and t.wake_seconds >= 0
    assert 0 <= t.waiter_requests <= t.requests and 0 <= t.waits_blocked <= 3
    s = t.split()
    assert set(s) >= {"plan_us", "queue_us", "syscall_us", "copy_us", "syscall_depth", "waiter_share",
                      "cpu_us", "runq_us"}
    assert s["syscall_us"] == pytest.approx(t.syscall_seconds * 1e6 / t.requests)
    assert 0 < s["syscall_depth"]
    if sys.platform.startswith("linux"):  # schedstat: the workers ran
        assert t.thread_cpu_seconds > 0 and t.thread_runq_seconds >= 0
    assert ReadStats().split() == {}


def test_add_sums_every_field():
    a = ReadStats(1, 2, 3, 0.5, 0.25, queue_seconds=1.0, waits_blocked=2, thread_runq_seconds=0.5)
    b = ReadStats(10, 20, 30, 1.0, 0.5, queue_seconds=2.0, waits_blocked=1, copy_seconds=0.125)
    a.add(b)
    assert (a.bytes_read, a.requests, a.queue_seconds, a.waits_blocked) == (11, 33, 3.0, 3)
    assert (a.copy_seconds, a.thread_runq_seconds) == (0.125, 0.5)


def test_unsorted_and_repeated_ids_read_like_sorted_ones(small):
    """The sorted-and-distinct fast path of the plan and the general one give the same bytes."""
    bb = small.manifest.bundle_bytes
    ids = np.array([7, 8, 9, 40, 41, 299])
    mixed = np.array([41, 7, 299, 8, 7, 40, 9, 299])
    with FlashReader(small, threads=3, chunk_bytes=1024, max_gap_bytes=512) as r:
        a = np.empty((len(ids), bb), np.uint8)
        b = np.empty((len(mixed), bb), np.uint8)
        sa, sb = r.read(1, ids, a), r.read(1, mixed, b)
    np.testing.assert_array_equal(a, _expected(small, 1, ids))
    np.testing.assert_array_equal(b, _expected(small, 1, mixed))
    assert sa.bytes_read == sb.bytes_read and sa.bytes_useful == sb.bytes_useful


def test_thread_sched_seconds():
    me = threading.get_native_id()
    got = thread_sched_seconds([me])
    if not sys.platform.startswith("linux"):
        assert got is None
        return
    if got is None:
        pytest.skip("no schedstat on this kernel")
    cpu, wait = got
    assert cpu > 0 and wait >= 0
    assert thread_sched_seconds([2**31 - 1]) is None  # no such thread of this process
    assert thread_sched_seconds([]) == (0.0, 0.0)


def test_favour_io_thread_in_a_thread_of_its_own():
    """The shim works or does nothing, never raises, and asking twice is harmless."""
    got = []
    t = threading.Thread(target=lambda: got.extend([favour_io_thread(), favour_io_thread()]))
    t.start()
    t.join()
    assert all(isinstance(g, str) for g in got) and got[0] == got[1]


def test_reader_threads_favoured_or_not(small):
    bb = small.manifest.bundle_bytes
    ids = np.arange(50)
    for favour in (True, False):
        with FlashReader(small, threads=3, chunk_bytes=512, favour_threads=favour) as r:
            out = np.empty((len(ids), bb), np.uint8)
            r.read(0, ids, out)
            np.testing.assert_array_equal(out, _expected(small, 0, ids))
            if not favour:
                assert r.thread_priority == ""
            else:
                assert isinstance(r.thread_priority, str)
