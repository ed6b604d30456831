"""Neuron order on disk: orders, the read replay, and reordering a flash folder consistently."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.atomic import clean_stale
from mlx_flash.bench import Shape, format_order, run_order_bench
from mlx_flash.calibrate import calibrate
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.neuron_cache import ReadModel
from mlx_flash.neuron_order import (
    coactivation_order,
    compute_order,
    hot_order,
    inverse,
    order_flash,
    permute_trace,
    reorder_flash,
    replay_reads,
    restore_perms,
    source_perms,
)
from mlx_flash.predictor import load_frequencies, load_predictor_chooser
from mlx_flash.progress import Cancelled
from mlx_flash.storage.format import FlashFormatError, Manifest, neuron_perms, open_flash, verify_checksums
from mlx_flash.traces import Trace
from tests.tiny import make_tiny_flash

PROMPTS = ["hello there", "tell me a short story", "what is two plus two?", "list three colours"]
TOKS = mx.array([[5, 17, 99, 3, 42, 7, 8, 120, 64, 33]])


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny float32 flash model, calibrated (a few hundred tokens: fast)."""
    root = tmp_path_factory.mktemp("order")
    flash = make_tiny_flash(root, layers=3, hidden=64, ffn=256, dtype="float32", seed=7)
    calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS, order=None)
    assert open_flash(flash).manifest.neuron_order is None  # order=None: the source's order
    return flash


def _copy(flash: Path, dst: Path) -> Path:
    shutil.copytree(flash, dst)
    return dst


def _digest(folder: Path) -> dict:
    return {f.name: hashlib.blake2b(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir()) if f.is_file()}


def _logits(flash: Path, **kw) -> np.ndarray:
    eng = load(flash, FlashConfig(engine="flash", scratch_neurons=32, threads=2, **kw))
    try:
        return np.array(eng.model(TOKS).astype(mx.float32))
    finally:
        eng.close()


def _random_perms(files, seed=0) -> np.ndarray:
    m = files.manifest
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(m.intermediate_size) for _ in range(m.num_layers)])


# ----------------------------------------------------------------------------- orders
def test_hot_order_and_inverse():
    f = np.array([0.1, 0.9, 0.5, 0.9])
    assert hot_order(f).tolist() == [1, 3, 2, 0]
    p = np.array([[2, 0, 1], [0, 1, 2]])
    inv = inverse(p)
    assert inv.tolist() == [[1, 2, 0], [0, 1, 2]]
    assert (np.take_along_axis(inv, p, axis=1) == np.arange(3)).all()


def test_coactivation_chain_puts_co_active_neurons_together():
    rng = np.random.default_rng(0)
    n, groups = 60, [np.arange(0, 60, 3), np.arange(1, 60, 3), np.arange(2, 60, 3)]  # interleaved on disk
    active = np.zeros((300, n), dtype=bool)
    for t in range(300):
        active[t, groups[t % 3]] = True  # each token: one group, exactly
    active[rng.random((300, n)) < 0.02] = True  # a little noise
    order = coactivation_order(active)
    assert sorted(order.tolist()) == list(range(n))
    pos = inverse(order[None, :])[0]
    for g in groups:  # each group ends up one contiguous block
        assert pos[g].max() - pos[g].min() == len(g) - 1
    with pytest.raises(ValueError, match="unknown neuron order"):
        compute_order("zigzag", n_layers=1, n_neurons=4)
    with pytest.raises(ValueError, match="frequencies"):
        compute_order("hot", n_layers=1, n_neurons=4)


def test_replay_reads_counts_fewer_requests_when_the_active_set_is_contiguous():
    rng = np.random.default_rng(1)
    n, L = 512, 2
    hot = [rng.choice(n, 96, replace=False) for _ in range(L)]  # always active, scattered on disk
    toks = [[np.sort(np.concatenate([hot[li], rng.choice(np.setdiff1d(np.arange(n), hot[li]), 8, replace=False)]))
             for li in range(L)] for _ in range(40)]
    trace = Trace(L, n, toks)
    freq = np.stack([np.bincount(np.concatenate([t[li] for t in toks]), minlength=n) / 40 for li in range(L)])
    rm = ReadModel(bundle_bytes=1368, alignment=4096, max_gap_bytes=4096, chunk_bytes=1 << 20,
                   scratch_neurons=128)  # overflow read 64 ids at a time (half the scratch)
    before = replay_reads(trace, 32, rm)
    perms = compute_order("hot", n_layers=L, n_neurons=n, frequencies=freq)
    after = replay_reads(trace, 32, rm, perms=perms)
    assert after.active == before.active  # the same neurons, only placed elsewhere
    assert after.requests_per_token < before.requests_per_token / 2
    assert after.bytes_per_token < before.bytes_per_token / 2
    assert after.amplification < before.amplification
    # the trace renumbered for the reordered folder replays exactly like the perms argument
    same = replay_reads(permute_trace(trace, perms), 32, rm)
    assert same.to_dict() == after.to_dict()


# ----------------------------------------------------------------------------- reordering a folder
def test_reorder_keeps_the_model_and_records_the_permutation(calibrated, tmp_path):
    flash = _copy(calibrated, tmp_path / "m.flash")
    files = open_flash(flash)
    old = files.manifest
    perms = _random_perms(files)
    ch0 = load_predictor_chooser(files)
    freq0 = load_frequencies(files)
    reorder_flash(flash, perms, "test")
    files2 = open_flash(flash)
    m = files2.manifest
    # every checksum is valid (what `mlx-flash verify` checks)
    assert "predictors.safetensors" in verify_checksums(files2)
    assert m.neuron_order["method"] == "test" and m.neuron_order["version"] == 1
    assert (neuron_perms(m) == perms).all() and (source_perms(m) == perms).all()
    assert m.predictors["id"] != old.predictors["id"]
    assert [e.offset for e in m.layers] == [e.offset for e in old.layers] and m.ffn_size == old.ffn_size
    # the manifest round-trips the permutation through JSON
    assert (neuron_perms(Manifest.from_json(m.to_json())) == perms).all()
    # frequencies and predictor outputs follow the neurons
    np.testing.assert_array_equal(load_frequencies(files2), np.take_along_axis(freq0, perms, 1))
    ch1 = load_predictor_chooser(files2)
    inv = inverse(perms)
    x = mx.random.normal((4, m.hidden_size), key=mx.random.key(3))
    for layer in range(m.num_layers):
        z0 = np.array(ch0.weights.logits(layer, x))
        z1 = np.array(ch1.weights.logits(layer, x))
        np.testing.assert_allclose(z1, z0[:, perms[layer]], rtol=1e-5, atol=1e-5)
        cut = np.median(z0[0])  # the same active set, modulo the permutation
        assert np.array_equal(np.flatnonzero(z1[0] > cut), np.sort(inv[layer][np.flatnonzero(z0[0] > cut)]))
        ids0, _ = ch0.choose(layer, x[:1])
        ids1, _ = ch1.choose(layer, x[:1])
        assert np.array_equal(np.sort(ids1), np.sort(inv[layer][np.asarray(ids0)]))
    # the engine computes the same function (summation order aside)
    for kw in ({"active": "all", "budget": 0.5}, {"active": "predictor", "budget": 1.0},
               {"active": "oracle", "budget": 0.5}, {"active": "gate", "budget": 1.0},
               {"active": "predictor", "budget": 0.5, "pipeline": True}):
        np.testing.assert_allclose(_logits(flash, **kw), _logits(calibrated, **kw), rtol=1e-4, atol=1e-4)


def test_reorder_twice_composes_and_restore_gives_the_source_bytes_back(calibrated, tmp_path):
    flash = _copy(calibrated, tmp_path / "m.flash")
    before = _digest(flash)
    files = open_flash(flash)
    p1, p2 = _random_perms(files, 1), _random_perms(files, 2)
    reorder_flash(flash, p1, "a")
    reorder_flash(flash, p2, "b")
    m = open_flash(flash).manifest
    assert (neuron_perms(m) == np.take_along_axis(p1, p2, 1)).all()
    reorder_flash(flash, restore_perms(m), "identity")
    m = open_flash(flash).manifest
    assert m.neuron_order is None
    after = _digest(flash)
    assert after["ffn.bin"] == before["ffn.bin"]  # bundle for bundle, the source's file again
    assert [e.checksum for e in m.layers] == [e.checksum for e in open_flash(calibrated).manifest.layers]
    assert set(after) == set(before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries, no lock left


def test_bad_permutations_are_refused_and_change_nothing(calibrated, tmp_path):
    flash = _copy(calibrated, tmp_path / "m.flash")
    before = _digest(flash)
    files = open_flash(flash)
    p = _random_perms(files)
    p[0, 0] = p[0, 1]
    with pytest.raises(ValueError, match="exactly once"):
        reorder_flash(flash, p, "x")
    with pytest.raises(ValueError, match="must be"):
        reorder_flash(flash, p[:, :10], "x")
    assert _digest(flash) == before
    # a manifest whose neuron_order is not a permutation is refused at open
    reorder_flash(flash, _random_perms(files), "x")
    d = Manifest.load(flash).to_dict()
    d["neuron_order"]["layers"][1] = d["neuron_order"]["layers"][0][:8]
    (flash / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(FlashFormatError, match=r"neuron_order.layers\[1\]"):
        open_flash(flash)


def test_cancelled_or_killed_reorder_leaves_the_folder_intact(calibrated, tmp_path):
    flash = _copy(calibrated, tmp_path / "m.flash")
    before = _digest(flash)
    perms = _random_perms(open_flash(flash))
    calls = []

    def cancel_midway(fraction, message):
        calls.append(fraction)
        return fraction < 0.3

    with pytest.raises(Cancelled):
        reorder_flash(flash, perms, "x", progress=cancel_midway)
    assert calls and _digest(flash) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    # killed (no cleanup at all) in the middle of writing ffn.bin
    code = ("import os, sys, numpy as np\n"
            "from mlx_flash.neuron_order import reorder_flash\n"
            "p = np.load(sys.argv[2])\n"
            "def die(f, m):\n"
            "    if f > 0.2: os._exit(9)\n"
            "    return True\n"
            "reorder_flash(sys.argv[1], p, 'x', progress=die)\n")
    np.save(tmp_path / "p.npy", perms)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code, str(flash), str(tmp_path / "p.npy")], env=env, timeout=300)
    assert r.returncode == 9
    assert _digest(flash) == before
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the killed process's temp folder
    clean_stale(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    verify_checksums(open_flash(flash))


def test_order_flash_puts_hot_neurons_first_and_calibration_does_it_by_default(calibrated, tmp_path):
    flash = _copy(calibrated, tmp_path / "m.flash")
    freq = load_frequencies(open_flash(flash))
    want = np.stack([hot_order(f) for f in freq])
    assert order_flash(flash, "hot") == flash
    files = open_flash(flash)
    assert files.manifest.neuron_order["method"] == "hot" and (neuron_perms(files.manifest) == want).all()
    assert (np.diff(load_frequencies(files), axis=1) <= 0).all()  # most frequent first, every layer
    assert order_flash(flash, "hot") is None  # already so: nothing written
    # re-calibrating an ordered folder keeps the map to the source's numbering right
    calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS)
    files = open_flash(flash)
    assert files.manifest.neuron_order["method"] == "hot"
    assert (np.diff(load_frequencies(files), axis=1) <= 0).all()
    # (the same calibration again: the same frequencies, up to a borderline activation or two)
    np.testing.assert_allclose(np.take_along_axis(freq, neuron_perms(files.manifest), 1), load_frequencies(files),
                               atol=0.02)
    assert order_flash(flash, "source") == flash and open_flash(flash).manifest.neuron_order is None
    assert _digest(flash)["ffn.bin"] == _digest(calibrated)["ffn.bin"]


def test_bench_order_section(calibrated, tmp_path):
    flash = _copy(calibrated, tmp_path / "m.flash")
    order_flash(flash, "hot")  # measured from the source's order whatever the folder's order is now
    seen = []
    rep = run_order_bench(flash, tokens=6, shape=Shape("wide", 64, 1024), shape_layers=2,
                          flash_config=FlashConfig(scratch_neurons=16, threads=1),
                          progress=lambda f, m: seen.append(f) or True)
    rows = rep["rows"]
    assert [(r["model"], r["chooser"], r["order"]) for r in rows] == [
        ("default model", "oracle", "source"), ("default model", "oracle", "hot"),
        ("default model", "predictor", "source"), ("default model", "predictor", "hot"),
        ("wide shape", "oracle", "source"), ("wide shape", "oracle", "hot")]
    for a, b in zip(rows[::2], rows[1::2]):  # the same active sets, only placed elsewhere
        assert a["tokens"] == b["tokens"] == 5
        assert a["bytes_per_token"] > 0 and b["bytes_per_token"] > 0
        assert b["amplification"] >= 1.0 and a["amplification"] >= 1.0
    assert seen[-1] == 1.0
    text = "\n".join(format_order(rep))
    assert "| default model | predictor | hot |" in text and "neurons on disk now: hot order" in text
