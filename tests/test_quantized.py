"""Quantized flash (format version 2): mlx-lm 4-/8-bit folders stay quantized on disk,
in the neuron cache and in the FFN. Tiny llama models quantized by mlx-lm itself."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load_model

from mlx_flash.calibrate import calibrate
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.evaluate import evaluate
from mlx_flash.quantized import cast_floats
from mlx_flash.storage.format import (
    DOWN_BITS,
    GROUP_QUANT_PREFIX,
    FlashFormatError,
    bundle_segments,
    convert_to_flash,
    group_quant_bytes,
    group_quant_key,
    open_flash,
    read_layer_segments,
    read_layer_weights,
    unit_dequantize,
)
from tests.tiny import make_tiny_llama, quantize_tiny

HIDDEN, FFN, LAYERS = 64, 128, 2
TOKS = mx.array([[5, 17, 99, 3, 42, 7, 8, 120, 33, 2]])


@pytest.fixture(scope="module")
def src_float(tmp_path_factory):
    root = tmp_path_factory.mktemp("qsrc")
    return make_tiny_llama(root / "bf16", layers=LAYERS, hidden=HIDDEN, ffn=FFN, dtype="bfloat16", seed=4)


@pytest.fixture(scope="module", params=[(4, 32, None), (4, 64, None), (8, 32, None), (8, 64, None), (4, 32, 8)],
                ids=lambda p: f"q{p[0]}g{p[1]}" + (f"-down{p[2]}" if p[2] else ""))
def quant(request, src_float, tmp_path_factory):
    """A quantized source and its flash folder: by default with the exact down layout (the source's
    codes, resident group scales: format version 3); ``-down8``: down re-quantized at 8 bits (version 2)."""
    bits, gs, down_bits = request.param
    root = tmp_path_factory.mktemp(f"q{bits}g{gs}")
    q = quantize_tiny(src_float, root / "mlx", bits=bits, group_size=gs)
    return q, convert_to_flash(q, root / "m.flash", down_bits=down_bits), bits, gs


def _u(a: mx.array) -> np.ndarray:
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def _dense_f32(path):
    """mlx-lm's own model of ``path`` with its floats (scales, norms) in float32."""
    model, _ = load_model(path)
    cast_floats(model, mx.float32)
    return model


def _all_neurons_error(flash, src) -> float:
    """Max |flash - mlx-lm| logit difference with every neuron active, over the max |logit| of
    mlx-lm's own float32-scaled model of the source folder ``src``."""
    eng = load(flash, FlashConfig(active="all", budget=1.0, threads=2, engine="flash"))
    try:
        out = eng.model(TOKS).astype(mx.float32)
    finally:
        eng.close()
    ref = _dense_f32(src)(TOKS).astype(mx.float32)
    return float(mx.max(mx.abs(out - ref)).item()) / float(mx.max(mx.abs(ref)).item())


def _exact(m) -> bool:
    return m.quantization["down"].get("axis") == "ffn"


def test_bundles_keep_the_source_bits(quant):
    q, dst, bits, gs = quant
    files = open_flash(dst)
    m = files.manifest
    assert m.dtype == "bfloat16"
    want = {"bits": bits, "group_size": gs, "mode": "affine"}
    role = HIDDEN * bits // 8 + 2 * (HIDDEN // gs) * 2  # packed words + bf16 scales + bf16 biases
    src = mx.load(str(q / "model.safetensors"))
    for i in range(LAYERS):
        seg = read_layer_segments(files, i)
        for role_name in ("gate", "up"):  # rows copied bit for bit
            p = f"model.layers.{i}.mlp.{role_name}_proj"
            assert np.array_equal(np.asarray(seg[role_name]), np.asarray(src[p + ".weight"]))
            assert np.array_equal(_u(seg[role_name + ".scales"]), _u(src[p + ".scales"]))
            assert np.array_equal(_u(seg[role_name + ".biases"]), _u(src[p + ".biases"]))
    if _exact(m):  # the default: the source's down codes, its group scales resident (in dense.safetensors)
        assert m.format_version == 3
        assert m.quantization == {"gate": want, "up": want, "down": dict(want, axis="ffn")}
        assert m.bundle_bytes == 2 * role + HIDDEN * bits // 8  # down: the codes only
        groups = LAYERS * 2 * (FFN // gs) * HIDDEN * 2
        assert group_quant_bytes(m) == groups and m.ffn_bytes_total == LAYERS * FFN * m.bundle_bytes + groups
        for i in range(LAYERS):
            p = f"model.layers.{i}.mlp.down_proj"
            codes = unit_dequantize(src[p + ".weight"], bits)  # (hidden, ffn): the source's codes
            assert np.array_equal(np.asarray(unit_dequantize(read_layer_segments(files, i)["down"], bits)),
                                  np.asarray(codes.T))
            ref = mx.dequantize(src[p + ".weight"], src[p + ".scales"], src[p + ".biases"], group_size=gs, bits=bits)
            got = read_layer_weights(files, i)[2]
            assert got.dtype == ref.dtype and np.array_equal(_u(got), _u(ref))  # bit for bit
        return
    assert m.format_version == 2
    assert m.quantization == {"gate": want, "up": want, "down": dict(want, bits=DOWN_BITS)}
    down = HIDDEN * DOWN_BITS // 8 + 2 * (HIDDEN // gs) * 2
    assert m.bundle_bytes == 2 * role + down and m.ffn_bytes_total == LAYERS * FFN * m.bundle_bytes
    assert m.layers[1].offset % 4096 == 0
    for i in range(LAYERS):
        seg = read_layer_segments(files, i)
        # down: the source's dequantized columns, re-quantized along hidden: error within one step
        p = f"model.layers.{i}.mlp.down_proj"
        ref = mx.dequantize(src[p + ".weight"], src[p + ".scales"], src[p + ".biases"], group_size=gs,
                            bits=bits).astype(mx.float32)
        assert read_layer_weights(files, i)[2].shape == ref.shape == (HIDDEN, FFN)
        d = mx.dequantize(seg["down"], seg["down.scales"].astype(mx.float32), seg["down.biases"].astype(mx.float32),
                          group_size=gs, bits=DOWN_BITS).T
        step = mx.abs(mx.repeat(seg["down.scales"].astype(mx.float32), gs, axis=1)).T  # (hidden, ffn)
        # within one step (MLX's affine rounding keeps 0 exact: up to ~0.9 step measured), plus the
        # bfloat16 rounding of the stored scale and bias
        bound = step + mx.abs(ref) * 2.0 ** -7 + 1e-6
        err = mx.abs(d - ref)
        assert bool(mx.all(err <= bound).item()), float(mx.max(err / bound).item())


def test_dense_part_unchanged_bitwise(quant):
    q, dst, _, _ = quant
    src = mx.load(str(q / "model.safetensors"))
    dense = mx.load(str(dst / "dense.safetensors"))
    groups = {k: v for k, v in dense.items() if k.startswith(GROUP_QUANT_PREFIX)}
    dense = {k: v for k, v in dense.items() if k not in groups}
    assert set(dense) == {k for k in src if ".mlp." not in k}
    for k, v in dense.items():
        assert v.dtype == src[k].dtype and np.array_equal(_u(v), _u(src[k])), k
    if _exact(open_flash(dst).manifest):  # the down projections' group scales, bit for bit, one row per group
        assert len(groups) == 2 * LAYERS
        for i in range(LAYERS):
            for what in ("scales", "biases"):
                s = src[f"model.layers.{i}.mlp.down_proj.{what}"]
                assert np.array_equal(_u(groups[group_quant_key(i, "down", what)]), _u(s.T))
    else:
        assert not groups
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == quant[2]


def test_all_neurons_match_mlx_lm(quant, tmp_path):
    """Every neuron active: the flash model is mlx-lm's quantized model up to the
    re-quantized down projection; with that one difference put into the reference too
    (its down_proj = the flash down rows), the same math up to float rounding."""
    q, dst, bits, gs = quant
    ref_model = _dense_f32(q)
    files = open_flash(dst)
    if _exact(files.manifest):  # the source's own weights: mlx-lm's model up to float rounding
        for budget in (1.0, 0.4):
            eng = load(dst, FlashConfig(active="all", budget=budget, scratch_neurons=32, threads=2, engine="flash"))
            for toks in (TOKS, TOKS[:, :1]):  # a batch (dequantized rows) and one token (gather_qmm)
                out = np.asarray(eng.model(toks).astype(mx.float32))
                assert np.allclose(out, np.asarray(ref_model(toks).astype(mx.float32)), atol=2e-4, rtol=2e-4)
            eng.close()
        return
    for budget in (1.0, 0.4):
        eng = load(dst, FlashConfig(active="all", budget=budget, scratch_neurons=32, threads=2, engine="flash"))
        assert eng.policy_info.compute_dtype == "float32"  # the CPU rule
        out = eng.model(TOKS).astype(mx.float32)
        ref = ref_model(TOKS).astype(mx.float32)
        # documented tolerance of the re-quantized down (docs/ARCHITECTURE.md): logits move
        # by a few percent of their range on this random model
        scale = float(mx.max(mx.abs(ref)).item())
        assert float(mx.max(mx.abs(out - ref)).item()) < 0.02 * scale
        # identical math: the reference's down_proj is the flash down projection
        same = _dense_f32(q)
        for i, layer in enumerate(same.model.layers):
            lin = nn.Linear(FFN, HIDDEN, bias=False)
            seg = read_layer_segments(files, i)
            lin.weight = mx.dequantize(seg["down"], seg["down.scales"].astype(mx.float32),
                                       seg["down.biases"].astype(mx.float32), group_size=gs, bits=DOWN_BITS).T
            layer.mlp.down_proj = lin
        exact = same(TOKS).astype(mx.float32)
        assert np.allclose(np.asarray(out), np.asarray(exact), atol=2e-4, rtol=2e-4), budget
        # one token: the CPU's quantized_matmul path (batches dequantize: quantized.use_quantized_matmul)
        one = TOKS[:, :1]
        assert np.allclose(np.asarray(eng.model(one).astype(mx.float32)),
                           np.asarray(same(one).astype(mx.float32)), atol=2e-4, rtol=2e-4), budget
        eng.close()


def test_budget_counts_quantized_bytes(quant):
    _, dst, bits, gs = quant
    m = open_flash(dst).manifest
    eng = load(dst, FlashConfig(active="oracle", sparsity=0.5, budget=0.5, scratch_neurons=16, threads=2))
    budget = eng.budget_bytes
    assert budget == int(0.5 * m.ffn_bytes_total) - group_quant_bytes(m)  # the group scales are resident
    assert eng.resident_bytes() >= eng.dense_bytes + group_quant_bytes(m)
    assert eng.cache.bundle_bytes == m.bundle_bytes
    seen = []
    for r in eng.stream_generate("hello there", max_tokens=6):
        assert r.stats.cache_bytes <= budget and r.stats.budget_bytes == budget
        assert r.stats.cache_bytes % m.bundle_bytes == 0
        seen.append(r.stats.bytes_useful)
    assert eng.cache.capacity_bytes <= budget
    assert sum(seen) % m.bundle_bytes == 0 and sum(seen) > 0
    eng.close()


def test_bfloat16_opt_out_dequantizes_the_ffn(quant, tmp_path):
    q, _, _, _ = quant
    files = open_flash(convert_to_flash(q, tmp_path / "f.flash", dtype="bfloat16"))
    assert files.manifest.quantization is None and not files.manifest.quantized
    assert files.manifest.bundle_bytes == 3 * HIDDEN * 2
    eng = load(files.root, FlashConfig(active="all", budget=1.0, threads=2, engine="flash"))
    assert len(eng.generate("hi", 4)) >= 0
    eng.close()


def test_down_bits_option_and_mixed_bits(src_float, tmp_path):
    """``down_bits=4`` keeps a 4-bit source's bits for down (smaller, less exact: within the
    documented tolerance); a mixed-bit mlx-lm recipe (down_proj at 8, the rest at 4) gives per-role bits."""
    q4 = quantize_tiny(src_float, tmp_path / "q4", bits=4, group_size=32)
    d4 = convert_to_flash(q4, tmp_path / "d4.flash", down_bits=4)
    m = open_flash(d4).manifest
    assert m.quantization["down"]["bits"] == 4 and m.quantization["gate"]["bits"] == 4
    assert m.bundle_bytes == 3 * (HIDDEN // 2 + 2 * (HIDDEN // 32) * 2)
    assert _all_neurons_error(d4, q4) < 0.08

    def pred(path, module):
        return {"group_size": 32, "bits": 8} if path.endswith("down_proj") else True

    mixed = quantize_tiny(src_float, tmp_path / "mixed", bits=4, group_size=32, quant_predicate=pred)
    dst = convert_to_flash(mixed, tmp_path / "mixed.flash")
    mm = open_flash(dst).manifest
    assert [mm.quantization[r]["bits"] for r in ("gate", "up", "down")] == [4, 4, 8]
    assert [s[0] for s in bundle_segments(mm)][:3] == ["gate", "gate.scales", "gate.biases"]
    assert _all_neurons_error(dst, mixed) < 0.02


def test_version_1_folder_still_loads_and_generates(src_float, tmp_path):
    """A float folder written by format version 1 (same bytes, version 1 manifest)."""
    dst = convert_to_flash(src_float, tmp_path / "v1.flash")
    d = json.loads((dst / "manifest.json").read_text())
    assert d["quantization"] is None
    d["format_version"] = 1
    del d["quantization"]
    del d["manifest_checksum"]  # version 1 wrote none
    (dst / "manifest.json").write_text(json.dumps(d))
    m = open_flash(dst).manifest
    assert m.format_version == 1 and not m.quantized
    eng = load(dst, FlashConfig(active="all", budget=0.5, threads=2))
    a = eng.generate("hello", 5)
    dense = load(src_float)
    assert a == dense.generate("hello", 5)
    eng.close()
    d["quantization"] = {"gate": "none", "up": "none", "down": "none"}
    (dst / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(FlashFormatError, match="format_version 2"):
        open_flash(dst)


def test_dense_load_keeps_the_ffn_quantized(quant):
    """``load(flash, dense=True)`` on a quantized folder: the dense quantized model (bundles
    in memory as stored), the same arithmetic as every neuron through the flash FFN."""
    _, dst, bits, _ = quant
    d = load(dst, dense=True)
    f = load(dst, FlashConfig(active="all", budget=1.0, threads=2, engine="flash"))
    assert np.array_equal(np.asarray(d.model(TOKS)), np.asarray(f.model(TOKS)))
    ffn_params = LAYERS * FFN * 3 * HIDDEN
    assert d.dense_bytes - f.dense_bytes < ffn_params * 2  # the FFN in memory is not float weights
    f.close()


def test_calibrate_evaluate_and_predictor_on_a_quantized_folder(src_float, tmp_path):
    """Calibration and evaluation see the quantized model dequantized (read_layer_weights,
    load_dense_weights(dequantize=True)); the predictor-driven engine then runs quantized."""
    flash = convert_to_flash(quantize_tiny(src_float, tmp_path / "q", bits=4, group_size=32), tmp_path / "c.flash")
    calibrate(flash, sparsity=0.5, rank=8, tokens=150, max_new_tokens=8, prompts=["Hello there", "A short story"])
    eng = load(flash, FlashConfig(active="predictor", budget=0.6, threads=2))
    assert eng.chooser.name == "predictor"
    assert len(list(eng.stream_generate("hello", max_tokens=4))) == 4
    eng.close()
    eng = load(flash, FlashConfig(active="gate", budget=0.6, threads=2))  # calibrated gate thresholds, packed rows
    assert eng.chooser.sparsity is not None and eng.chooser.gates[0]["gate"].dtype == mx.uint32
    assert len(list(eng.stream_generate("hello", max_tokens=4))) == 4
    eng.close()
    text = tmp_path / "t.txt"
    text.write_text("Hello world, this is a short text about nothing in particular. " * 20)
    rep = evaluate(flash, text=text, tokens=120, chunk=60)
    assert rep.modes["dense"].perplexity > 0 and rep.modes["predictor"].perplexity > 0
