"""Pipelined layers (mlx_flash.pipeline) on tiny real models: same tokens as serial, real prefetches."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_flash.config import FlashConfig
from mlx_flash.engine import EngineChoice, load
from mlx_flash.pipeline import lookahead_map
from mlx_flash.storage.format import convert_to_flash, open_flash
from mlx_flash.storage.reader import FlashReader
from tests.tiny import make_tiny_flash, make_tiny_llama, quantize_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_flash(tmp_path_factory.mktemp("pipe"), layers=4, hidden=64, ffn=256, dtype="float32", seed=5)


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):  # bfloat16: any change of summation order would show in the tokens
    return make_tiny_flash(tmp_path_factory.mktemp("pipe16"), layers=4, hidden=64, ffn=256, dtype="bfloat16", seed=6)


PROMPT = [{"role": "user", "content": "hello there, how are you"}]


@pytest.mark.parametrize("active,sparsity,budget,bf16,depth", [
    ("oracle", 0.5, 0.3, False, 1), ("all", None, 0.4, False, 1), ("oracle", 0.7, 0.6, False, 1),
    ("oracle", 0.5, 0.3, True, 1), ("all", None, 0.3, True, 1),
    ("oracle", 0.5, 0.3, False, 2), ("oracle", 0.5, 0.3, True, 3), ("all", None, 0.3, True, 2)])
def test_pipelined_tokens_equal_serial(tiny, tiny_bf16, active, sparsity, budget, bf16, depth):
    if bf16:
        tiny = tiny_bf16
    runs = {}
    for pipe in (False, True):
        eng = load(tiny, FlashConfig(active=active, sparsity=sparsity, budget=budget, scratch_neurons=32, threads=2,
                                     pipeline=pipe, pipeline_depth=depth))
        out = list(eng.stream_generate(PROMPT, 20))
        runs[pipe] = ([r.token for r in out], out, eng.pipeline_info(), eng)
        cache = eng.cache
        assert cache.capacity_bytes <= cache.budget_bytes
        eng.close()
    assert runs[True][0] == runs[False][0]
    serial, piped = runs[False][1], runs[True][1]
    assert runs[False][2] is None and all(s.stats.neurons_prefetched == 0 for s in serial)
    assert runs[True][3].cache.staging_neurons > 0
    used = sum(r.stats.neurons_prefetch_used for r in piped)
    assert used > 0
    assert all(r.stats.neurons_prefetch_used <= r.stats.neurons_prefetched for r in piped)
    assert all(0.0 <= r.stats.ms_overlap <= r.stats.ms_prefetch + 1e-9 for r in piped)
    # what the prefetch served was not read again: fewer synchronous loads than serial's misses
    info = runs[True][2]
    assert info["depth"] == depth and len(runs[True][3].cache.staging) == depth + 1
    assert info["lookahead_recall"][0] is None  # layer 0 has no lookahead
    assert all(0.0 <= v <= 1.0 for v in info["lookahead_recall"][1:])
    if active == "all":  # every neuron is chosen: the lookahead is exact
        assert info["mean_lookahead_recall"] == 1.0


def test_pipeline_off_when_everything_fits(tiny):
    eng = load(tiny, FlashConfig(active="all", budget=1.0, threads=2, engine="flash", pipeline=True))
    assert eng.prefetcher is None and eng.cache.staging_neurons == 0
    assert eng.policy_info.pipeline is False
    eng.close()


def test_staging_is_outside_the_budget_and_leaves_the_caches_alone(tiny):
    cfg = dict(active="all", budget=0.3, scratch_neurons=32, threads=2)
    serial, piped = load(tiny, FlashConfig(**cfg, pipeline=False)), load(tiny, FlashConfig(**cfg, pipeline=True))
    cap = serial.cache.layers[0].capacity
    assert piped.cache.layers[0].capacity == cap and piped.cache.staging_neurons == 256 - cap
    assert piped.cache.capacity_bytes == serial.cache.capacity_bytes <= piped.cache.budget_bytes
    assert piped.resident_bytes() == serial.resident_bytes() + piped.cache.staging_bytes
    row = piped.cache.layers[0].bundle_bytes
    assert piped.cache.staging_bytes == 2 * (256 - cap) * row
    deep = load(tiny, FlashConfig(**cfg, pipeline=True, pipeline_depth=3))
    assert deep.cache.staging_bytes == 4 * (256 - cap) * row  # depth + 1 buffers, counted in resident bytes
    assert deep.resident_bytes() == serial.resident_bytes() + deep.cache.staging_bytes
    assert deep.cache.capacity_bytes == serial.cache.capacity_bytes
    for e in (serial, piped, deep):
        e.close()
    with pytest.raises(ValueError, match="pipeline_depth"):
        FlashConfig(pipeline_depth=0)


def test_staged_overflow_is_multiplied_in_place_not_read(tiny):
    """Every neuron active, a small cache: most of each layer streams. With a perfect lookahead the
    prefetch stages all of it, so every missing neuron of layers 1.. (layer 0 has no lookahead) comes
    from a staging buffer (the streamed chunks multiplied there), except, in the first pass, the
    ``capacity`` neurons an empty cache lacks beyond the staging rows; the tokens are serial's."""
    cfg = dict(active="all", budget=0.3, scratch_neurons=32, threads=2)
    runs = {}
    for depth in (0, 1, 2):
        eng = load(tiny, FlashConfig(**cfg, pipeline=depth > 0, pipeline_depth=max(1, depth)))
        out = list(eng.stream_generate(PROMPT, 6))
        pf = eng.prefetcher
        runs[depth] = ([r.token for r in out], out[-1].stats, pf, eng.cache.layers[0].capacity)
        eng.close()
    assert runs[1][0] == runs[0][0] == runs[2][0]
    for depth in (1, 2):
        st, pf, cap = runs[depth][1:]
        assert st.neurons_streamed > 0 and st.neurons_prefetch_used > 0
        assert pf.served[0] == 0 and (pf.served[1:] == pf.needed[1:] - cap).all()


def test_reader_rows_fill_only_the_given_rows(tiny):
    files = open_flash(tiny)
    bb = files.manifest.bundle_bytes
    with FlashReader(files, threads=2, chunk_bytes=8192, direct=False) as rd:
        full = np.zeros((256, bb), dtype=np.uint8)
        rd.read_all(1, full)
        out = np.full((6, bb), 7, dtype=np.uint8)
        rows = np.array([4, 0, 2])
        rd.read(1, np.array([30, 200, 31]), out, rows=rows)
        assert np.array_equal(out[4], full[30]) and np.array_equal(out[0], full[200])
        assert np.array_equal(out[2], full[31])
        assert (out[[1, 3, 5]] == 7).all()
        with pytest.raises(ValueError):
            rd.read(1, np.array([1, 2]), out, rows=np.array([0, 6]))


def test_lookahead_map_moves_between_rms_norms():
    a, b = nn.RMSNorm(16), nn.RMSNorm(16)
    a.weight = mx.random.uniform(0.5, 1.5, (16,))
    b.weight = mx.random.uniform(0.5, 1.5, (16,))
    h = mx.random.normal((3, 16))
    scale, shift = lookahead_map(a, b)
    got = a(h) * scale + shift
    assert np.allclose(np.array(got), np.array(b(h)), atol=1e-5)
    la, lb = nn.LayerNorm(16), nn.LayerNorm(16)
    la.weight, la.bias = mx.random.uniform(0.5, 1.5, (16,)), mx.random.normal((16,))
    lb.weight, lb.bias = mx.random.uniform(0.5, 1.5, (16,)), mx.random.normal((16,))
    scale, shift = lookahead_map(la, lb)
    assert np.allclose(np.array(la(h) * scale + shift), np.array(lb(h)), atol=1e-4)
    assert lookahead_map(None, b) is None


def test_auto_engine_runs_dense_when_the_ffn_fits(tiny):
    dense = load(tiny, FlashConfig(budget=1.0, active="all"))
    assert not dense.is_flash and dense.mode == "dense"
    assert dense.engine_info.engine == "dense" and "fits" in dense.engine_info.reason
    flash = load(tiny, FlashConfig(budget=0.5, active="all", threads=2))
    assert flash.is_flash and flash.engine_info.engine == "flash" and "does not fit" in flash.engine_info.reason
    forced = load(tiny, FlashConfig(budget=1.0, active="all", threads=2, engine="flash"))
    assert forced.is_flash and forced.engine_info == EngineChoice("flash", "flash", "asked for")
    prompt = [{"role": "user", "content": "hi"}]
    assert [r.token for r in dense.stream_generate(prompt, 8)] == [r.token for r in forced.stream_generate(prompt, 8)]
    for e in (dense, flash, forced):
        e.close()
    with pytest.raises(ValueError, match="engine"):
        FlashConfig(engine="fast")


def test_pipelined_quantized_folder_equals_serial(tmp_path):
    """Quantized bundles (packed words, scales, biases per role) are staged and copied like float ones."""
    src = make_tiny_llama(tmp_path / "src", layers=3, hidden=64, ffn=256, dtype="float32", seed=7)
    flash = convert_to_flash(quantize_tiny(src, tmp_path / "q4", bits=4, group_size=32), tmp_path / "q4.flash")
    toks = {}
    for depth in (0, 1, 2):
        eng = load(flash, FlashConfig(active="oracle", sparsity=0.5, budget=0.3, scratch_neurons=32, threads=2,
                                      pipeline=depth > 0, pipeline_depth=max(1, depth)))
        out = list(eng.stream_generate(PROMPT, 12))
        toks[depth] = [r.token for r in out]
        if depth:
            assert sum(r.stats.neurons_prefetch_used for r in out) > 0
        eng.close()
    assert toks[1] == toks[0] == toks[2]
