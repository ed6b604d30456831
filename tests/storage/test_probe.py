"""The disk probe: a real (tiny) measurement, the choice policy, the cache."""

from __future__ import annotations

import json
import sys

import pytest

from mlx_flash.progress import Cancelled
from mlx_flash.storage.probe import (
    DEFAULT_CHOICE,
    ProbeResult,
    cached_probe,
    cached_result,
    load_cached_choice,
    probe_disk,
    probe_file,
)

TINY = dict(file_bytes=2 << 20, chunk_sizes=(4096, 65536), threads=(1, 2), seconds_per_cell=0.02)

# FACTS.md's table for this machine kind (GB/s).
FACTS = ProbeResult(table={
    4096: {1: 0.09, 4: 0.21, 16: 0.36, 32: 0.35},
    65536: {1: 0.66, 4: 1.22, 16: 1.42, 32: 1.89},
    1 << 20: {1: 1.93, 4: 2.27, 16: 2.08, 32: 1.80},
})


@pytest.fixture()
def home(tmp_path, monkeypatch):
    h = tmp_path / "home"
    monkeypatch.setenv("MLX_FLASH_HOME", str(h))
    return h


def test_probe_runs_and_cleans_up(tmp_path):
    seen = []
    res = probe_disk(tmp_path, progress=lambda f, m: seen.append(f), **TINY)
    assert set(res.table) == {4096, 65536}
    assert all(set(row) == {1, 2} for row in res.table.values())
    assert all(0 < v < 1000 for row in res.table.values() for v in row.values())
    # sanity: a 64 KiB read moves more bytes per second than a 4 KiB read
    assert res.table[65536][1] > res.table[4096][1]
    if sys.platform.startswith("linux"):
        assert res.mode == "O_DIRECT"
    assert res.file_bytes == 2 << 20 and res.device == tmp_path.stat().st_dev
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
    assert seen[-1] == 1.0 and seen == sorted(seen)
    text = res.format_table()
    lines = text.splitlines()
    assert lines[0] == "| chunk | 1 thread | 2 threads |"
    assert lines[2].startswith("| 4 KiB | ") and lines[3].startswith("| 64 KiB | ")
    assert ProbeResult.from_json(res.to_json()) == res
    chunk, threads = res.choose()
    assert chunk in res.table and threads in (1, 2)
    t, v = res.best(65536)
    assert v == max(res.table[65536].values())


def test_probe_cancel_removes_file(tmp_path):
    with pytest.raises(Cancelled):
        probe_disk(tmp_path, progress=lambda f, m: f < 0.5, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_probe_rejects_bad_parameters(tmp_path):
    with pytest.raises(ValueError):
        probe_disk(tmp_path, chunk_sizes=(1000,), threads=(1,), file_bytes=1 << 20)
    with pytest.raises(ValueError):
        probe_disk(tmp_path, chunk_sizes=(4096,), threads=(0,), file_bytes=1 << 20)
    with pytest.raises(NotADirectoryError):
        probe_disk(tmp_path / "missing", **TINY)


def test_choose_policy_on_facts_table():
    # Over 64 KiB..1 MiB the geometric means are 1: 1.13, 4: 1.66, 16: 1.72, 32: 1.84.
    assert FACTS.choose(min_chunk=64 << 10) == (65536, 32)  # 16 is not within 95% of 32
    # within 90%: the fewest threads, 4, and its fastest chunk, 1 MiB
    assert FACTS.choose(min_chunk=64 << 10, tolerance=0.9) == (1 << 20, 4)
    assert FACTS.best(4096) == (16, 0.36)
    assert FACTS.best(5000) == FACTS.best(4096)  # nearest measured size
    assert ProbeResult(table={}).choose() == DEFAULT_CHOICE
    assert "| 1 MiB | 1.93 | 2.27 | 2.08 | 1.80 |" in FACTS.format_table()


def test_cached_probe_stores_and_reuses(tmp_path, home):
    disk = tmp_path / "disk"
    disk.mkdir()
    assert cached_result(disk) is None
    assert load_cached_choice(disk) == (DEFAULT_CHOICE[1], DEFAULT_CHOICE[0])
    first = cached_probe(disk, **TINY)
    stored = json.loads((home / "probe.json").read_text())
    assert list(stored) == [str(disk.stat().st_dev)]
    again = cached_probe(disk, **TINY)
    assert again == first  # from the file: a new probe would measure different numbers
    chunk, threads = first.choose()
    assert load_cached_choice(disk) == (threads, chunk)
    fresh = cached_probe(disk, refresh=True, **TINY)
    assert cached_result(disk) == fresh
    assert cached_result(disk, max_age_days=30) is not None


def test_cached_probe_expires_and_survives_a_corrupt_file(tmp_path, home):
    disk = tmp_path / "disk"
    disk.mkdir()
    home.mkdir()
    (home / "probe.json").write_text("{broken")
    assert cached_result(disk) is None
    res = cached_probe(disk, **TINY)
    d = json.loads((home / "probe.json").read_text())
    d[str(res.device)]["created"] = "2000-01-01T00:00:00+00:00"
    (home / "probe.json").write_text(json.dumps(d))
    assert cached_result(disk, max_age_days=30) is None
    assert cached_result(disk) is not None  # any age
    newer = cached_probe(disk, max_age_days=30, **TINY)
    assert newer.created != "2000-01-01T00:00:00+00:00"


def test_probe_file_measures_an_existing_file(tmp_path):
    """One probe cell on a given file (a model's ffn.bin) at its reader's alignment: a chunk
    larger than the file reads the whole file; nothing is written or left behind."""
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    before = sorted(tmp_path.iterdir())
    assert probe_file(path, 64 * 1024, 2, seconds=0.05) > 0
    assert probe_file(path, 8 << 20, 1, seconds=0.05) > 0
    assert sorted(tmp_path.iterdir()) == before
