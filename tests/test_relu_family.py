"""ReLU-family llama models (ProSparse / TurboSparse style): hidden_act relu, relu2, drelu, fatrelu.

Dense runs must honour ``hidden_act`` (mlx-lm's llama always uses SwiGLU), and the
flash engine's oracle uses the exact rule ``h != 0``: its output equals the dense
model's while skipping the inactive neurons. ``mlp_bias`` models carry the gate/up
biases inside each neuron's bundle.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.config import FlashConfig
from mlx_flash.engine import load
from mlx_flash.storage.format import convert_to_flash, open_flash, read_layer_weights
from tests.tiny import make_tiny_llama

TOKENS = [5, 17, 99, 3, 42, 7, 8, 120, 64, 33, 2, 200]
H, N = 64, 256


def make_relu_llama(dir: Path, act: str, *, param=None, mlp_bias: bool = False, gate_bias: float = -0.3,
                    seed: int = 3) -> Path:
    """A tiny llama with ``hidden_act = act`` (and optionally ``mlp_bias`` with a negative
    gate bias, which makes ReLU sparser)."""
    src = make_tiny_llama(dir, layers=3, hidden=H, ffn=N, dtype="float32", seed=seed)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = act
    if param is not None:
        cfg["hidden_act_param"] = param
    if mlp_bias:
        cfg["mlp_bias"] = True
        w = dict(mx.load(str(src / "model.safetensors")))
        rng = np.random.default_rng(seed)
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}.mlp."
            w[p + "gate_proj.bias"] = mx.array((gate_bias + 0.1 * rng.normal(size=N)).astype(np.float32))
            w[p + "up_proj.bias"] = mx.array((0.1 * rng.normal(size=N)).astype(np.float32))
            w[p + "down_proj.bias"] = mx.array((0.1 * rng.normal(size=H)).astype(np.float32))
        mx.save_safetensors(str(src / "model.safetensors"), w, metadata={"format": "mlx"})
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    return src


def _np_act(act, g, u, param):
    if act == "relu":
        return np.maximum(g, 0) * u
    if act == "relu2":
        return np.maximum(g, 0) ** 2 * u
    if act == "drelu":
        return np.maximum(g, 0) * np.maximum(u, 0)
    if act == "fatrelu":
        return np.where(g > param, g, 0) * u
    raise AssertionError(act)


CASES = [("relu", None, False), ("relu2", None, False), ("drelu", None, False), ("fatrelu", 0.1, False),
         ("relu", None, True), ("drelu", None, True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}{'-bias' if b else ''}" for a, _, b in CASES])
def model(request, tmp_path_factory):
    act, param, bias = request.param
    root = tmp_path_factory.mktemp(f"relu-{act}")
    src = make_relu_llama(root / "mlx", act, param=param, mlp_bias=bias)
    dst = convert_to_flash(src, root / "m.flash")
    return act, param, bias, src, dst


def test_dense_mlp_honours_hidden_act(model):
    act, param, bias, src, _ = model
    eng = load(src)
    mlp = eng.model.layers[1].mlp
    x = mx.random.normal((5, H), key=mx.random.key(1))
    w = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items() if ".layers.1.mlp." in k}
    p = "model.layers.1.mlp."
    g = np.array(x) @ w[p + "gate_proj.weight"].T + (w[p + "gate_proj.bias"] if bias else 0)
    u = np.array(x) @ w[p + "up_proj.weight"].T + (w[p + "up_proj.bias"] if bias else 0)
    want = _np_act(act, g, u, param) @ w[p + "down_proj.weight"].T + (w[p + "down_proj.bias"] if bias else 0)
    np.testing.assert_allclose(np.array(mlp(x)), want, rtol=1e-4, atol=1e-4)


def test_bundle_parts(model):
    _, _, bias, src, dst = model
    m = open_flash(dst).manifest
    if bias:
        assert m.bundle_parts == ["gate", "gate_bias", "up", "up_bias", "down"]
        assert m.bundle_elems == 3 * H + 2
        gate, gb, up, ub, down = read_layer_weights(open_flash(dst), 2)
        w = mx.load(str(src / "model.safetensors"))
        assert mx.array_equal(gb, w["model.layers.2.mlp.gate_proj.bias"]).item()
        assert mx.array_equal(ub, w["model.layers.2.mlp.up_proj.bias"]).item()
        assert mx.array_equal(down, w["model.layers.2.mlp.down_proj.weight"]).item()
    else:
        assert m.bundle_parts == ["gate", "up", "down"]


def test_flash_all_and_exact_oracle_equal_dense(model):
    act, _, _, src, dst = model
    dense = load(src)
    want = np.array(dense.model(mx.array([TOKENS])))
    flash_dense = load(dst, dense=True)
    np.testing.assert_array_equal(np.array(flash_dense.model(mx.array([TOKENS]))), want)
    for active in ("all", "oracle", "gate"):  # gate-first: the exact rule act(gate x) != 0, no calibration
        eng = load(dst, FlashConfig(active=active, sparsity=None if active == "gate" else 0.5, budget=0.4,
                                    scratch_neurons=32, threads=2))
        got = np.array(eng.model(mx.array([TOKENS])))
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-5, err_msg=active)
        eng.close()


def test_exact_oracle_generation_and_sparsity(model):
    act, _, bias, src, dst = model
    prompt = [{"role": "user", "content": "hello there"}]
    ref = [r.token for r in load(src).stream_generate(prompt, 16)]
    eng = load(dst, FlashConfig(active="oracle", budget=0.5, window=3, scratch_neurons=32, threads=2))
    assert eng.chooser.exact
    out = list(eng.stream_generate(prompt, 16))
    assert [r.token for r in out] == ref
    frac = np.mean([r.stats.neurons_active for r in out[1:]]) / (3 * N)
    # random weights: relu ~50% active, drelu ~25%, negative gate bias sparser still
    limit = {"relu": 0.6, "relu2": 0.6, "drelu": 0.35, "fatrelu": 0.55}[act]
    assert 0.0 < frac < limit, frac
    eng.close()


def test_swiglu_oracle_at_the_same_sparsity_is_not_exact(tmp_path):
    """The contrast that makes the exactness tests meaningful: thresholding SwiGLU at 50% moves the logits."""
    src = make_tiny_llama(tmp_path / "mlx", layers=3, hidden=H, ffn=N, dtype="float32", seed=3)
    dst = convert_to_flash(src, tmp_path / "m.flash")
    want = np.array(load(src).model(mx.array([TOKENS])))
    eng = load(dst, FlashConfig(active="oracle", sparsity=0.5, budget=0.5, threads=2))
    assert not eng.chooser.exact
    got = np.array(eng.model(mx.array([TOKENS])))
    assert np.abs(got - want).max() > 1e-2
    eng.close()
