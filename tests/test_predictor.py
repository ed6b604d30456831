"""Low-rank predictors: fitting, Adam refinement, save/load, clear errors, the engine's predictor mode."""

from __future__ import annotations

import os
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.calibrate import calibrate, finetune_bce, fit_low_rank, install_hooks, load_dense_model, weighted_bce
from mlx_flash.config import FlashConfig, format_budget
from mlx_flash.engine import load
from mlx_flash.evaluate import predictor_selector
from mlx_flash.predictor import (
    PREDICTOR_FILE,
    PredictorChooser,
    PredictorError,
    PredictorWeights,
    QuantizedMatrix,
    has_predictors,
    load_predictor_chooser,
    load_predictors,
    predictor_resident_bytes,
    prob_to_logit,
    quantized_bytes,
    save_predictors,
)
from mlx_flash.storage.format import Manifest, open_flash
from mlx_flash.units import fmt_bytes
from tests.tiny import make_tiny_flash

PROMPTS = ["hello there", "tell me a short story", "what is two plus two?", "write a poem about rain",
           "list three colours", "why is the sea salty?", "count to five", "say something kind"]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny float32 flash model, calibrated (a few hundred tokens: fast)."""
    root = tmp_path_factory.mktemp("pred")
    flash = make_tiny_flash(root, layers=3, hidden=64, ffn=256, dtype="float32", seed=5)
    rep = calibrate(flash, sparsity=0.5, rank=16, tokens=480, max_new_tokens=24, prompts=PROMPTS)
    return flash, rep


def _copy(flash, dst):
    shutil.copytree(flash, dst)
    return dst


def test_fit_low_rank_recovers_a_low_rank_map():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 48)).astype(np.float32)
    A0 = rng.normal(size=(48, 6)).astype(np.float32)
    B0 = rng.normal(size=(6, 100)).astype(np.float32)
    t = x @ A0 @ B0 + 0.5 + 0.01 * rng.normal(size=(2000, 100)).astype(np.float32)
    A, B, b = fit_low_rank(mx.array(x), mx.array(t), rank=6, ridge=1e-6)
    pred = np.array((mx.array(x) @ A) @ B + b)
    r2 = 1 - ((pred - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()
    assert r2 > 0.999
    assert A.shape == (48, 6) and B.shape == (6, 100) and b.shape == (100,)
    # asking for more rank than there is input gives the same predictions (zero padding)
    A2, B2, b2 = fit_low_rank(mx.array(x[:, :4]), mx.array(t), rank=8)
    assert A2.shape == (4, 8) and B2.shape == (8, 100)


def test_adam_training_reduces_the_weighted_bce():
    rng = np.random.default_rng(1)
    x = mx.array(rng.normal(size=(1024, 32)).astype(np.float32))
    W = rng.normal(size=(32, 64)).astype(np.float32)
    y = mx.array((np.array(x) @ W + 0.3 * rng.normal(size=(1024, 64))) > 0.5)
    A = mx.array(0.01 * rng.normal(size=(32, 8)).astype(np.float32))
    B = mx.array(0.01 * rng.normal(size=(8, 64)).astype(np.float32))
    b = mx.zeros((64,))
    before = float(weighted_bce((x @ A) @ B + b, y.astype(mx.float32), 4.0).item())
    A, B, b, losses = finetune_bce(A, B, b, x, y, epochs=6, pos_weight=4.0, lr=1e-2)
    after = float(weighted_bce((x @ A) @ B + b, y.astype(mx.float32), 4.0).item())
    assert len(losses) == 6
    assert losses[-1] < losses[0]
    assert after < 0.7 * before


def test_calibration_record_and_file(calibrated):
    flash, rep = calibrated
    files = open_flash(flash)
    info = files.manifest.predictors
    assert has_predictors(files)
    for key in ("rank", "sparsity", "thresholds", "cutoffs", "recall", "train_loss", "val_loss", "held_out",
                "bytes", "calibration", "created", "id"):
        assert key in info, key
    assert info["rank"] == 16 and info["sparsity"] == 0.5
    assert len(info["thresholds"]) == 3 and all(t > 0 for t in info["thresholds"])
    assert set(info["cutoffs"]) == {"0.9", "0.95", "0.99", "0.995", "0.999"}
    assert all(len(v) == 3 for v in info["cutoffs"].values())
    held = info["held_out"]["0.99"]
    assert 0.9 <= held["recall"] <= 1.0 and 0 < held["precision"] <= 1.0
    assert held["predicted_fraction"] >= held["true_fraction"] * 0.9
    assert info["calibration"]["tokens"] == rep.tokens > 0
    assert info["bytes"] == rep.predictor_bytes == load_predictors(
        flash / PREDICTOR_FILE, num_layers=3, hidden_size=64, n_neurons=256).nbytes  # the stored floats
    ch = load_predictor_chooser(files)  # A and B quantized in memory
    assert ch.weights.quantized and ch.resident_bytes == predictor_resident_bytes(files.manifest) < info["bytes"]
    freq = ch.frequencies
    assert freq.shape == (3, 256)
    # the thresholds are the sparsity quantile: about half the neurons active on average
    assert 0.4 < float(freq.mean()) < 0.6


def test_save_load_round_trip_same_predictions(calibrated, tmp_path):
    flash, _ = calibrated
    files = open_flash(flash)
    ch = load_predictor_chooser(files, FlashConfig(predictor_bits=0))  # the stored floats
    assert not ch.weights.quantized
    x = mx.array(np.random.default_rng(2).normal(size=(7, 64)).astype(np.float32))
    for layer in range(3):
        ids, mask = ch.choose(layer, x)
        z = np.array(ch.weights.logits(layer, x))
        want = z > prob_to_logit(ch.cutoffs[layer])
        assert mask is not None and mask.shape == (7, len(ids))
        assert np.array_equal(np.flatnonzero(want.any(axis=0)), ids)
        assert np.array_equal(want[:, ids], mask)
        ids1, mask1 = ch.choose(layer, x[:1])
        assert mask1 is None and np.array_equal(ids1, np.flatnonzero(want[0]))
    # an explicit save / load gives bit-identical weights and predictions
    path = tmp_path / PREDICTOR_FILE
    save_predictors(path, ch.weights, file_id="abc")

    w2 = load_predictors(path, num_layers=3, hidden_size=64, n_neurons=256, file_id="abc")
    ch2 = PredictorChooser(w2, ch.cutoffs)
    for layer in range(3):
        a, b = ch.choose(layer, x), ch2.choose(layer, x)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert np.array_equal(w2.frequencies, ch.frequencies)
    # other recall targets: more recall, more neurons
    n95 = len(load_predictor_chooser(files, FlashConfig(extra={"recall": 0.95})).choose(0, x)[0])
    n999 = len(load_predictor_chooser(files, FlashConfig(extra={"recall": 0.999})).choose(0, x)[0])
    assert n95 <= n999
    with pytest.raises(PredictorError, match="recall 0.5"):
        load_predictor_chooser(files, FlashConfig(extra={"recall": 0.5}))


def test_missing_predictors_are_a_clear_error(calibrated, tmp_path):
    flash, _ = calibrated
    plain = make_tiny_flash(tmp_path / "plain", layers=3, hidden=64, ffn=256, dtype="float32", seed=5)
    with pytest.raises(PredictorError, match="mlx-flash calibrate"):
        load_predictor_chooser(open_flash(plain))
    with pytest.raises(PredictorError, match="mlx-flash calibrate"):
        load(plain, FlashConfig(active="predictor"))
    # "auto" falls back to the oracle without predictors
    eng = load(plain, FlashConfig(scratch_neurons=16, threads=1))
    assert eng.mode == "flash-oracle"
    eng.close()
    # the manifest names predictors but the file is gone
    c = _copy(flash, tmp_path / "gone.flash")
    os.unlink(c / PREDICTOR_FILE)
    with pytest.raises(PredictorError, match=r"predictors\.safetensors is missing.*mlx-flash calibrate"):
        load_predictor_chooser(open_flash(c))


def _rewrite(path, fn):
    arrays, meta = mx.load(str(path), return_metadata=True)
    arrays = fn(dict(arrays))
    mx.save_safetensors(str(path), arrays, metadata=meta)


def test_mismatched_predictor_file_is_a_clear_error(calibrated, tmp_path):
    flash, _ = calibrated
    # one layer too few
    c = _copy(flash, tmp_path / "layers.flash")
    _rewrite(c / PREDICTOR_FILE, lambda a: {k: v for k, v in a.items() if not k.startswith("layers.2.")})
    with pytest.raises(PredictorError, match="predictors for 2 layers, the model has 3 layers"):
        load_predictor_chooser(open_flash(c))
    # wrong hidden size in one layer: the message names the layer and both shapes
    c = _copy(flash, tmp_path / "dims.flash")

    def widen(a):
        a["layers.1.A"] = mx.zeros((65, a["layers.1.A"].shape[1]), dtype=a["layers.1.A"].dtype)
        return a

    _rewrite(c / PREDICTOR_FILE, widen)
    with pytest.raises(PredictorError, match=r"layer 1: predictor A has shape \(65, 16\), expected \(64, 16\)"):
        load_predictor_chooser(open_flash(c))
    # wrong number of neurons
    c = _copy(flash, tmp_path / "n.flash")

    def narrow(a):
        a["layers.0.B"] = a["layers.0.B"][:, :128]
        return a

    _rewrite(c / PREDICTOR_FILE, narrow)
    with pytest.raises(PredictorError, match=r"layer 0: predictor B has shape \(16, 128\), expected \(16, 256\)"):
        load(c, FlashConfig(active="predictor"))
    # a predictor file from another calibration (id differs from the manifest's)
    c = _copy(flash, tmp_path / "id.flash")
    m = Manifest.load(c)
    m.predictors = dict(m.predictors, id="someone-else")
    m.save(c)
    with pytest.raises(PredictorError, match="does not belong to manifest.json"):
        load_predictor_chooser(open_flash(c))
    # garbage file
    c = _copy(flash, tmp_path / "junk.flash")
    (c / PREDICTOR_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(PredictorError, match="cannot read"):
        load_predictor_chooser(open_flash(c))


def test_engine_generates_with_predictors(calibrated):
    flash, _ = calibrated
    cfg = FlashConfig(active="predictor", budget=0.5, window=3, scratch_neurons=32, threads=2)
    eng = load(flash, cfg)
    assert eng.mode == "flash-predictor"
    out = list(eng.stream_generate([{"role": "user", "content": "hello"}], 16))
    assert 1 <= len(out) <= 16 and out[-1].finish_reason in ("stop", "length")
    for r in out:
        assert r.stats.mode == "flash-predictor"
        assert 0 < r.stats.neurons_active <= 3 * 256
    # the predictors count inside the FFN budget, and every screen says so (config.format_budget)
    assert eng.budget_bytes == cfg.budget_bytes(eng.ffn_bytes) - eng.chooser.resident_bytes
    assert eng.predictor_bytes == eng.chooser.resident_bytes > 0
    assert eng.budget_text == format_budget(eng.budget_bytes, eng.predictor_bytes)
    assert eng.budget_text.startswith(fmt_bytes(cfg.budget_bytes(eng.ffn_bytes)) + ": ")
    last = out[-1].stats
    assert (last.budget_bytes, last.predictor_bytes) == (eng.budget_bytes, eng.predictor_bytes)
    assert last.ms_first_token > 0 and all(r.stats.ms_first_token == last.ms_first_token for r in out)
    eng.close()
    # a budget the predictors alone fill up: a clear error naming them
    with pytest.raises(ValueError, match="activation predictors take"):
        load(flash, FlashConfig(active="predictor", budget=0.02, scratch_neurons=8, threads=1))
    # the default ("auto") measures the calibrated choices and records which one runs, and why
    eng = load(flash, FlashConfig(scratch_neurons=32, threads=2))
    assert eng.active_info.asked == "auto" and "predictor" in eng.active_info.candidates
    assert eng.mode == f"flash-{eng.active_info.name}"
    eng.close()


@pytest.mark.parametrize("depth", [1, 2])
def test_pipelined_predictor_equals_serial(calibrated, depth):
    """The predictor's lookahead (started before the layer's own choice) at pipeline depth 1 and 2:
    the same tokens as serial, prefetched neurons used, a recall per layer."""
    flash, _ = calibrated
    runs = {}
    for pipe in (False, True):
        eng = load(flash, FlashConfig(active="predictor", budget=0.4, scratch_neurons=32, threads=2, pipeline=pipe,
                                      pipeline_depth=depth))
        eng.tokenizer.eos_token_ids = []
        out = list(eng.stream_generate([{"role": "user", "content": "tell me a short story"}], 16))
        runs[pipe] = ([r.token for r in out], sum(r.stats.neurons_prefetch_used for r in out), eng.pipeline_info())
        eng.close()
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] > 0 and runs[False][2] is None
    info = runs[True][2]
    assert info["depth"] == depth and 0.0 < info["mean_lookahead_recall"] <= 1.0


def test_engine_predictor_logits_equal_masked_dense(calibrated):
    """evaluate's masked dense FFN computes exactly what the flash engine computes."""
    flash, _ = calibrated
    eng = load(flash, FlashConfig(active="predictor", budget=1.0, engine="flash", scratch_neurons=32, threads=2))
    toks = mx.array([[5, 17, 99, 3, 42, 7, 8, 120, 64, 33]])
    got = np.array(eng.model(toks).astype(mx.float32))
    files = open_flash(flash)
    model = load_dense_model(files, "float32")
    ch = load_predictor_chooser(files)
    sel = predictor_selector(ch)
    install_hooks(model, "silu", lambda layer, x, h: h * sel(layer, x, h).astype(h.dtype))
    want = np.array(model(toks).astype(mx.float32))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    eng.close()


def test_oracle_uses_calibrated_thresholds(calibrated):
    flash, _ = calibrated
    info = open_flash(flash).manifest.predictors
    eng = load(flash, FlashConfig(active="oracle", scratch_neurons=16, threads=1))
    assert eng.chooser.thresholds == info["thresholds"]
    eng.close()
    eng = load(flash, FlashConfig(active="oracle", sparsity=0.3, scratch_neurons=16, threads=1))
    assert eng.chooser.thresholds is None and eng.chooser.sparsity == 0.3
    eng.close()


def test_chooser_weights_shapes():
    w = PredictorWeights([mx.zeros((8, 2), dtype=mx.float16)], [mx.zeros((2, 5), dtype=mx.float16)],
                         [mx.zeros((5,), dtype=mx.float16)])
    assert (w.num_layers, w.hidden_size, w.rank, w.n_neurons) == (1, 8, 2, 5)
    assert w.nbytes == (16 + 10 + 5) * 2
    with pytest.raises(PredictorError):
        PredictorChooser(w, [0.5, 0.5])


def test_quantized_predictors_choose_nearly_the_float_neurons(calibrated):
    """The engine's predictors are quantized at load (4 bits by default, groups of 64 along the input
    side, float32 scales on the CPU): their resident bytes are the packed arrays', they pick nearly the
    float predictors' neurons, and ``choose`` follows their own logits exactly."""
    flash, _ = calibrated
    files = open_flash(flash)
    m = files.manifest
    flt = load_predictor_chooser(files, FlashConfig(predictor_bits=0))
    x = mx.array(np.random.default_rng(3).normal(size=(24, 64)).astype(np.float32))
    for bits, min_jaccard in ((8, 0.97), (4, 0.85)):
        cfg = FlashConfig(predictor_bits=bits)
        ch = load_predictor_chooser(files, cfg)
        w = ch.weights
        # A (64 x 16) in groups of 64 along the hidden size; B of rank 16 divides into no group: stored float16
        assert all(isinstance(a, QuantizedMatrix) and a.shape == (64, 16) and a.bits == bits and a.group_size == 64
                   and a.w.dtype == mx.uint32 and a.scales.dtype == mx.float32 for a in w.A)
        assert all(isinstance(b, mx.array) and b.dtype == mx.float16 for b in w.B)
        a_bytes = 3 * (64 * 16 * bits // 8 + 2 * 16 * 4)  # packed codes, a float32 scale and bias per group
        assert ch.resident_bytes == a_bytes + 3 * (16 * 256 * 2 + 256 * 2 + 256 * 4)  # + B, b, the limits
        assert ch.resident_bytes == predictor_resident_bytes(m, cfg) < flt.resident_bytes
        eng = load(flash, FlashConfig(active="predictor", predictor_bits=bits, scratch_neurons=16,
                                      threads=1))
        assert eng.chooser.weights.quantized and eng.predictor_bytes == ch.resident_bytes
        eng.close()
        inter = union = 0
        for layer in range(3):
            p, q = np.array(flt.predict(layer, x)), np.array(ch.predict(layer, x))
            inter, union = inter + int((p & q).sum()), union + int((p | q).sum())
            # exact: the chooser compares the quantized logits with the same cutoff
            z = np.array(w.logits(layer, x))
            np.testing.assert_array_equal(q, z > prob_to_logit(ch.cutoffs[layer]))
            ids, mask = ch.choose(layer, x)
            assert np.array_equal(ids, np.flatnonzero(q.any(axis=0))) and np.array_equal(mask, q[:, ids])
            # quantized_matmul (one row) and the dequantized batch path agree
            one = np.concatenate([np.array(ch.predict(layer, x[i : i + 1])) for i in range(4)])
            assert (one != q[:4]).mean() < 0.002
        assert union and inter / union >= min_jaccard, (bits, inter / union)
    with pytest.raises(ValueError, match="predictor_bits must be one of"):
        FlashConfig(predictor_bits=3)
    with pytest.raises(PredictorError, match="in-memory"):
        save_predictors(flash / "never.safetensors", ch.weights, file_id="x")


def test_quantized_rank_32_has_per_neuron_groups():
    """Rank 32: B is quantized too, in groups of 32 along the rank (one group per neuron), so a
    permutation of the neurons permutes the quantized predictions exactly (``neuron_order``)."""
    rng = np.random.default_rng(4)
    A = mx.array(rng.normal(size=(2, 128, 32)).astype(np.float16))
    B = mx.array(rng.normal(size=(2, 32, 96)).astype(np.float16))
    b = mx.array(rng.normal(size=(2, 96)).astype(np.float16))
    w = PredictorWeights.from_stacked(A, B, b)
    q = w.quantize(4)
    assert [(m.group_size, m.shape) for m in q.A + q.B] == [(64, (128, 32))] * 2 + [(32, (32, 96))] * 2
    ch = PredictorChooser(q, [0.5, 0.5])
    assert ch.resident_bytes == quantized_bytes(2, 128, 96, 32, mx.float16, 4)
    assert ch.resident_bytes == 2 * (128 * 32 // 2 + 2 * 2 * 32 * 4 + 32 * 96 // 2 + 2 * 96 * 4 + 96 * 6)
    perm = mx.array(rng.permutation(96))
    qp = PredictorWeights([w.A[i] for i in range(2)], [w.B[i][:, perm] for i in range(2)],
                          [w.b[i][perm] for i in range(2)]).quantize(4)
    x = mx.array(rng.normal(size=(5, 128)).astype(np.float32))
    for layer in range(2):
        z, zp = np.array(q.logits(layer, x)), np.array(qp.logits(layer, x))
        np.testing.assert_array_equal(zp, z[:, np.array(perm)])
        assert 0.9 < np.corrcoef(z.ravel(), np.array(w.logits(layer, x)).ravel())[0, 1]
    with pytest.raises(PredictorError, match="already quantized"):
        q.quantize(8)
