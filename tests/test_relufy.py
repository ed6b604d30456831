"""ReLU-fication (mlx_flash.relufy) on a tiny SwiGLU model: runs, resumes, cancels cleanly,
and its output is an exactly sparse ReLU flash model that loads and generates."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.cli import main
from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.progress import Cancelled
from mlx_flash.relufy import RelufySettings, default_work_dir, relufy
from mlx_flash.storage.format import open_flash
from tests.tiny import make_tiny_flash

FAST = dict(tokens=1024, seq_len=64, steps=20, batch=256, max_new=16, sparsity=0.7, e2e_steps=5)
TOKENS = [5, 17, 99, 3, 42, 7, 8, 120, 64, 33]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_flash(tmp_path_factory.mktemp("relufy"), layers=3, hidden=64, ffn=256, dtype="float32", seed=5)


@pytest.fixture(scope="module")
def full_run(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("full") / "relu.flash"
    rep = relufy(src, dst, **FAST)
    return dst, rep


def test_output_is_an_exact_relu_model(full_run, src):
    dst, rep = full_run
    m = open_flash(dst).manifest
    assert m.model_args["hidden_act"] == "relu" and m.model_args["mlp_bias"] is True
    assert m.bundle_parts == ["gate", "gate_bias", "up", "up_bias", "down"]
    assert m.dtype == open_flash(src).manifest.dtype
    assert json.loads((dst / "relufy.json").read_text())["settings"]["sparsity"] == 0.7
    assert not default_work_dir(dst).exists()  # removed once dst is written
    assert [r.layer for r in rep.layers] == [0, 1, 2]
    for r in rep.layers:
        assert 0.6 < r.sparsity < 0.8, r
        assert r.error_after < r.error_before
    assert rep.total_seconds > 0

    dense = load(dst, dense=True)
    want = np.array(dense.model(mx.array([TOKENS])))
    eng = load(dst, FlashConfig(active="oracle", budget=0.5, window=3, scratch_neurons=32, threads=2))
    assert eng.chooser.exact
    np.testing.assert_allclose(np.array(eng.model(mx.array([TOKENS]))), want, rtol=3e-5, atol=3e-5)
    prompt = [{"role": "user", "content": "hello"}]
    ref = [r.token for r in dense.stream_generate(prompt, 12)]
    out = list(eng.stream_generate(prompt, 12))
    assert [r.token for r in out] == ref
    frac = np.mean([r.stats.neurons_active for r in out[1:]]) / (3 * 256)
    assert 0.15 < frac < 0.45, frac  # ~70% exact zeros
    eng.close()


def test_cancel_after_layer_1_then_resume(src, full_run, tmp_path):
    dst = tmp_path / "relu.flash"
    seen = []

    def cancel_after_layer_1(frac, msg):
        seen.append(msg)
        return not msg.startswith("layer 1: sparsity")  # False right after layer 1 is finished

    with pytest.raises(Cancelled):
        relufy(src, dst, progress=cancel_after_layer_1, **FAST)
    work = default_work_dir(dst)
    assert not dst.exists()
    assert sorted(p.name for p in work.glob("layer_*")) == ["layer_000.safetensors", "layer_001.safetensors"]
    assert (work / "student_002.npy").is_file()

    msgs = []
    rep = relufy(src, dst, progress=lambda f, m: msgs.append(m), **FAST)
    assert not any(m.startswith(("layer 0:", "layer 1:", "calibration text")) for m in msgs)  # not redone
    assert any(m.startswith("layer 2:") for m in msgs)
    assert [r.layer for r in rep.layers] == [0, 1, 2]
    assert dst.is_dir() and not work.exists()
    # same result as the uninterrupted run
    a = mx.load(str(dst / "dense.safetensors"))
    assert (dst / "ffn.bin").read_bytes() == (full_run[0] / "ffn.bin").read_bytes()
    assert a.keys() == mx.load(str(full_run[0] / "dense.safetensors")).keys()


def test_cancel_while_writing_leaves_no_destination(src, tmp_path):
    dst = tmp_path / "relu.flash"
    with pytest.raises(Cancelled):
        relufy(src, dst, progress=lambda f, m: m != "publishing", **FAST)
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir()] == [default_work_dir(dst).name]  # only the resumable work


def test_changed_settings_start_over_but_keep_the_text(src, tmp_path):
    dst = tmp_path / "relu.flash"
    with pytest.raises(Cancelled):
        relufy(src, dst, progress=lambda f, m: not m.startswith("layer 0: sparsity"), **FAST)
    msgs = []
    relufy(src, dst, progress=lambda f, m: msgs.append(m), **{**FAST, "steps": 10}, keep_work=True)
    assert msgs[0].startswith("settings changed: starting over (calibration text kept)")
    assert any(m.startswith("layer 0:") for m in msgs)
    assert not any(m.startswith("calibration text") for m in msgs)
    assert default_work_dir(dst).is_dir()


def test_rejects_non_swiglu(full_run, tmp_path):
    with pytest.raises(ValueError, match="not SwiGLU"):
        relufy(full_run[0], tmp_path / "x.flash", **FAST)
    with pytest.raises(ValueError, match="sparsity"):
        RelufySettings(sparsity=1.0)


def test_cli(src, tmp_path):
    dst = tmp_path / "cli.flash"
    args = ["relufy", str(src), str(dst), "--tokens", "1024", "--steps", "10", "--batch", "256", "--quiet",
            "--e2e-steps", "3",
            "--json", str(tmp_path / "r.json"), "--sparsity", "0.6"]
    assert main(args) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["settings"]["sparsity"] == 0.6 and len(rep["layers"]) == 3
    m = open_flash(dst).manifest
    assert m.model_args["hidden_act"] == "relu"
    assert m.predictors and m.predictors["recall"] == 0.999  # calibrated for the exact rule by default
    assert main(args) == 1  # dst exists: a clear error, not a traceback


def test_changed_e2e_settings_keep_the_layers(src, tmp_path):
    dst = tmp_path / "relu.flash"
    relufy(src, dst, keep_work=True, **{**FAST, "e2e_steps": 2})
    msgs = []
    rep = relufy(src, dst, overwrite=True, progress=lambda f, m: msgs.append(m), **{**FAST, "e2e_steps": 4})
    assert msgs[0] == "end-to-end settings changed: keeping the finished layers"
    assert not any(m.startswith(("layer 0:", "layer 1:", "layer 2:", "calibration text")) for m in msgs)
    assert rep.e2e["steps"] == 4 and any(m.startswith("end-to-end: step 4/4") for m in msgs)
    assert dst.is_dir() and not default_work_dir(dst).exists()
