"""Gate-first choice (mlx_flash/gate_first.py) on tiny real models: exactness at threshold 0,
the chosen set against the gate computed directly, budget accounting of the resident gate rows,
quantized gate rows, and FlashConfig.active = "auto" recording its choice."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_flash.calibrate import calibrate
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load, predictor_left_out
from mlx_flash.gate_first import GATE_SEGMENTS, GateFirst
from mlx_flash.neuron_cache import CachePolicy
from mlx_flash.predictor import load_gate_scales
from mlx_flash.storage.format import (
    DENSE_FILE,
    UPDOWN_FILE,
    ChecksumError,
    LayerHasher,
    Manifest,
    bundle_segments,
    convert_to_flash,
    open_flash,
    read_layer_segments,
    read_layer_weights,
    updown_files,
    updown_segments,
    verify_checksums,
    write_updown,
)
from mlx_flash.storage.reader import FlashReader
from mlx_flash.storage.verify import BackgroundVerifier
from tests.tiny import make_tiny_flash, make_tiny_llama, quantize_tiny

LAYERS, HIDDEN, FFN = 2, 64, 128
TOKS = mx.array([[5, 17, 99, 3, 42, 7, 8, 120, 33, 2]])
PROMPTS = ["hi", "what is the time?", "tell me about cats", "please help me", "a story", "the end"]


def _with_gate_thresholds(flash: Path, thresholds) -> Path:
    """Give a flash folder a gate-first record (as calibration writes it) with these thresholds."""
    m = Manifest.load(flash)
    m.predictors = {"gate_first": {"thresholds": {"0.5": list(thresholds)}, "sparsity": 0.5,
                                   "held_out": {"0.5": {"active_fraction": 0.5, "rel_error": 0.0}}}}
    m.save(flash)
    return flash


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    return make_tiny_flash(root, layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="float32", seed=5)


def _logits(flash, active, budget=1.0):
    e = load(flash, FlashConfig(active=active, budget=budget, engine="flash"))
    try:
        out = e.model(TOKS)
        step = e.model(TOKS[:, :1])  # one token: the single-token path (no per-token mask)
        mx.eval(out, step)
        return np.array(out), np.array(step), e.mode
    finally:
        e.close()


def test_threshold_zero_equals_all_neurons_exactly(tiny):
    _with_gate_thresholds(tiny, [0.0] * LAYERS)
    want, want1, _ = _logits(tiny, "all")
    got, got1, mode = _logits(tiny, "gate")
    assert mode == "flash-gate"
    assert np.array_equal(got, want) and np.array_equal(got1, want1)


def test_chosen_set_is_the_gate_rule(tiny):
    thr = [0.2, 0.3]
    ch = GateFirst([{k: v for k, v in read_layer_segments(open_flash(tiny), i).items() if k in GATE_SEGMENTS}
                    for i in range(LAYERS)], thr)
    x = mx.random.normal((3, HIDDEN), key=mx.random.key(1))
    for layer in range(LAYERS):
        gate = read_layer_weights(open_flash(tiny), layer)[0]
        a = np.abs(np.array(nn.silu(x @ gate.T)))
        want = a > thr[layer]
        ids, mask = ch.choose(layer, x)
        assert np.array_equal(ids, np.flatnonzero(want.any(axis=0)))
        assert np.array_equal(mask, want[:, ids])
        assert 0 < want.sum() < want.size
        ids1, none = ch.choose(layer, x[:1])
        assert none is None and np.array_equal(ids1, np.flatnonzero(want[0]))
        assert np.array_equal(np.array(ch.gate(layer)), np.array(x[:1] @ gate.T))  # what the FFN reuses


def test_budget_counts_the_resident_gate_rows(tiny):
    _with_gate_thresholds(tiny, [0.05, 0.05])
    e = load(tiny, FlashConfig(active="gate", budget=0.6))
    try:
        m = e.files.manifest
        gate_bytes = LAYERS * FFN * HIDDEN * 4  # float32 gate rows
        assert e.chooser.resident_bytes == gate_bytes
        budget = FlashConfig(budget=0.6).budget_bytes(m.ffn_bytes_total)
        assert e.cache.capacity_bytes + gate_bytes <= budget
        layer = e.cache.layers[0]
        assert "gate" not in layer.rows.mats and layer.bundle_bytes == 2 * HIDDEN * 4  # up + down rows only
        assert e.resident_bytes() >= e.dense_bytes + gate_bytes
        before = e.counters.bytes_useful
        list(e.stream_generate("hello there", 4))
        c = e.counters
        assert c.bytes_useful > before and c.bytes_read >= c.bytes_useful
    finally:
        e.close()


def test_quantized_gate_rows_threshold_zero_equals_all(tmp_path):
    src = make_tiny_llama(tmp_path / "bf16", layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="bfloat16", seed=4)

    flash = convert_to_flash(quantize_tiny(src, tmp_path / "q", bits=4, group_size=32), tmp_path / "q.flash")
    _with_gate_thresholds(flash, [0.0] * LAYERS)
    want, _, _ = _logits(flash, "all")
    got, _, _ = _logits(flash, "gate")
    assert np.array_equal(got, want)
    e = load(flash, FlashConfig(active="gate"))
    try:
        assert set(e.chooser.gates[0]) == {"gate", "gate.scales", "gate.biases"}
        assert e.chooser.gates[0]["gate"].dtype == mx.uint32  # packed as stored
    finally:
        e.close()


def test_auto_records_its_measured_choice(tmp_path):
    flash = make_tiny_flash(tmp_path, layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="float32", seed=11)
    rep = calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=PROMPTS)
    assert all(len(v) == LAYERS for v in rep.per_layer.values()) and set(rep.per_layer) == {
        "recall", "precision", "predicted_fraction"}
    assert "gate-first" in rep.summary() and "layer  1:" in rep.summary()
    rec = Manifest.load(flash).predictors["gate_first"]
    assert rec["oracle_rel_error"] >= 0 and set(rec["predictor_rel_error"]) == {"0.99"}
    assert rec["sparsity"] in [float(k) for k in rec["thresholds"]]
    assert all(len(v) == LAYERS for v in rec["thresholds"].values())
    fr = [rec["held_out"][k]["active_fraction"] for k in sorted(rec["held_out"], key=float)]
    assert fr == sorted(fr, reverse=True)  # more sparsity, fewer neurons
    # the scaled criterion's per-neuron scales are in the predictor file; the sparsity is chosen by
    # held-out perplexity (binary search: the chosen one and the ones it tried are recorded)

    assert rec["criterion"] == "scaled"
    sc = load_gate_scales(open_flash(flash))
    assert sc.shape == (LAYERS, FFN) and (sc > 0).all()
    ppl = rec["perplexity"]
    assert ppl["dense"] > 1 and str(rec["sparsity"]) in ppl["gate"] and rec["why"]
    assert ppl["passed"] == (ppl["gate"][str(rec["sparsity"])] <= ppl["dense"] * (1 + ppl["tolerance"]))
    assert (updown_files(open_flash(flash)) is not None) == ppl["passed"]  # the side file only when it passed
    # the predictors' held-out perplexity at the shipped recall, against the same dense figure
    pp = Manifest.load(flash).predictors["perplexity"]
    assert pp["dense"] == ppl["dense"] and set(pp["predictor"]) == {"0.99"}
    assert pp["passed"] == (pp["predictor"]["0.99"] <= pp["dense"] * (1 + pp["tolerance"]))
    assert rep.perplexity == pp and "predictors at recall 0.99: held-out perplexity" in rep.summary()
    e = load(flash, FlashConfig(active="auto", budget=0.7))
    try:
        info = e.active_info
        assert info.asked == "auto" and e.chooser.name == info.name
        cands = info.candidates
        assert "all" in cands and info.reason
        if pp["passed"]:
            assert "held-out perplexity" in cands["predictor"].quality
        else:
            assert "predictor" not in cands and "predictor left out: held-out perplexity" in info.reason
        assert info.name == min(cands, key=lambda k: (cands[k].bytes_per_token, k != "all"))
        if ppl["passed"]:  # admitted by its measured quality, which the record says
            assert "perplexity" in cands["gate"].quality
        else:
            assert "gate" not in cands and "gate-first left out: held-out perplexity" in info.reason
        # each candidate was simulated with the cache policy that would run for it: the winner's is the one
        # the engine then resolved and runs
        ran = e.policy_info
        assert cands[info.name].policy == CachePolicy(ran.name, ran.hot_fraction)
        # the JSON record (bench rows) keeps the dict's keys
        d = info.to_dict()
        assert {"asked", "name", "reason", "candidates"} <= set(d)
        assert d["candidates"][info.name]["policy"] == {"name": ran.name, "hot_fraction": ran.hot_fraction}
        assert {"density", "recall", "resident_bytes", "row_bytes", "quality", "capacity",
                "bytes_per_token"} <= set(d["candidates"]["all"])
    finally:
        e.close()
    e = load(flash, FlashConfig(active="auto", budget=0.7, policy="lru"))
    try:
        assert {c.policy.name for c in e.active_info.candidates.values()} == {"lru"}
        assert "lru)" in e.active_info.reason
    finally:
        e.close()


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_pipelined_gate_first_equals_serial(tmp_path, quantized):
    """Pipelined layers stage whole on-disk bundles (gate bytes included) while the gate-first
    cache keeps up/down rows only: the same tokens as serial layers, prefetched bundles used."""
    src = make_tiny_llama(tmp_path / "src", layers=3, hidden=HIDDEN, ffn=FFN, dtype="float32", seed=7)
    if quantized:
        src = quantize_tiny(src, tmp_path / "q4")

    flash = _with_gate_thresholds(convert_to_flash(src, tmp_path / "m.flash"), [0.05] * 3)
    runs = {}
    for pipeline in (False, True):
        # 0.5: the 4-bit folder's resident down group scales take a large share of a tiny model's budget
        e = load(flash, FlashConfig(active="gate", budget=0.5, scratch_neurons=16, threads=2, pipeline=pipeline))
        try:
            assert e.mode == "flash-gate" and (e.prefetcher is not None) == pipeline
            rs = list(e.stream_generate("hello there", 8))
            runs[pipeline] = ([r.token for r in rs], sum(r.stats.neurons_prefetch_used for r in rs))
        finally:
            e.close()
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] > 0 and runs[False][1] == 0


@pytest.mark.parametrize("max_gap", [0, 16384, 1 << 20])
def test_pipelined_gate_first_reads_serial_bytes_plus_unused_prefetch(tmp_path, max_gap):
    """With the up/down side file the prefetch stages up/down rows from it (not whole ffn.bin
    bundles), and the neurons in its coalesced gaps too (``FlashReader.covered``): pipelined layers
    read no more than serial's bytes plus the prefetched rows no layer used. 4096-byte rows: no
    alignment padding (gap 0: every read exact, the bound is met with equality)."""
    src = make_tiny_llama(tmp_path / "src", layers=3, hidden=512, ffn=FFN, dtype="float32", seed=7)
    flash = _with_gate_thresholds(convert_to_flash(src, tmp_path / "m.flash"), [0.05] * 3)
    write_updown(open_flash(flash), GATE_SEGMENTS)
    runs = {}
    for pipeline in (False, True):
        e = load(flash, FlashConfig(active="gate", budget=0.4, scratch_neurons=16, threads=2, max_gap_bytes=max_gap,
                                    pipeline=pipeline))
        try:
            row = e.cache.layers[0].bundle_bytes
            assert e.reader.files.manifest.ffn_file == UPDOWN_FILE and row == 4096
            assert row % e.reader.alignment == 0 and (e.prefetcher is not None) == pipeline
            rs = list(e.stream_generate("hello there", 8))
            runs[pipeline] = ([r.token for r in rs], {k: sum(getattr(r.stats, k) for r in rs) for k in
                              ("bytes_read", "bytes_useful", "neurons_prefetched", "neurons_prefetch_used")})
            if pipeline:
                assert e.cache.staging[0].bundle_bytes == e.cache.staging[0].kept_bytes == row  # side-file rows
                info = e.pipeline_info()
                assert 0.0 < info["mean_lookahead_recall"] <= 1.0
        finally:
            e.close()
    (serial_toks, serial), (piped_toks, piped) = runs[False], runs[True]
    assert piped_toks == serial_toks
    assert piped["neurons_prefetch_used"] > 0 and serial["neurons_prefetched"] == 0
    assert piped["bytes_useful"] == serial["bytes_useful"]
    unused = (piped["neurons_prefetched"] - piped["neurons_prefetch_used"]) * row
    assert piped["bytes_read"] <= serial["bytes_read"] + unused, (piped, serial)


def test_scaled_rule_is_gate_times_scale(tiny):
    """The calibrated criterion: |silu(gate x)| * per-neuron scale > threshold; scales count as resident."""
    files = open_flash(tiny)
    gates = [{k: v for k, v in read_layer_segments(files, i).items() if k in GATE_SEGMENTS} for i in range(LAYERS)]
    rng = np.random.default_rng(3)
    scales = [rng.uniform(0.1, 3.0, FFN).astype(np.float32) for _ in range(LAYERS)]
    thr = [0.2, 0.3]
    plain, scaled = GateFirst(gates, thr), GateFirst(gates, thr, scales=scales)
    assert scaled.resident_bytes == plain.resident_bytes + LAYERS * FFN * 4
    x = mx.random.normal((4, HIDDEN), key=mx.random.key(2))
    for layer in range(LAYERS):
        gate = read_layer_weights(files, layer)[0]
        want = np.abs(np.array(nn.silu(x @ gate.T))) * scales[layer] > thr[layer]
        ids, mask = scaled.choose(layer, x)
        assert np.array_equal(ids, np.flatnonzero(want.any(axis=0))) and np.array_equal(mask, want[:, ids])
        assert not np.array_equal(ids, plain.choose(layer, x)[0])  # the scales change the choice


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "4-bit"])
def test_updown_side_file_reads_back_the_exact_bytes(tmp_path, quantized):
    src = make_tiny_llama(tmp_path / "src", layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="float32", seed=9)
    if quantized:
        src = quantize_tiny(src, tmp_path / "q4")
    flash = convert_to_flash(src, tmp_path / "m.flash")
    files = open_flash(flash)
    assert updown_files(files) is None  # a folder without the side file (older folders) loads as before
    write_updown(files, GATE_SEGMENTS)
    files = open_flash(flash)  # the manifest keeps the old fields and gains the side file's record
    split = updown_files(files)
    m = files.manifest
    keep = [(a, b) for n, a, b, _ in bundle_segments(m) if n not in GATE_SEGMENTS]
    row = sum(b - a for a, b in keep)
    assert split.manifest.bundle_bytes == row < m.bundle_bytes and split.ffn_path.name == UPDOWN_FILE
    assert [n for n, *_ in updown_segments(m, GATE_SEGMENTS)] == [n for n, *_ in bundle_segments(m)
                                                                  if n not in GATE_SEGMENTS]
    ids = np.array([0, 3, 4, 77, FFN - 1])
    with FlashReader(files, threads=2, direct=False) as full, FlashReader(split, threads=2, direct=False) as ud:
        for layer in range(LAYERS):
            a = np.zeros((len(ids), m.bundle_bytes), np.uint8)
            b = np.zeros((len(ids), row), np.uint8)
            full.read(layer, ids, a)
            st = ud.read(layer, ids, b)
            assert np.array_equal(b, np.concatenate([a[:, x:y] for x, y in keep], axis=1))
            assert st.bytes_useful == len(ids) * row

    with LayerHasher(split, direct=False) as h:
        for layer in range(LAYERS):
            h.verify(layer)
    v = BackgroundVerifier(files, direct=False, start=False, side_files=(DENSE_FILE,))
    assert v.hashed == [] and not v.finished  # nothing is hashed before the engine says which file it reads
    v.start(split)
    v.wait()
    assert v.hashed == [DENSE_FILE, UPDOWN_FILE]
    v.close()

    assert f"{UPDOWN_FILE} ({LAYERS} layers)" in verify_checksums(files)  # `mlx-flash verify` checks it too
    with open(split.ffn_path, "r+b") as f:  # one flipped byte in layer 1's region
        f.seek(split.manifest.layers[1].offset + 5)
        byte = f.read(1)
        f.seek(split.manifest.layers[1].offset + 5)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumError, match="layer 1"):
        verify_checksums(files)
    v = BackgroundVerifier(files, direct=False, start=False)
    v.start(split)
    with pytest.raises(ChecksumError, match="layer 1"):  # the side file, when read, is verified before trusted
        v.wait()
    v.close()
    # written from other ffn.bin contents (stale): ignored
    man = Manifest.load(flash)
    man.extra["updown"]["source_checksums"][0] = "0" * 128
    man.save(flash)
    assert updown_files(open_flash(flash)) is None


def test_gate_first_with_the_side_file_equals_without(tmp_path):
    """Reading up/down rows from the side file changes the bytes read, not the tokens; the
    load's verifier hashes the file the cache reads (not ffn.bin too, then the side file)."""
    src = quantize_tiny(make_tiny_llama(tmp_path / "src", layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="float32",
                                        seed=6), tmp_path / "q4")
    flash = _with_gate_thresholds(convert_to_flash(src, tmp_path / "m.flash"), [0.05] * LAYERS)
    runs = {}
    for split in (False, True):
        if split:
            write_updown(open_flash(flash), GATE_SEGMENTS)
        e = load(flash, FlashConfig(active="gate", budget=0.5, scratch_neurons=16, threads=2))
        try:
            assert any("ffn_updown.bin" in n for n in e.notes) == split
            e.verifier.wait()  # only the files the load reads are hashed: the side file instead of ffn.bin
            assert e.verifier.hashed == ["dense.safetensors", "ffn_updown.bin" if split else "ffn.bin"]
            rs = list(e.stream_generate("hello there", 6))
            c = e.counters
            m = e.files.manifest
            budget = FlashConfig(budget=0.5).budget_bytes(m.ffn_bytes_total)
            assert e.cache.capacity_bytes + e.chooser.resident_bytes <= budget  # never over the budget
            assert c.bytes_useful > 0
            runs[split] = ([r.token for r in rs], e.reader.bundle_bytes)
        finally:
            e.close()
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < runs[False][1]  # a miss reads up/down bytes only


def test_predictor_left_out_by_its_measured_perplexity():
    rec = {"perplexity": {"dense": 10.0, "tolerance": 0.005, "predictor": {"0.99": 10.04}}}
    assert predictor_left_out(rec, 0.99) is None  # +0.4%: within 0.5%
    rec["perplexity"]["predictor"]["0.99"] = 10.2
    assert "+2.0% vs dense 10.000" in predictor_left_out(rec, 0.99)
    assert predictor_left_out(rec, 0.95) is None  # not measured at that recall: admitted by recall
    assert predictor_left_out({}, 0.99) is None  # older calibrations: as before
