"""Direct-I/O alignment from the device (platform_io) and reads trimmed to it (reader)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mlx_flash.config import FlashConfig
from mlx_flash.storage import platform_io
from mlx_flash.storage.format import FlashFormatError, open_flash
from mlx_flash.storage.platform_io import (
    DIRECT_ALIGNMENT,
    aligned_buffer,
    direct_alignment,
    logical_block_size,
    open_uncached,
    sysfs_block_size,
)
from mlx_flash.storage.probe import DEFAULT_GAP, ProbeResult, load_cached_gap
from mlx_flash.storage.reader import FlashReader
from tests.tiny import make_tiny_flash

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="O_DIRECT and sysfs are Linux's")


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """float16, hidden 96: 576-byte bundles (not a multiple of 512), 400 neurons, 2 layers."""
    return open_flash(make_tiny_flash(tmp_path_factory.mktemp("odd"), layers=2, hidden=96, ffn=400,
                                      heads=4, kv_heads=2))


def _sys_tree(root: Path, disks: dict) -> Path:
    """A sysfs-like tree: ``devices/<disk>/queue/logical_block_size``, partitions as
    subfolders without ``queue``, ``dev/block/MAJ:MIN`` links. ``disks``: name -> (major,
    minor, block size or None, {partition: minor})."""
    dev_block = root / "dev" / "block"
    dev_block.mkdir(parents=True)
    for name, (major, minor, size, parts) in disks.items():
        d = root / "devices" / name
        (d / "queue").mkdir(parents=True)
        if size is not None:
            (d / "queue" / "logical_block_size").write_text(f"{size}\n")
        (dev_block / f"{major}:{minor}").symlink_to(d)
        for p, pminor in parts.items():
            (d / p).mkdir()
            (dev_block / f"{major}:{pminor}").symlink_to(d / p)
    return dev_block


def test_sysfs_block_size_walks_to_the_parent_disk(tmp_path):
    dev_block = _sys_tree(tmp_path, {"sda": (8, 0, 512, {"sda1": 1, "sda2": 2}),
                                     "nvme0n1": (259, 0, 4096, {"nvme0n1p1": 1}),
                                     "odd": (7, 0, 1000, {})})
    assert sysfs_block_size(dev_block, 8, 0) == 512
    assert sysfs_block_size(dev_block, 8, 2) == 512  # a partition: its disk's queue
    assert sysfs_block_size(dev_block, 259, 1) == 4096
    assert sysfs_block_size(dev_block, 7, 0) is None  # not a power of two
    assert sysfs_block_size(dev_block, 9, 9) is None  # no such device


@linux
def test_alignment_of_this_disk(odd):
    lbs = logical_block_size(odd.ffn_path)
    assert lbs is None or (lbs >= 512 and lbs & (lbs - 1) == 0)
    assert direct_alignment(odd.ffn_path) == (lbs or DIRECT_ALIGNMENT)
    assert logical_block_size("/nonexistent/file") is None
    if Path("/dev/shm").is_dir() and os.major(os.stat("/dev/shm").st_dev) == 0:  # tmpfs: no block device
        assert direct_alignment("/dev/shm") == DIRECT_ALIGNMENT
    with open_uncached(odd.ffn_path) as f:
        if f.mode != platform_io.MODE_O_DIRECT:
            pytest.skip(f"this filesystem refuses O_DIRECT ({f.mode})")
        assert f.alignment == f.read_alignment and f.alignment in (direct_alignment(odd.ffn_path), DIRECT_ALIGNMENT)
        # a read at an offset and length of one alignment unit (not 4096) works and returns the file's bytes
        a = f.alignment
        raw = odd.ffn_path.read_bytes()
        buf = aligned_buffer(4 * a)
        with memoryview(buf) as mv:
            n = os.preadv(f.fd, [mv[: 3 * a]], 5 * a)
            assert n == 3 * a and bytes(mv[:n]) == raw[5 * a : 8 * a]
        buf.close()
    with open_uncached(odd.ffn_path, direct=False) as f:
        assert f.read_alignment == DIRECT_ALIGNMENT  # other modes keep whole-page reads


def test_single_neurons_at_odd_offsets(odd):
    """Every neuron alone: the exact bytes, and no more than its bundle rounded out to the
    reader's alignment on both sides."""
    m = odd.manifest
    bb = m.bundle_bytes
    raw = np.fromfile(odd.ffn_path, dtype=np.uint8)
    out = np.empty((1, bb), np.uint8)
    with FlashReader(odd, threads=2, max_gap_bytes=0) as r:
        a = r.alignment
        for layer in range(m.num_layers):
            for i in range(m.intermediate_size):
                st = r.read(layer, [i], out)
                off = m.neuron_offset(layer, i)
                np.testing.assert_array_equal(out[0], raw[off : off + bb])
                lo, hi = off // a * a, -(-(off + bb) // a) * a
                assert st.bytes_read == hi - lo and st.requests == 1


def test_amplification_bound_on_sparse_reads(odd):
    """Every 5th neuron (gaps of 4 bundles), no coalescing: each bundle costs at most its
    aligned span, so amplification is bounded by the alignment, not by 4 KiB blocks."""
    m = odd.manifest
    bb = m.bundle_bytes
    ids = np.arange(0, m.intermediate_size, 5)
    out = np.empty((len(ids), bb), np.uint8)
    with FlashReader(odd, threads=4, max_gap_bytes=0) as r:
        st = r.read(1, ids, out)
        a = r.alignment
    worst = (-(-bb // a) + 1) * a  # a bundle straddles at most one extra block
    assert st.bytes_useful == len(ids) * bb
    assert st.bytes_read <= len(ids) * worst
    if a == 512:  # this machine's disk: 1.78x at most, where 4 KiB blocks cost 7.1x
        assert st.bytes_read / st.bytes_useful < 1.8
    raw = np.fromfile(odd.ffn_path, dtype=np.uint8)
    offs = np.array([m.neuron_offset(1, int(i)) for i in ids])
    np.testing.assert_array_equal(out, raw[offs[:, None] + np.arange(bb)])


def test_many_workers_end_of_file_is_a_format_error(tmp_path):
    files = open_flash(make_tiny_flash(tmp_path, layers=2, hidden=64, ffn=300))
    m = files.manifest
    with FlashReader(files, threads=4, chunk_bytes=512) as r:
        os.truncate(files.ffn_path, m.layers[1].offset + 4096)  # damaged after validation
        out = np.empty((m.intermediate_size, m.bundle_bytes), np.uint8)
        with pytest.raises(FlashFormatError, match="unexpected end of file"):
            r.read_all(1, out)
        r.read(0, np.arange(10), out[:10])  # the reader still works after the error
        np.testing.assert_array_equal(out[0], np.fromfile(files.ffn_path, np.uint8)[: m.bundle_bytes])


# --------------------------------------------------------------------------- gap from the probe
def _table(t0: float, bw: float, chunks=(4096, 16384, 65536, 262144, 1 << 20), threads=(1, 16)):
    """A probe table of a disk where a request of c bytes costs t0 + c / bw seconds."""
    return ProbeResult(table={c: {t: c / (t0 + c / bw) / 1e9 for t in threads} for c in chunks}, mode="O_DIRECT")


def test_request_cost_and_gap_from_the_probe():
    p = _table(20e-6, 2e9)
    t0, bw = p.request_cost(16)
    assert t0 == pytest.approx(20e-6, rel=1e-6) and bw == pytest.approx(2e9, rel=1e-6)
    assert p.gap_bytes(16) == (40000 // 512) * 512  # a request costs as much as 40 kB
    assert p.gap_bytes(16, alignment=4096) == 36864
    assert _table(1e-6, 2e9).gap_bytes(16) < _table(100e-6, 2e9).gap_bytes(16)
    assert _table(1e-3, 2e9).gap_bytes(16) == 1 << 20  # capped
    assert p.request_cost(12) == p.request_cost(16)  # the nearest measured thread count
    # interpolation of the table at a request size
    assert p.at(65536, 16) == pytest.approx(p.table[65536][16])
    assert p.table[16384][16] < p.at(32768, 16) < p.table[65536][16]
    assert p.at(100, 16) == pytest.approx(p.table[4096][16]) and p.at(1e9, 16) == pytest.approx(p.table[1 << 20][16])
    assert p.at(65536, 8) is None


def test_load_cached_gap_without_a_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_HOME", str(tmp_path / "home"))
    assert load_cached_gap(tmp_path, 16) == DEFAULT_GAP


def test_config_gap_none_means_from_the_probe():
    assert FlashConfig().max_gap_bytes is None
    assert FlashConfig(max_gap_bytes=0).max_gap_bytes == 0
    with pytest.raises(ValueError, match="max_gap_bytes"):
        FlashConfig(max_gap_bytes=-1)
