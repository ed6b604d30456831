"""The speed test on a tiny model: every configuration runs, the JSON has every field,
ratios come from the measured rows, plots are written, the large-shape path works at
a tiny shape, traces round-trip."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import bench
from mlx_flash.bench import (
    AUTO,
    DENSE,
    GATE,
    NAIVE,
    ORACLE,
    POLICIES,
    PREDICTOR,
    REAL,
    REPLAYED,
    BenchReport,
    Shape,
    best_policy,
    ensure_shape_model,
    format_table,
    run_bench,
    save_plots,
)
from mlx_flash.bench.order import scaled_sources, shape_hot_order
from mlx_flash.bench.records import read_ms, shape_io_ratios
from mlx_flash.bench.runners import _run_replay
from mlx_flash.calibrate import calibrate
from mlx_flash.cli import _parse_sweep, main
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.neuron_order import hot_order, permute_trace
from mlx_flash.progress import Cancelled
from mlx_flash.quantized import compute_dtype
from mlx_flash.storage.format import ffn_groups, group_quant_bytes, open_flash, read_layer_weights, role_quantization
from mlx_flash.traces import ReplayChooser, Trace, record
from tests.tiny import make_tiny_flash

TINY_SHAPE = Shape("tiny", hidden=256, ffn=1024, dtype="float16")
TINY_GIB = 2 * TINY_SHAPE.layer_bytes / 2**30  # exactly two layers
TOKENS = 6
PROBE_KW = dict(file_bytes=4 << 20, chunk_sizes=(4096, 65536), threads=(1, 2), seconds_per_cell=0.01)

# What the app's speed-test dialog reads from every row.
ROW_FIELDS = ("name", "tokens_per_s", "ms_total", "ms_predictor", "ms_io", "ms_compute", "bytes_read_per_token",
              "bytes_useful_per_token", "hit_rate", "resident_bytes", "peak_memory", "perplexity", "source")
REPORT_FIELDS = ("model", "model_name", "budget", "budget_bytes", "ffn_bytes", "tokens", "warmup", "prompt",
                 "prompt_tokens", "config", "rows", "ratios", "probe", "sweep", "skipped", "notes", "shape",
                 "trace", "machine", "created", "seconds", "perplexity_tokens")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("home")
    old = os.environ.get("MLX_FLASH_HOME")
    os.environ["MLX_FLASH_HOME"] = str(h)
    yield h
    if old is None:
        os.environ.pop("MLX_FLASH_HOME", None)
    else:
        os.environ["MLX_FLASH_HOME"] = old


@pytest.fixture(scope="module")
def tiny(home, tmp_path_factory):
    return make_tiny_flash(tmp_path_factory.mktemp("tiny"), layers=3, hidden=64, ffn=256, seed=1)


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    calls = []

    def progress(fraction, message):
        calls.append((fraction, message))

    root = tmp_path_factory.mktemp("shapes")
    rep = run_bench(tiny, budget=0.5, tokens=TOKENS, progress=progress, sweep=[0.5, 1.0],
                    shape=TINY_SHAPE, shape_gib=TINY_GIB, shape_root=root, ppl_tokens=40,
                    probe=True, probe_kwargs=PROBE_KW,
                    flash_config=FlashConfig(scratch_neurons=16, threads=2, pipeline=True))
    return rep, calls, root


def test_every_configuration_runs(run):
    rep, _, _ = run
    names = [r.name for r in rep.rows]
    # pipelined main rows (asked for here): each flash row has its serial twin beside it
    assert names[:7] == [DENSE, NAIVE, f"{NAIVE} (serial)", ORACLE, f"{ORACLE} (serial)", AUTO, f"{AUTO} (serial)"]
    assert names[7:] == [f"{NAIVE} (tiny shape)", f"{NAIVE} (tiny shape) (serial)", f"{ORACLE} (tiny shape)",
                         f"{ORACLE} (tiny shape) (serial)"]
    # the tiny model has no calibration: predictor and gate-first skipped with a note, not a crash
    assert [s["name"] for s in rep.skipped] == [PREDICTOR, GATE]
    assert "predictor" in rep.skipped[0]["reason"].lower() and "calibrat" in rep.skipped[1]["reason"].lower()
    auto = rep.rows[names.index(AUTO)]  # auto without calibration: the oracle, and it says why
    assert auto.active["name"] == "oracle" and "calibrat" in auto.active["reason"]
    assert auto.active_fraction == pytest.approx(rep.rows[names.index(ORACLE)].active_fraction)
    assert "Active-neuron choice of the auto rows" in format_table(rep)
    for r in rep.rows:
        # warm-up token left out; replayed rows: the trace holds the one-token passes, and the first
        # token is computed with the prompt's last chunk (Engine.generate_step): one token fewer
        assert r.tokens == (TOKENS - 1 if r.source == REAL else TOKENS - 2) and r.warmup_tokens == 1
        assert r.tokens_per_s == pytest.approx(1000.0 / r.ms_total)
        assert r.ms_total == pytest.approx(r.ms_predictor + r.ms_io + r.ms_compute, rel=1e-6, abs=1e-6)
        assert r.peak_memory > 0 and r.resident_bytes > 0
    dense, naive, oracle = (rep.rows[names.index(n)] for n in (DENSE, NAIVE, ORACLE))
    assert dense.source == naive.source == oracle.source == REAL
    assert dense.hit_rate is None and dense.bytes_read_per_token == 0 and dense.io_gbps is None
    assert naive.bytes_read_per_token > 0 and naive.bytes_useful_per_token <= naive.bytes_read_per_token
    assert 0.0 <= naive.hit_rate <= 1.0 and 0.0 <= oracle.hit_rate <= 1.0
    assert oracle.neurons_active_per_token < naive.neurons_active_per_token
    # every neuron active: same function as dense (float16 rounding aside)
    assert naive.perplexity == pytest.approx(dense.perplexity, rel=0.02)
    assert naive.agree_with_dense is not None and oracle.perplexity is not None
    assert rep.prompt_tokens > 0 and rep.perplexity_tokens == 40
    for piped in (naive, oracle):  # pipelined: the same tokens as serial, the overlap counted
        ser = rep.rows[names.index(f"{piped.name} (serial)")]
        assert piped.pipeline and not ser.pipeline and piped.same_as_serial is True
        assert piped.text == ser.text and ser.perplexity == piped.perplexity
        assert 0.0 <= piped.ms_overlap <= piped.ms_prefetch and ser.ms_prefetch == 0.0
        assert piped.lookahead["lookahead_recall"][0] is None
    assert "Pipelined layers vs serial" in format_table(rep)


def test_replayed_rows_are_marked_and_use_the_trace(run):
    rep, _, _ = run
    shape_rows = [r for r in rep.rows if r.source == REPLAYED]
    assert len(shape_rows) == 4
    assert all(r.perplexity is None and r.group == "tiny shape" for r in shape_rows)
    assert rep.shape["hidden"] == 256 and rep.shape["ffn"] == 1024 and rep.shape["layers"] == 2
    naive, naive_s, oracle, oracle_s = shape_rows
    assert naive.pipeline and oracle.pipeline and not naive_s.pipeline and not oracle_s.pipeline
    # the replayed sets are the lookahead's too: foreseen exactly
    assert oracle.lookahead["mean_lookahead_recall"] == 1.0
    assert oracle_s.neurons_active_per_token == oracle.neurons_active_per_token
    assert naive.neurons_active_per_token == 2 * 1024  # every neuron of both layers
    # the replayed oracle uses the recorded sets scaled 4x: same density as the real oracle
    assert oracle.neurons_active_per_token / (2 * 1024) == pytest.approx(1 - rep.shape["scaled_sparsity"], abs=0.1)
    assert rep.trace["tokens"] == TOKENS - 1 and rep.trace["layers"] == 3  # the first token: the prompt's pass
    assert any("replayed traces" in n for n in rep.notes)
    assert "replayed traces" in format_table(rep)


def test_ratios_come_from_the_rows(run):
    rep, _, _ = run
    want = {}
    by_group = {}
    for r in rep.rows:
        by_group.setdefault(r.group, []).append(r)
    for rows in by_group.values():
        for r in rows:
            if r.name.split(" (")[0] not in (ORACLE, PREDICTOR, GATE, AUTO):
                continue
            for b in rows:
                if b.name.split(" (")[0] in (NAIVE, DENSE):
                    want[f"{r.name} / {b.name}"] = r.tokens_per_s / b.tokens_per_s
    # real: oracle, auto and their serial twins x 3 bases; shape: oracle and its twin x 2 naive bases
    assert set(rep.ratios) == set(want) and len(want) == 16
    for k, v in want.items():
        assert rep.ratios[k] == pytest.approx(v)
    assert f"{ORACLE} / {NAIVE}" in rep.ratios and f"{ORACLE} / {DENSE}" in rep.ratios


def test_json_has_every_field_and_round_trips(run, tmp_path):
    rep, _, _ = run
    d = json.loads(rep.to_json())
    for f in REPORT_FIELDS:
        assert f in d, f
    for row in d["rows"]:
        for f in ROW_FIELDS:
            assert f in row, f
    assert set(d["probe"]["table"]) == {"4096", "65536"}
    assert {p["budget"] for p in d["sweep"]} == {0.5, 1.0}
    assert {p["config"] for p in d["sweep"]} == {NAIVE, ORACLE}
    back = BenchReport.from_json(rep.to_json())
    assert [r.to_dict() for r in back.rows] == [r.to_dict() for r in rep.rows]
    assert back.ratios == pytest.approx(rep.ratios)
    assert back.probe.table == rep.probe.table
    assert format_table(back) == format_table(rep)
    p = rep.save_json(tmp_path / "out" / "bench.json")
    assert json.loads(p.read_text())["model_name"] == rep.model_name


def test_io_efficiency_uses_the_probe(run):
    rep, _, _ = run
    flash_rows = [r for r in rep.rows if r.name != DENSE]
    for r in flash_rows:
        assert r.io_gbps and r.io_gbps > 0
        assert r.mean_request_bytes > 0 and r.threads == 2
        nearest = bench._nearest_chunk(rep.probe, r.mean_request_bytes)
        assert r.disk_best_gbps == pytest.approx(max(rep.probe.table[nearest].values()))
        assert r.io_efficiency == pytest.approx(r.io_gbps / r.disk_best_gbps)
        if r.group == "real":  # the disk measured again right after the row, on its own ffn.bin (same load)
            assert r.live_probe_gbps and r.live_probe_gbps > 0
            assert r.reader_of_live_probe == pytest.approx(r.io_gbps / r.live_probe_gbps)
        assert r.reader_split and r.reader_split["syscall_us"] > 0  # where a request's time went


def test_sweep_reuses_and_measures(run):
    rep, _, _ = run
    at_budget = [p for p in rep.sweep if p.budget == 0.5 and p.config == ORACLE][0]
    assert at_budget.tokens_per_s == rep.row(ORACLE).tokens_per_s  # the main run's numbers
    full = [p for p in rep.sweep if p.budget == 1.0]
    assert len(full) == 2 and all(p.error is None for p in full)
    # the whole FFN fits: after the warm-up token nothing is read
    assert all(p.bytes_read_per_token == 0 and p.hit_rate == 1.0 for p in full)


def test_progress_is_monotonic_and_ends_at_one(run):
    _, calls, _ = run
    fr = [f for f, _ in calls]
    assert fr and fr[-1] == 1.0
    assert all(b >= a - 1e-9 for a, b in zip(fr, fr[1:]))


def test_plots_are_written(run, tmp_path):
    rep, _, _ = run
    paths = save_plots(rep, tmp_path / "plots")
    assert {p.name for p in paths} == {"bench_ms_per_token.png", "bench_budget_sweep.png", "bench_probe.png"}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_format_table_mentions_everything(run):
    rep, _, _ = run
    text = format_table(rep)
    for r in rep.rows:
        assert f"| {r.name} |" in text
    assert "Speed ratios" in text and "left out" in text and "Disk probe" in text and "Budget sweep" in text
    assert "skipped" in text


def test_cancel(tiny):
    seen = []

    def progress(fraction, message):
        seen.append(message)
        return len(seen) < 5

    with pytest.raises(Cancelled):
        run_bench(tiny, tokens=8, probe=False, ppl_tokens=0, progress=progress,
                  flash_config=FlashConfig(scratch_neurons=16, threads=2))


def test_bad_arguments(tiny, tmp_path):
    with pytest.raises(ValueError, match="not a flash model"):
        run_bench(tmp_path, probe=False)
    with pytest.raises(ValueError, match="unknown bench configuration"):
        run_bench(tiny, configs=["turbo"], probe=False)
    with pytest.raises(ValueError, match="warmup"):
        run_bench(tiny, tokens=4, warmup=4, probe=False)


def test_subset_of_configs_and_aliases(tiny):
    rep = run_bench(tiny, tokens=3, configs=["oracle", "naive"], probe=False, ppl_tokens=0,
                    flash_config=FlashConfig(scratch_neurons=16, threads=1), pipeline_twins=False)
    assert [r.name for r in rep.rows] == [NAIVE, ORACLE]
    assert rep.probe is None and rep.skipped == []
    assert set(rep.ratios) == {f"{ORACLE} / {NAIVE}"}
    assert all(r.perplexity is None for r in rep.rows)


# ------------------------------------------------------------------ shapes
def test_shape_model_generated_once(run):
    _, _, root = run
    path = ensure_shape_model(TINY_SHAPE, TINY_GIB, root=root)
    ffn = path / "ffn.bin"
    mtime = ffn.stat().st_mtime_ns
    assert ensure_shape_model(TINY_SHAPE, TINY_GIB, root=root) == path
    assert ffn.stat().st_mtime_ns == mtime

    m = open_flash(path).manifest
    assert (m.hidden_size, m.intermediate_size, m.num_layers, m.dtype) == (256, 1024, 2, "float16")
    g, u, d = read_layer_weights(open_flash(path), 1)
    assert g.shape == (1024, 256) and d.shape == (256, 1024)
    std = float(np.array(g).astype(np.float32).std())
    assert 0.5 / 16 < std < 2 / 16  # ~ 1/sqrt(hidden)


def test_layers_for_size():
    s = bench.SHAPES["7b"]  # 4-bit g32 exact layout: gate/up codes + scales + biases, down codes
    assert s.bundle_bytes == 3 * 2048 + 4 * 128 * 2 == 7 * 1024
    assert s.layers_for(2.0) == 27  # 75 MiB a layer
    f16 = bench.SHAPES["7b-f16"]
    assert f16.bundle_bytes == 24 * 1024 and f16.layers_for(2.0) == 7  # 258 MiB a layer
    assert s.layers_for(0.01) == 1


Q_SHAPE = Shape("tq", hidden=256, ffn=1024, bits=4)


def _shape_weights(sp: Shape, layer: int, seed: int = 0):
    """The random float weights ensure_shape_model draws for ``layer`` (same keys)."""
    k = mx.random.split(mx.random.key(seed * 100003 + layer), 3)
    dt = getattr(mx, sp.dtype)
    return (mx.random.normal((sp.ffn, sp.hidden), dtype=dt, key=k[0]) * sp.hidden**-0.5,
            mx.random.normal((sp.ffn, sp.hidden), dtype=dt, key=k[1]) * sp.hidden**-0.5,
            mx.random.normal((sp.hidden, sp.ffn), dtype=dt, key=k[2]) * sp.ffn**-0.5)


def test_quantized_shape_model_is_the_exact_layout(tmp_path):
    gib = 2 * Q_SHAPE.layer_bytes / 2**30
    path = ensure_shape_model(Q_SHAPE, gib, root=tmp_path)
    files = open_flash(path)
    m = files.manifest
    assert (m.num_layers, m.format_version, m.bundle_bytes) == (2, 3, Q_SHAPE.bundle_bytes)
    q = role_quantization(m)
    assert {r: (v["bits"], v["group_size"]) for r, v in q.items()} == {r: (4, 32) for r in ("gate", "up", "down")}
    assert q["down"]["axis"] == "ffn" and ffn_groups(m) is not None and group_quant_bytes(m) > 0
    # what the engine reads back is mx.quantize's dequantized weights, bit for bit
    for got, w in zip(read_layer_weights(files, 1), _shape_weights(Q_SHAPE, 1)):
        want = mx.dequantize(*mx.quantize(w, group_size=32, bits=4), group_size=32, bits=4)
        assert got.shape == want.shape and mx.array_equal(got, want).item()
    mtime = (path / "ffn.bin").stat().st_mtime_ns
    assert ensure_shape_model(Q_SHAPE, gib, root=tmp_path) == path  # reused
    assert (path / "ffn.bin").stat().st_mtime_ns == mtime
    # the float16 shape of the same dimensions is another folder
    assert ensure_shape_model(replace(Q_SHAPE, bits=None), 2 * 1024 * 1536 / 2**30, root=tmp_path) != path


def test_shape_hot_order_bands():
    rng = np.random.default_rng(0)
    src = Trace(3, 128, [[np.flatnonzero(rng.random(128) < 0.5) for _ in range(3)] for _ in range(4)])
    freqs = rng.random((3, 128))
    big = src.scaled(1024, 2, seed=3)
    perms, f = shape_hot_order(src, big, freqs)
    assert perms.shape == (2, 1024) and (np.sort(perms, axis=1) == np.arange(1024)).all()
    sources, copies = scaled_sources(src, big)
    for li, sl in enumerate(big.meta["source_layers"]):
        # band c = every source neuron's c-th copy, in the source's hot order
        assert (copies[li][perms[li]][:128] == 0).all() and (copies[li][perms[li]][896:] == 7).all()
        assert (sources[li][perms[li]][:128] == hot_order(freqs[sl])).all()
        assert np.allclose(f[li], freqs[sl][sources[li][perms[li]]])
        assert (np.diff(f[li][:128]) <= 0).all()
    moved = permute_trace(big, perms)
    assert [len(a) for t in moved.tokens for a in t] == [len(a) for t in big.tokens for a in t]


def test_quantized_shape_replay(tmp_path):
    """naive and oracle rows on a real 4-bit shape folder, serial and pipelined, in hot order,
    under the policy the engine picks; the I/O-only ratios come from their rows."""
    path = ensure_shape_model(Q_SHAPE, 2 * Q_SHAPE.layer_bytes / 2**30, root=tmp_path)
    files = open_flash(path)
    rng = np.random.default_rng(1)
    src = Trace(3, 128, [[np.flatnonzero(rng.random(128) < p) for p in (0.3, 0.4, 0.5)] for _ in range(6)])
    freqs = np.stack([np.mean([np.isin(np.arange(128), t[li]) for t in src.tokens], axis=0) for li in range(3)])
    big = src.scaled(1024, 2)
    perms, f = shape_hot_order(src, big, freqs)
    strace = permute_trace(big, perms)
    rows = []
    for name in (NAIVE, ORACLE):
        for piped in (False, True):
            cfg = FlashConfig(budget=0.5, threads=2, scratch_neurons=16, pipeline=piped)
            r = _run_replay(name + " (tq shape)" + (" (pipelined)" if piped else ""), files, strace, cfg, 6, 1,
                            None, None, frequencies=f)
            r.group = "tq shape"
            rows.append(r)
            assert r.source == REPLAYED and r.pipeline == piped and r.bytes_read_per_token > 0
            assert r.policy["ffn_quantization"] == {"gate": "4b/g32", "up": "4b/g32", "down": "4b/g32"}
            assert r.policy["compute_dtype"] == str(compute_dtype(mx.float16)).rsplit(".", 1)[-1]
            assert r.policy["capacity"] > 0 and r.mean_request_bytes and r.io_gbps
            active = [sum(len(a) for a in t) for t in strace.tokens[1:6]]
            assert r.neurons_active_per_token == (2 * 1024 if name == NAIVE else pytest.approx(np.mean(active)))
    ratios = shape_io_ratios(rows)
    assert set(ratios) == {f"{ORACLE} (tq shape) / {NAIVE} (tq shape)",
                           f"{ORACLE} (tq shape) (pipelined) / {NAIVE} (tq shape) (pipelined)"}
    naive, oracle = rows[0], rows[2]
    d = ratios[f"{ORACLE} (tq shape) / {NAIVE} (tq shape)"]
    assert d["bytes"] == pytest.approx(naive.bytes_read_per_token / oracle.bytes_read_per_token)
    assert d["read_time"] == pytest.approx(read_ms(naive) / read_ms(oracle))
    assert d["total"] == pytest.approx(oracle.tokens_per_s / naive.tokens_per_s)


# ------------------------------------------------------------------ traces
def test_trace_round_trip(tiny, tmp_path):
    eng = load(tiny, FlashConfig(active="oracle", sparsity=0.6, scratch_neurons=16, threads=1))
    eng.tokenizer.eos_token_ids = []
    tr = record(eng, "hello world", 7)
    eng.close()
    assert len(tr) == 7 and tr.n_layers == 3 and tr.n_neurons == 256
    for tok in tr.tokens:
        for ids in tok:
            assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
            assert len(ids) == pytest.approx(0.4 * 256, abs=2)
    p = tr.save(tmp_path / "t" / "trace.npz")
    back = Trace.load(p)
    assert (back.n_layers, back.n_neurons, len(back)) == (3, 256, 7)
    assert back.meta["chooser"] == "oracle" and back.meta["model"] == tiny.name
    for a, b in zip(tr.tokens, back.tokens):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def _random_trace(n_layers=3, n=64, tokens=12, seed=0):
    rng = np.random.default_rng(seed)
    toks = [[np.sort(rng.choice(n, size=rng.integers(5, 30), replace=False)).astype(np.int64)
             for _ in range(n_layers)] for _ in range(tokens)]
    return Trace(n_layers, n, toks)


@pytest.mark.parametrize("mode", ["permuted", "block"])
def test_scaling_keeps_sparsity_and_reuse(mode):
    tr = _random_trace()
    big = tr.scaled(64 * 7, mode=mode, seed=3)  # a whole number of targets per source: exact
    assert big.n_neurons == 448 and big.n_layers == 3 and len(big) == len(tr)
    assert big.density() == pytest.approx(tr.density())
    assert big.reuse(1) == pytest.approx(tr.reuse(1))
    assert big.new_fraction(5) == pytest.approx(tr.new_fraction(5))
    for tok_s, tok_b in zip(tr.tokens, big.tokens):
        for a, b in zip(tok_s, tok_b):
            assert len(b) == 7 * len(a) and len(np.unique(b)) == len(b) and b.max() < 448
    if mode == "block":
        np.testing.assert_array_equal(big.tokens[0][0][:7], np.arange(7) + 7 * tr.tokens[0][0][0])


def test_scaling_uneven_and_layer_mapping():
    tr = _random_trace(n_layers=30, n=1536, tokens=4)
    big = tr.scaled(11008, 7, seed=1)
    assert big.meta["source_layers"] == [0, 5, 10, 14, 19, 24, 29]
    sel = Trace(7, 1536, [[tok[i] for i in big.meta["source_layers"]] for tok in tr.tokens])
    assert big.density() == pytest.approx(sel.density(), rel=0.03)  # groups of 7 or 8: ~exact
    # consistent mapping: a target is active exactly when its source is, so reuse carries over
    assert big.reuse(1) == pytest.approx(sel.reuse(1), abs=0.03)


def test_replay_chooser():
    tr = _random_trace()
    ch = ReplayChooser(tr)
    x = np.zeros((1, 8))
    ch.token = 4
    ids, mask = ch.choose(2, x)
    assert mask is None and ids is tr.tokens[4][2]
    with pytest.raises(ValueError):
        ch.choose(0, np.zeros((2, 8)))


# ------------------------------------------------------------------ CLI
def test_cli_bench(tiny, tmp_path, capsys):
    assert _parse_sweep("10,25,50,75,100") == [0.1, 0.25, 0.5, 0.75, 1.0]
    assert _parse_sweep("10%,0.5") == [0.1, 0.5]
    rc = main(["bench", "--model", str(tiny), "--tokens", "3", "--configs", "dense,naive", "--no-probe",
               "--ppl-tokens", "0", "--json", str(tmp_path / "b.json"), "--plots", str(tmp_path / "plots"),
               "--text", str(tmp_path / "b.md"), "--quiet", "--threads", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| naive flash |" in out
    d = json.loads((tmp_path / "b.json").read_text())
    assert [r["name"] for r in d["rows"]] == [DENSE, NAIVE, f"{NAIVE} (pipelined)"]  # serial main rows by default
    assert "| naive flash (pipelined) |" in out and "Pipelined layers vs serial" in out
    assert (tmp_path / "plots" / "bench_ms_per_token.png").is_file()
    assert (tmp_path / "b.md").read_text().startswith("# mlx-flash bench")


def test_cache_policies_side_by_side(tiny, tmp_path, capsys):
    """The policy comparison on a calibrated tiny model: every policy at every budget, what
    auto ran, the table, the plot, the JSON round trip and the CLI flag."""
    flash = tmp_path / "cal.flash"
    shutil.copytree(tiny, flash)
    calibrate(flash, sparsity=0.5, rank=8, tokens=200, max_new_tokens=8, prompts=["hi", "a story", "cats"])
    rep = run_bench(flash, tokens=5, configs=["naive"], probe=False, ppl_tokens=0, policies=POLICIES,
                    policy_budgets=(0.25, 0.75), policy_active="oracle",
                    flash_config=FlashConfig(scratch_neurons=16, threads=2))
    assert {(p.policy, p.budget) for p in rep.policies} == {(q, b) for q in (*POLICIES, "auto") for b in (0.25, 0.75)}
    assert all(p.error is None for p in rep.policies), [p.error for p in rep.policies]
    for p in rep.policies:
        assert p.hit_rate is not None and 0 <= p.hit_rate <= 1 and p.tokens_per_s > 0
        assert p.resolved in POLICIES
        assert (p.preload_bytes > 0) == (p.resolved in ("hot", "hot+window"))
    auto = [p for p in rep.policies if p.policy == "auto"]
    assert all(p.reason for p in auto)
    text = format_table(rep)
    assert "Cache policies (neuron choice: oracle" in text and "auto at 25% ran" in text
    assert best_policy(rep.policies, 0.25).policy in POLICIES
    back = BenchReport.from_json(rep.to_json())
    assert [p.to_dict() for p in back.policies] == [p.to_dict() for p in rep.policies]
    assert (tmp_path / "plots" / "bench_policies.png") in save_plots(rep, tmp_path / "plots")
    # the CLI flag
    assert main(["bench", "--model", str(flash), "--configs", "naive", "--tokens", "4", "--no-probe",
                 "--ppl-tokens", "0", "--policies", "lru,hot", "--policy-budgets", "50", "-q"]) == 0
    out = capsys.readouterr().out
    assert "Cache policies" in out and "| 50% |" in out
