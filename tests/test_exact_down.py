"""The exact down layout (flash format version 3): a quantized source's down projection is kept as
it is stored, quantized along the FFN dimension: each bundle carries its neuron's codes, the
layer's group scales and biases stay resident (``storage.format.GROUPS_ALONG_FFN``). Tiny llama
models quantized by mlx-lm itself; real files, real MLX."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model

from mlx_flash import sparse_ffn
from mlx_flash.config import FlashConfig, format_budget
from mlx_flash.engine import load
from mlx_flash.neuron_order import reorder_flash
from mlx_flash.quantized import cast_floats
from mlx_flash.sparse_ffn import grouped_down
from mlx_flash.storage.format import (
    FlashFormatError,
    convert_to_flash,
    ffn_groups,
    group_quant_bytes,
    open_flash,
    pack_codes,
    read_layer_weights,
    signed,
    updown_files,
    verify_checksums,
    write_updown,
)
from tests.tiny import make_tiny_llama, quantize_tiny

HIDDEN, FFN, LAYERS = 64, 128, 2
TOKS = mx.array([[5, 17, 99, 3, 42, 7, 8, 120, 33, 2]])


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    root = tmp_path_factory.mktemp("exact")
    src = make_tiny_llama(root / "bf16", layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="bfloat16", seed=7)
    return quantize_tiny(src, root / "q4", bits=4, group_size=32)


@pytest.fixture(scope="module")
def ref_model(q4):
    model, _ = load_model(q4)
    cast_floats(model, mx.float32)  # the CPU compute rule (quantized.compute_dtype)
    return model


def _u(a: mx.array) -> np.ndarray:
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("tokens", [1, 5])
def test_grouped_down_equals_the_dequantized_product(bits, tokens):
    """Rows in any order (a cache's slots), some groups empty, one token (gather_qmm over the
    group grid) or a batch (dequantized rows): the float product with the source's weights."""
    rng = np.random.default_rng(bits + tokens)
    hidden, n, gs = 64, 256, 32
    codes = mx.array(rng.integers(0, 2 ** bits, size=(n, hidden)).astype(np.uint32))
    scales = mx.array(rng.normal(size=(n // gs, hidden)).astype(np.float32)).astype(mx.float16)
    biases = mx.array(rng.normal(size=(n // gs, hidden)).astype(np.float32)).astype(mx.float16)
    ids = rng.permutation(n)[:150]
    ids = ids[ids // gs != 3]  # group 3: no neuron
    groups = ids // gs
    g = mx.array(groups.astype(np.int32))
    rows = mx.take(codes, mx.array(ids), axis=0)
    w = rows.astype(mx.float32) * mx.take(scales, g, axis=0).astype(mx.float32) + \
        mx.take(biases, g, axis=0).astype(mx.float32)
    h = mx.array(rng.normal(size=(tokens, len(ids))).astype(np.float32))
    got = grouped_down(h, pack_codes(rows, bits), groups, scales, biases, {"bits": bits, "group_size": gs},
                       mx.float32)
    assert got.shape == (tokens, hidden)
    assert np.allclose(np.asarray(got), np.asarray(h @ w), atol=1e-4, rtol=1e-4)
    empty = grouped_down(h[:, :0], pack_codes(rows[:0], bits), groups[:0], scales, biases,
                         {"bits": bits, "group_size": gs}, mx.float32)
    assert np.array_equal(np.asarray(empty), np.zeros((tokens, hidden), np.float32))


def test_reorder_keeps_the_exact_weights_and_the_output(q4, ref_model, tmp_path):
    """A neuron reorder moves each bundle (codes) and keeps the group of its source neuron
    (the manifest's permutation): the dequantized down columns are the source's, permuted, bit
    for bit; the flash model still equals mlx-lm's; checksums and the up/down side file follow."""
    dst = convert_to_flash(q4, tmp_path / "r.flash")
    write_updown(open_flash(dst), ["gate", "gate.scales", "gate.biases"])
    perms = np.stack([np.random.default_rng(i).permutation(FFN) for i in range(LAYERS)])
    reorder_flash(dst, perms, "test")
    files = open_flash(dst)
    m = files.manifest
    assert m.format_version == 3 and m.neuron_order is not None
    assert np.array_equal(ffn_groups(m), perms // 32)
    src = mx.load(str(q4 / "model.safetensors"))
    for i in range(LAYERS):
        p = f"model.layers.{i}.mlp.down_proj"
        ref = mx.dequantize(src[p + ".weight"], src[p + ".scales"], src[p + ".biases"], group_size=32, bits=4)
        got = read_layer_weights(files, i)[2]
        assert np.array_equal(_u(got), _u(ref)[:, perms[i]])
    verify_checksums(files)
    assert updown_files(files) is not None  # rewritten with the new order
    for budget in (1.0, 0.4):
        eng = load(dst, FlashConfig(active="all", budget=budget, scratch_neurons=16, threads=2, engine="flash"))
        for toks in (TOKS, TOKS[:, :1]):
            out = np.asarray(eng.model(toks).astype(mx.float32))
            assert np.allclose(out, np.asarray(ref_model(toks).astype(mx.float32)), atol=2e-4, rtol=2e-4)
        eng.close()


def test_masked_prefix_and_gathered_paths(q4, ref_model, tmp_path, monkeypatch):
    """A sparse chooser (the oracle) over the masked resident prefix and over gathered rows (forced
    by the path threshold): every neuron kept (sparsity 0, a mask of ones) both equal mlx-lm's model;
    half the neurons, both give the same output, batch and single tokens (a warm cache)."""
    exact = convert_to_flash(q4, tmp_path / "e.flash")
    outs = {}
    for name, share in (("masked", 0.0), ("gathered", 2.0)):
        monkeypatch.setattr(sparse_ffn, "QUANT_PREFIX_MIN_SHARE", share)
        eng = load(exact, FlashConfig(active="oracle", sparsity=0.0, budget=1.0, threads=2, engine="flash"))
        for toks in (TOKS, TOKS[:, :1]):
            out = np.asarray(eng.model(toks).astype(mx.float32))
            assert np.allclose(out, np.asarray(ref_model(toks).astype(mx.float32)), atol=2e-4, rtol=2e-4), name
        eng.close()
        eng = load(exact, FlashConfig(active="oracle", sparsity=0.5, budget=0.6, threads=2, engine="flash"))
        outs[name] = [np.asarray(eng.model(toks).astype(mx.float32)) for toks in (TOKS, TOKS[:, :1], TOKS[:, 3:4])]
        eng.close()
    for a, b in zip(outs["masked"], outs["gathered"]):
        assert np.allclose(a, b, atol=2e-4, rtol=2e-4)
    assert not np.allclose(outs["masked"][0], np.asarray(ref_model(TOKS).astype(mx.float32)), atol=1e-2)


def test_down_bits_keeps_the_requantized_layout(q4, tmp_path):
    """``down_bits=8``: the version-2 layout (down re-quantized along hidden, no group scales)."""
    m = open_flash(convert_to_flash(q4, tmp_path / "d8.flash", down_bits=8)).manifest
    assert m.format_version == 2 and "axis" not in m.quantization["down"] and ffn_groups(m) is None
    assert m.bundle_bytes == 2 * (HIDDEN // 2 + 2 * 2 * 2) + (HIDDEN + 2 * 2 * 2)


def test_the_exact_layout_needs_version_3(q4, tmp_path):
    """A manifest that claims version 2 for the exact layout is refused, naming the field."""
    dst = convert_to_flash(q4, tmp_path / "v3.flash")
    d = json.loads((dst / "manifest.json").read_text())
    d["format_version"] = 2  # what a mis-written manifest would say
    (dst / "manifest.json").write_text(json.dumps(signed(d)))
    with pytest.raises(FlashFormatError, match="needs format_version 3"):
        open_flash(dst)


def test_group_scales_are_resident_inside_the_budget(q4, tmp_path):
    """The resident group scales are FFN weights: in ``ffn_bytes_total``, taken out of the budget
    before the cache, counted in resident memory, and named in the budget's text."""
    dst = convert_to_flash(q4, tmp_path / "b.flash")
    m = open_flash(dst).manifest
    scales = group_quant_bytes(m)
    assert scales == LAYERS * 2 * (FFN // 32) * HIDDEN * 2
    assert m.ffn_bytes_total == LAYERS * FFN * m.bundle_bytes + scales
    eng = load(dst, FlashConfig(active="all", budget=0.5, threads=2, engine="flash"))
    try:
        assert eng.budget_bytes == int(0.5 * m.ffn_bytes_total) - scales  # the cache's share
        assert eng.group_quant_bytes == scales and eng.resident_bytes() >= eng.dense_bytes + scales
        assert eng.budget_text == format_budget(eng.budget_bytes, 0, scales)
        assert eng.budget_text.endswith("down scales")
    finally:
        eng.close()


def test_one_product_per_layer_equals_the_chunked_products(q4, ref_model, tmp_path, monkeypatch):
    """Every neuron through a small cache: an overflow that fits the scratch buffer is read in one piece
    (or ``STREAM_PIECES`` pieces) and multiplied with the cached rows in one product, one grouped_down
    call per layer; a larger one streams in chunks (one call per chunk). All equal mlx-lm's model; the
    input evaluated first or not (``LAZY_INPUT``) changes no bit."""
    exact = convert_to_flash(q4, tmp_path / "e.flash")
    calls = []

    def counted(*a, **k):
        calls.append(1)
        return grouped_down(*a, **k)

    monkeypatch.setattr(sparse_ffn, "grouped_down", counted)
    outs = {}
    for name, scratch, pieces, lazy in (("chunks", 8, 1, True), ("one", FFN, 1, True), ("two", FFN, 2, True),
                                        ("eager", FFN, 1, False)):
        monkeypatch.setattr(sparse_ffn, "STREAM_PIECES", pieces)
        monkeypatch.setattr(sparse_ffn, "LAZY_INPUT", lazy)
        eng = load(exact, FlashConfig(active="all", budget=0.9, scratch_neurons=scratch, threads=2, engine="flash"))
        rows = eng.cache.scratch.rows
        outs[name] = []
        for toks in (TOKS[:, :1], TOKS, TOKS[:, 3:4]):
            calls.clear()
            streamed = eng.counters.neurons_streamed
            out = np.asarray(eng.model(toks).astype(mx.float32))
            per_layer = (eng.counters.neurons_streamed - streamed) / LAYERS
            assert (per_layer <= rows) == (scratch == FFN) and per_layer > 8
            # one call per layer; else the cached rows' and one per chunk of half the scratch
            assert len(calls) == LAYERS if scratch == FFN else len(calls) >= LAYERS * (1 + per_layer // (rows // 2))
            assert np.allclose(out, np.asarray(ref_model(toks).astype(mx.float32)), atol=2e-4, rtol=2e-4), name
            outs[name].append(out)
        eng.close()
    for a, b, c in zip(outs["one"], outs["eager"], outs["two"]):
        assert np.array_equal(a, b)
        assert np.allclose(a, c, atol=1e-5, rtol=1e-5)  # the same rows, gate/up in two products
